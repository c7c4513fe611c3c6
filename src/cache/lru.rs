//! Byte-bounded least-recently-used bookkeeping: which values stay, which go when the budget is exceeded.

use std::collections::{HashMap, HashSet};

struct Entry<V> {
    value: V,
    bytes: usize,
    last_used: u64,
    hits: u64,
}

/// Values by key, each with a byte size; inserting past `budget` evicts the least recently used unpinned ones.
pub struct ByteLru<V> {
    entries: HashMap<String, Entry<V>>,
    budget: usize,
    pinned: HashSet<String>,
    clock: u64,
    bytes: usize,
}

impl<V> ByteLru<V> {
    pub fn new(budget: usize, pinned: HashSet<String>) -> ByteLru<V> {
        ByteLru {
            entries: HashMap::new(),
            budget,
            pinned,
            clock: 0,
            bytes: 0,
        }
    }

    /// The value of `key` when `keep(value)` holds, marked as used (and counted as a hit).
    pub fn touch(&mut self, key: &str, keep: impl Fn(&V) -> bool) -> Option<&V> {
        self.clock += 1;
        let now = self.clock;
        let entry = self.entries.get_mut(key).filter(|e| keep(&e.value))?;
        entry.last_used = now;
        entry.hits += 1;
        Some(&entry.value)
    }

    pub fn peek(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// `(bytes, hits)` of `key`.
    pub fn stats(&self, key: &str) -> Option<(usize, u64)> {
        self.entries.get(key).map(|e| (e.bytes, e.hits))
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let entry = self.entries.remove(key)?;
        self.bytes -= entry.bytes;
        Some(entry.value)
    }

    /// Inserts (or replaces) `key`, then evicts least recently used entries other than `key` and the pinned ones
    /// until the budget holds, or nothing is left to evict. Returns the evicted and the replaced values.
    pub fn insert(&mut self, key: &str, value: V, bytes: usize) -> Vec<(String, V)> {
        self.clock += 1;
        let mut out = Vec::new();
        if let Some(old) = self.remove(key) {
            out.push((key.to_string(), old));
        }
        self.bytes += bytes;
        self.entries.insert(
            key.to_string(),
            Entry {
                value,
                bytes,
                last_used: self.clock,
                hits: 0,
            },
        );
        while self.bytes > self.budget {
            let victim = self
                .entries
                .iter()
                .filter(|(name, _)| name.as_str() != key && !self.pinned.contains(name.as_str()))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    resident_bytes = self.bytes,
                    budget = self.budget,
                    "expert cache over budget: nothing left to evict (pinned or in use)"
                );
                break;
            };
            let value = self.remove(&victim).expect("victim is present");
            out.push((victim, value));
        }
        out
    }

    pub fn is_pinned(&self, key: &str) -> bool {
        self.pinned.contains(key)
    }

    /// Entries held.
    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_unpinned_entries_past_the_budget() {
        let mut lru = ByteLru::new(10, HashSet::from(["p".to_string()]));
        assert!(lru.insert("p", 1, 4).is_empty());
        assert!(lru.insert("a", 2, 3).is_empty());
        assert!(lru.insert("b", 3, 3).is_empty());
        assert_eq!(lru.touch("a", |_| true), Some(&2));
        // 13 bytes: "b" is the least recently used unpinned entry.
        let evicted = lru.insert("c", 4, 3);
        assert_eq!(evicted, vec![("b".to_string(), 3)]);
        assert_eq!((lru.count(), lru.bytes()), (3, 10));
        assert_eq!(lru.stats("a"), Some((3, 1)));
        // Nothing but pinned and the new entry left: over budget, with a warning, but no loop.
        let evicted = lru.insert("big", 5, 20);
        assert_eq!(evicted.len(), 2);
        assert_eq!(lru.bytes(), 24);
        assert!(lru.peek("p").is_some());
    }

    #[test]
    fn replacing_returns_the_old_value_and_touch_can_refuse_a_stale_one() {
        let mut lru = ByteLru::new(100, HashSet::new());
        lru.insert("a", "v1", 5);
        assert_eq!(lru.insert("a", "v2", 7), vec![("a".to_string(), "v1")]);
        assert_eq!(lru.bytes(), 7);
        assert_eq!(lru.touch("a", |v| *v == "v1"), None);
        assert_eq!(lru.remove("a"), Some("v2"));
        assert_eq!(lru.count(), 0);
        assert_eq!(lru.bytes(), 0);
    }
}
