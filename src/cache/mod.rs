//! The assembled-expert cache: bounded by bytes, least recently used out, pinned experts kept, one assembly per
//! expert version however many requests ask, hot experts noticed for background assembly.
//!
//! `lru` keeps the books, `single_flight` the assemblies in flight, `recycle` the evicted buffers.

mod lru;
mod recycle;
mod single_flight;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    budget::MemoryBudget,
    expert::{assemble_entry, Expert},
    metrics::Metrics,
    package::{ExpertEntry, Package},
};
use lru::ByteLru;
use recycle::{release_freed_memory, BufferPool};
use single_flight::SingleFlight;

/// Why an expert could not be had.
#[derive(Debug, Clone, PartialEq)]
pub enum AssemblyError {
    /// The request-memory budget cannot cover one more assembly right now (counted with bodies and decoding,
    /// so a burst of cold experts cannot assemble past it).
    MemoryBusy,
    /// Our fault or the package's (detail for the log).
    Failed(String),
}

impl std::fmt::Display for AssemblyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MemoryBusy => f.write_str("request memory budget spent"),
            Self::Failed(detail) => f.write_str(detail),
        }
    }
}

/// How a lookup was served.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CacheOutcome {
    /// The expert was resident when the request arrived.
    pub hit: bool,
    /// Set when this request ran the assembly itself (seconds).
    pub assembly_seconds: Option<f64>,
}

/// Cache state of one task, for `/v1/experts`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CacheEntryState {
    /// `resident`, `assembling` or `cold`.
    pub state: &'static str,
    pub pinned: bool,
    pub bytes: Option<usize>,
    pub hits: u64,
}

/// The window over which requests for a cold expert are counted towards its background assembly.
const DEMAND_WINDOW: Duration = Duration::from_secs(1);

pub struct ExpertCache {
    package: Arc<Package>,
    metrics: Metrics,
    memory: MemoryBudget,
    /// Bytes one freshly assembled expert's layers take (what an assembly reserves from `memory`).
    assembly_bytes: u64,
    resident: Mutex<ByteLru<Arc<Expert>>>,
    /// One assembly per (task, expert version) in flight, whoever asks.
    loading: SingleFlight<(String, String), Arc<Expert>>,
    pool: Mutex<BufferPool>,
    /// Misses per task in the current window (when the window began, count).
    demand: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ExpertCache {
    pub fn new(
        package: Arc<Package>,
        budget_bytes: u64,
        pinned: HashSet<String>,
        metrics: Metrics,
        memory: MemoryBudget,
    ) -> Self {
        metrics
            .cache_budget_bytes
            .set(budget_bytes.min(i64::MAX as u64) as i64);
        let assembly_bytes = package.expert_weight_bytes();
        ExpertCache {
            package,
            metrics,
            memory,
            assembly_bytes,
            resident: Mutex::new(ByteLru::new(
                usize::try_from(budget_bytes).unwrap_or(usize::MAX),
                pinned,
            )),
            loading: SingleFlight::new(),
            pool: Mutex::new(BufferPool::default()),
            demand: Mutex::new(HashMap::new()),
        }
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, ByteLru<Arc<Expert>>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, BufferPool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resident expert of `entry`'s version, if any (counted as a hit); never assembles.
    pub fn peek(&self, entry: &ExpertEntry) -> Option<Arc<Expert>> {
        let task = entry.spec.id.as_str();
        let version = entry.version.as_deref().unwrap_or_default();
        let found = self.lru().touch(task, |e| e.version == version).cloned();
        if found.is_some() {
            self.metrics.cache_hits.with_label_values(&[task]).inc();
        }
        found
    }

    /// Counts a request for `task` that found no assembled expert; true when this one makes `threshold`
    /// requests within the demand window (the expert is hot: worth assembling for merged runs).
    pub fn note_demand(&self, task: &str, threshold: u64) -> bool {
        if threshold == 0 {
            return false;
        }
        let now = Instant::now();
        let mut demand = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        if demand.len() > 4096 {
            demand.retain(|_, (since, _)| now.duration_since(*since) < DEMAND_WINDOW);
        }
        let (since, count) = demand.entry(task.to_string()).or_insert((now, 0));
        if now.duration_since(*since) >= DEMAND_WINDOW {
            *since = now;
            *count = 0;
        }
        *count += 1;
        *count == threshold
    }

    /// The assembled expert for `entry` (a registry snapshot's entry), assembling it (once, off the async runtime)
    /// when it is not resident in that version. A resident expert of another version (replaced through the admin
    /// API) is dropped here; requests still holding it finish on it.
    pub async fn get(
        self: &Arc<Self>,
        entry: &Arc<ExpertEntry>,
    ) -> Result<(Arc<Expert>, CacheOutcome), AssemblyError> {
        let task = entry.spec.id.as_str();
        let version = entry.version.clone().unwrap_or_default();
        {
            let mut lru = self.lru();
            if let Some(expert) = lru.touch(task, |e| e.version == version).cloned() {
                self.metrics.cache_hits.with_label_values(&[task]).inc();
                return Ok((
                    expert,
                    CacheOutcome {
                        hit: true,
                        assembly_seconds: None,
                    },
                ));
            }
            if lru.peek(task).is_some() {
                lru.remove(task);
                self.publish(&lru);
            }
        }
        self.metrics.cache_misses.with_label_values(&[task]).inc();
        let key = (task.to_string(), version);
        let cell = self.loading.cell(&key);
        let mut assembly_seconds = None;
        let result = cell
            .get_or_try_init(|| {
                let cache = Arc::clone(self);
                let entry = Arc::clone(entry);
                let seconds = &mut assembly_seconds;
                async move {
                    // Assemble and insert on a blocking thread, so a cancelled request cannot lose a finished assembly.
                    let (expert, took) =
                        tokio::task::spawn_blocking(move || cache.assemble_and_insert(&entry))
                            .await
                            .map_err(|e| {
                                AssemblyError::Failed(format!("assembly task failed: {e}"))
                            })??;
                    *seconds = Some(took);
                    Ok::<_, AssemblyError>(expert)
                }
            })
            .await
            .cloned();
        if result.is_err() {
            self.loading.failed(&key, &cell);
        }
        result.map(|expert| {
            (
                expert,
                CacheOutcome {
                    hit: false,
                    assembly_seconds,
                },
            )
        })
    }

    /// Drops `task`'s assembled expert (removed or replaced through the admin API). Requests that hold it finish.
    pub fn forget(&self, task: &str) {
        let mut lru = self.lru();
        lru.remove(task);
        self.loading.retain(|(t, _)| t != task);
        self.publish(&lru);
    }

    fn publish(&self, lru: &ByteLru<Arc<Expert>>) {
        self.metrics.cache_resident_bytes.set(lru.bytes() as i64);
        self.metrics.cache_resident_experts.set(lru.count() as i64);
    }

    fn assemble_and_insert(
        &self,
        entry: &ExpertEntry,
    ) -> Result<(Arc<Expert>, f64), AssemblyError> {
        let task = entry.spec.id.as_str();
        let version = entry.version.clone().unwrap_or_default();
        if let Some(expert) = self.lru().peek(task).filter(|e| e.version == version) {
            return Ok((expert.clone(), 0.0));
        }
        let recycled = self.pool().take();
        self.metrics
            .cache_pooled_bytes
            .set(self.pool().bytes() as i64);
        // Fresh buffers are request memory until the cache owns them (its own budget); recycled ones are not new.
        let _reserved = match recycled {
            Some(_) => None,
            None => Some(
                self.memory
                    .try_reserve(self.assembly_bytes)
                    .map_err(|_| AssemblyError::MemoryBusy)?,
            ),
        };
        let started = Instant::now();
        let expert = Arc::new(
            assemble_entry(&self.package, entry, recycled).map_err(AssemblyError::Failed)?,
        );
        let took = started.elapsed().as_secs_f64();
        self.metrics.assemblies.with_label_values(&[task]).inc();
        self.metrics.assembly_seconds.observe(took);
        tracing::info!(
            task,
            seconds = took,
            bytes = expert.bytes,
            "expert assembled"
        );
        self.insert(task, &version, expert.clone());
        Ok((expert, took))
    }

    fn insert(&self, task: &str, version: &str, expert: Arc<Expert>) {
        let bytes = expert.bytes;
        let out = {
            let mut lru = self.lru();
            let out = lru.insert(task, expert, bytes);
            self.publish(&lru);
            out
        };
        self.loading.done(&(task.to_string(), version.to_string()));
        let mut dropped = Vec::new();
        {
            let mut pool = self.pool();
            for (name, old) in out {
                if name != task {
                    self.metrics
                        .cache_evictions
                        .with_label_values(&[&name])
                        .inc();
                    tracing::info!(task = %name, bytes = old.bytes, "expert evicted");
                }
                if let Some(old) = pool.offer(old) {
                    dropped.push(old);
                }
            }
            self.metrics.cache_pooled_bytes.set(pool.bytes() as i64);
        }
        // Trimming walks every arena and hands pages to the OS that the next assembly would fault in again; it pays
        // only where an evicted expert's buffers are freed rather than recycled.
        if !dropped.is_empty() {
            drop(dropped);
            release_freed_memory();
        }
    }

    /// Bytes of evicted experts held for the next assembly to reuse (not part of the budget).
    pub fn pooled_bytes(&self) -> usize {
        self.pool().bytes()
    }

    pub fn state(&self, task: &str) -> CacheEntryState {
        let lru = self.lru();
        let pinned = lru.is_pinned(task);
        match lru.stats(task) {
            Some((bytes, hits)) => CacheEntryState {
                state: "resident",
                pinned,
                bytes: Some(bytes),
                hits,
            },
            None if self.loading.any(|(t, _)| t == task) => CacheEntryState {
                state: "assembling",
                pinned,
                bytes: None,
                hits: 0,
            },
            None => CacheEntryState {
                state: "cold",
                pinned,
                bytes: None,
                hits: 0,
            },
        }
    }

    pub fn resident_bytes(&self) -> usize {
        self.lru().bytes()
    }

    pub fn budget(&self) -> usize {
        self.lru().budget()
    }
}

/// Builds expert `task` from the package: `W0 + scale * B @ A` for every layer, plus the task's head.
pub fn assemble(package: &Package, task: &str) -> Result<Expert, String> {
    let entry = package
        .expert(task)
        .ok_or_else(|| format!("unknown task `{task}`"))?;
    assemble_entry(package, entry, None)
}
