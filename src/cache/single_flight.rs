//! One computation per key in flight, however many callers ask for it at once.

use std::{collections::HashMap, hash::Hash, sync::Arc, sync::Mutex};

use tokio::sync::OnceCell;

/// The cell every caller of the same key awaits; the first one to get it runs the work.
pub struct SingleFlight<K, V> {
    cells: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Eq + Hash + Clone, V> SingleFlight<K, V> {
    pub fn new() -> Self {
        SingleFlight {
            cells: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<OnceCell<V>>>> {
        self.cells.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cell of `key`, created when none is in flight.
    pub fn cell(&self, key: &K) -> Arc<OnceCell<V>> {
        self.lock().entry(key.clone()).or_default().clone()
    }

    /// Forgets `key` (its work finished); later callers start afresh.
    pub fn done(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Forgets `key` only if it is still `cell` (a failed attempt; a newer one may have started).
    pub fn failed(&self, key: &K, cell: &Arc<OnceCell<V>>) {
        let mut cells = self.lock();
        if cells.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            cells.remove(key);
        }
    }

    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.lock().retain(|k, _| keep(k));
    }

    pub fn any(&self, pred: impl Fn(&K) -> bool) -> bool {
        self.lock().keys().any(pred)
    }
}

impl<K: Eq + Hash + Clone, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flight: Arc<SingleFlight<String, u32>> = Arc::new(SingleFlight::new());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let key = "k".to_string();
        let calls = (0..8).map(|_| {
            let (flight, runs, key) = (flight.clone(), runs.clone(), key.clone());
            tokio::spawn(async move {
                let cell = flight.cell(&key);
                *cell
                    .get_or_init(|| async {
                        tokio::task::yield_now().await;
                        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
                    })
                    .await
            })
        });
        for call in calls {
            assert_eq!(call.await.unwrap(), 1);
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
        flight.done(&key);
        assert!(!flight.any(|k| k == "k"));
        let stale = flight.cell(&key);
        flight.done(&key);
        let fresh = flight.cell(&key);
        flight.failed(&key, &stale);
        assert!(
            flight.any(|k| k == "k"),
            "a failed older attempt leaves the newer one"
        );
        flight.failed(&key, &fresh);
        assert!(!flight.any(|k| k == "k"));
    }
}
