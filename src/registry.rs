//! The experts being served: an immutable map, swapped whole on every change (add, replace, remove, reload).
//!
//! Readers take a snapshot (`Arc` clone under a read lock held for nanoseconds) and keep using it for the rest
//! of their request, so a request admitted before a change finishes on the expert version it started with;
//! writers build the next map and swap it in. Changes are serialised by `changes` so two admin calls cannot
//! lose each other's edits.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use crate::package::{ExpertEntry, ExpertStatus};

pub type Experts = BTreeMap<String, Arc<ExpertEntry>>;

#[derive(Debug, Default)]
pub struct Registry {
    current: RwLock<Arc<Experts>>,
    /// Held for the whole of a change (verify, persist, swap): one admin change at a time.
    pub changes: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn new(experts: Experts) -> Self {
        Registry {
            current: RwLock::new(Arc::new(experts)),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> Arc<Experts> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn get(&self, task: &str) -> Option<Arc<ExpertEntry>> {
        self.snapshot().get(task).cloned()
    }

    /// Replaces the whole map; returns the previous one.
    pub fn replace(&self, experts: Experts) -> Arc<Experts> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *current, Arc::new(experts))
    }

    /// Inserts or replaces one expert; returns the one it replaced.
    pub fn upsert(&self, entry: ExpertEntry) -> Option<Arc<ExpertEntry>> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**current).clone();
        let previous = next.insert(entry.spec.id.clone(), Arc::new(entry));
        *current = Arc::new(next);
        previous
    }

    /// Removes one expert; returns it.
    pub fn remove(&self, task: &str) -> Option<Arc<ExpertEntry>> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let mut next = (**current).clone();
        let removed = next.remove(task);
        *current = Arc::new(next);
        removed
    }

    /// `(available, disabled)` counts.
    pub fn counts(&self) -> (usize, usize) {
        let snapshot = self.snapshot();
        let available = snapshot
            .values()
            .filter(|e| e.status == ExpertStatus::Available)
            .count();
        (available, snapshot.len() - available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::{TaskInput, TaskSpec};

    fn entry(id: &str, version: &str) -> ExpertEntry {
        ExpertEntry {
            spec: TaskSpec {
                id: id.into(),
                name: String::new(),
                modality: String::new(),
                labels: vec!["a".into()],
                num_classes: 1,
                file: format!("experts/{id}.safetensors"),
                input: TaskInput {
                    channels: 1,
                    height: 1,
                    width: 1,
                    mean: [0.0; 3],
                    std: [1.0; 3],
                },
                metrics: serde_json::Value::Null,
            },
            status: ExpertStatus::Available,
            version: Some(version.into()),
            deltas: None,
        }
    }

    #[test]
    fn snapshots_do_not_see_later_changes() {
        let registry = Registry::new(Experts::new());
        assert!(registry.upsert(entry("a", "v1")).is_none());
        let before = registry.snapshot();
        let replaced = registry.upsert(entry("a", "v2")).unwrap();
        assert_eq!(replaced.version.as_deref(), Some("v1"));
        assert_eq!(
            before["a"].version.as_deref(),
            Some("v1"),
            "an old snapshot keeps its version"
        );
        assert_eq!(registry.get("a").unwrap().version.as_deref(), Some("v2"));
        registry.remove("a").unwrap();
        assert!(registry.get("a").is_none());
        assert!(before.contains_key("a"));
        assert_eq!(registry.counts(), (0, 0));
    }
}
