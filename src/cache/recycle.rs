//! Reuse of evicted experts' layer buffers for the next assembly, and handing freed pages back to the OS.

use std::sync::Arc;

use crate::expert::{Expert, Layer};

/// Evicted experts kept for their layer buffers. One is enough: each miss takes a set and each eviction gives one
/// back, and it bounds the extra memory to one expert's layers.
const POOL_EXPERTS: usize = 1;

#[derive(Default)]
pub struct BufferPool {
    /// Evicted experts (outside the cache budget). One may still be held by a queued job; it is reused once that
    /// job has let go.
    experts: Vec<Arc<Expert>>,
    bytes: usize,
}

impl BufferPool {
    /// Keeps `expert` for its buffers when there is room; gives it back otherwise (to be dropped).
    pub fn offer(&mut self, expert: Arc<Expert>) -> Option<Arc<Expert>> {
        if self.experts.len() < POOL_EXPERTS && !expert.layers.is_empty() {
            self.bytes += expert.bytes;
            self.experts.push(expert);
            None
        } else {
            Some(expert)
        }
    }

    /// The layer buffers of a pooled expert that no job holds any more.
    pub fn take(&mut self) -> Option<Vec<Layer>> {
        let free = self
            .experts
            .iter()
            .position(|expert| Arc::strong_count(expert) == 1)?;
        let expert = self.experts.swap_remove(free);
        self.bytes -= expert.bytes;
        // Only the pool held it (evicted experts are never handed out again), so this succeeds.
        Arc::try_unwrap(expert).ok().map(|expert| expert.layers)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Returns freed heap pages to the OS. Experts are megabytes of many-sized buffers allocated on varying blocking
/// threads; without this, glibc keeps evicted experts' pages in its arenas and RSS drifts far above the cache budget.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own allocator state; it is thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expert(layers: usize) -> Arc<Expert> {
        let layers = (0..layers)
            .map(|i| (format!("l{i}"), vec![2], vec![i as f32; 2]))
            .collect();
        Arc::new(Expert::new("t", "v", layers, (vec![1, 2], vec![0.0; 2]), vec![0.0]).unwrap())
    }

    #[test]
    fn keeps_one_expert_and_hands_its_buffers_out_once_nobody_holds_it() {
        let mut pool = BufferPool::default();
        let first = expert(2);
        let held = first.clone();
        assert!(pool.offer(first).is_none());
        assert!(pool.offer(expert(2)).is_some(), "the pool holds one expert");
        assert!(pool.offer(expert(0)).is_some());
        assert!(pool.bytes() > 0);
        assert!(pool.take().is_none(), "a job still holds it");
        drop(held);
        let layers = pool.take().expect("free now");
        assert_eq!(layers.len(), 2);
        assert_eq!(pool.bytes(), 0);
    }
}
