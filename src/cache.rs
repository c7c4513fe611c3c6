//! Assembled-expert cache: bounded by bytes, LRU eviction, pinning, and one assembly per task however many requests ask.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::Serialize;
use tokio::sync::OnceCell;

use ort::value::Tensor;

use crate::{
    assembly::{merge_layer, merge_layer_into},
    budget::MemoryBudget,
    metrics::Metrics,
    package::{ExpertEntry, Package},
    runtime::Expert,
};

/// Evicted experts whose layer buffers are kept for the next assembly to overwrite in place. One is enough: each
/// miss takes a set and each eviction gives one back, and it bounds the extra memory to one expert's layers.
const POOL_EXPERTS: usize = 1;

/// The layer tensors of one evicted expert, in package layer order.
pub type LayerBuffers = Vec<(String, Tensor<f32>)>;

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

struct Resident {
    expert: Arc<Expert>,
    last_used: u64,
    hits: u64,
}

#[derive(Default)]
struct Inner {
    resident: HashMap<String, Resident>,
    /// One assembly per (task, expert version) in flight, whoever asks.
    loading: HashMap<(String, String), Arc<OnceCell<Arc<Expert>>>>,
    clock: u64,
    bytes: usize,
    /// Evicted experts kept for their layer buffers (at most [`POOL_EXPERTS`]), outside the budget. One may still
    /// be held by a queued job; it is reused once that job has let go.
    pool: Vec<Arc<Expert>>,
    pool_bytes: usize,
}

pub struct ExpertCache {
    package: Arc<Package>,
    budget: usize,
    pinned: HashSet<String>,
    metrics: Metrics,
    memory: MemoryBudget,
    /// Bytes one freshly assembled expert's layers take (what an assembly reserves from `memory`).
    assembly_bytes: u64,
    inner: Mutex<Inner>,
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
            budget: usize::try_from(budget_bytes).unwrap_or(usize::MAX),
            pinned,
            metrics,
            memory,
            assembly_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let key = (task.to_string(), version.clone());
        let cell = {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            match inner.resident.get_mut(task) {
                Some(resident) if resident.expert.version == version => {
                    resident.last_used = now;
                    resident.hits += 1;
                    self.metrics.cache_hits.with_label_values(&[task]).inc();
                    return Ok((
                        resident.expert.clone(),
                        CacheOutcome {
                            hit: true,
                            assembly_seconds: None,
                        },
                    ));
                }
                Some(_) => {
                    let stale = inner.resident.remove(task).expect("present");
                    inner.bytes -= stale.expert.bytes;
                    self.publish(&inner);
                }
                None => {}
            }
            self.metrics.cache_misses.with_label_values(&[task]).inc();
            inner.loading.entry(key.clone()).or_default().clone()
        };
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
            let mut inner = self.lock();
            if inner
                .loading
                .get(&key)
                .is_some_and(|c| Arc::ptr_eq(c, &cell))
            {
                inner.loading.remove(&key);
            }
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
        let mut inner = self.lock();
        if let Some(resident) = inner.resident.remove(task) {
            inner.bytes -= resident.expert.bytes;
        }
        inner.loading.retain(|(t, _), _| t != task);
        self.publish(&inner);
    }

    fn publish(&self, inner: &Inner) {
        self.metrics.cache_resident_bytes.set(inner.bytes as i64);
        self.metrics
            .cache_resident_experts
            .set(inner.resident.len() as i64);
    }

    fn assemble_and_insert(
        &self,
        entry: &ExpertEntry,
    ) -> Result<(Arc<Expert>, f64), AssemblyError> {
        let task = entry.spec.id.as_str();
        let version = entry.version.as_deref().unwrap_or_default();
        if let Some(resident) = self.lock().resident.get(task) {
            if resident.expert.version == version {
                return Ok((resident.expert.clone(), 0.0));
            }
        }
        let recycled = self.take_pooled();
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
        self.insert(task, version, expert.clone());
        Ok((expert, took))
    }

    fn insert(&self, task: &str, version: &str, expert: Arc<Expert>) {
        let evicted = self.insert_and_evict(task, version, expert);
        let dropped = {
            let mut inner = self.lock();
            let mut dropped = Vec::new();
            for expert in evicted {
                if inner.pool.len() < POOL_EXPERTS && !expert.layers.is_empty() {
                    inner.pool_bytes += expert.bytes;
                    inner.pool.push(expert);
                } else {
                    dropped.push(expert);
                }
            }
            self.metrics.cache_pooled_bytes.set(inner.pool_bytes as i64);
            dropped
        };
        // Trimming walks every arena and hands pages to the OS that the next assembly would fault in again; it pays
        // only where an evicted expert's buffers are freed rather than recycled.
        if !dropped.is_empty() {
            drop(dropped);
            release_freed_memory();
        }
    }

    /// A recycled set of layer buffers for the next assembly: a pooled expert that no job holds any more.
    fn take_pooled(&self) -> Option<LayerBuffers> {
        let mut inner = self.lock();
        let free = inner
            .pool
            .iter()
            .position(|expert| Arc::strong_count(expert) == 1)?;
        let expert = inner.pool.swap_remove(free);
        inner.pool_bytes -= expert.bytes;
        self.metrics.cache_pooled_bytes.set(inner.pool_bytes as i64);
        // Only the pool held it (evicted experts are never handed out again), so this succeeds.
        Arc::try_unwrap(expert).ok().map(|expert| expert.layers)
    }

    /// Inserts `expert` and evicts least recently used experts until the budget holds; returns the evicted ones.
    fn insert_and_evict(&self, task: &str, version: &str, expert: Arc<Expert>) -> Vec<Arc<Expert>> {
        let mut evicted_experts = Vec::new();
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.bytes += expert.bytes;
        if let Some(old) = inner.resident.insert(
            task.to_string(),
            Resident {
                expert,
                last_used: now,
                hits: 0,
            },
        ) {
            inner.bytes -= old.expert.bytes;
        }
        inner
            .loading
            .remove(&(task.to_string(), version.to_string()));
        while inner.bytes > self.budget {
            let victim = inner
                .resident
                .iter()
                .filter(|(name, _)| name.as_str() != task && !self.pinned.contains(name.as_str()))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    resident_bytes = inner.bytes,
                    budget = self.budget,
                    "expert cache over budget: nothing left to evict (pinned or in use)"
                );
                break;
            };
            let evicted = inner.resident.remove(&victim).expect("victim is resident");
            inner.bytes -= evicted.expert.bytes;
            self.metrics
                .cache_evictions
                .with_label_values(&[&victim])
                .inc();
            tracing::info!(task = %victim, bytes = evicted.expert.bytes, "expert evicted");
            evicted_experts.push(evicted.expert);
        }
        self.metrics.cache_resident_bytes.set(inner.bytes as i64);
        self.metrics
            .cache_resident_experts
            .set(inner.resident.len() as i64);
        evicted_experts
    }

    /// Bytes of evicted experts held for the next assembly to reuse (not part of the budget).
    pub fn pooled_bytes(&self) -> usize {
        self.lock().pool_bytes
    }

    pub fn state(&self, task: &str) -> CacheEntryState {
        let inner = self.lock();
        let pinned = self.pinned.contains(task);
        match inner.resident.get(task) {
            Some(r) => CacheEntryState {
                state: "resident",
                pinned,
                bytes: Some(r.expert.bytes),
                hits: r.hits,
            },
            None if inner.loading.keys().any(|(t, _)| t == task) => CacheEntryState {
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
        self.lock().bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }
}

/// Returns freed heap pages to the OS. Experts are megabytes of many-sized buffers allocated on varying blocking
/// threads; without this, glibc keeps evicted experts' pages in its arenas and RSS drifts far above the cache budget.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own allocator state; it is thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Builds expert `task` from the package: `W0 + scale * B @ A` for every layer, plus the task's head.
pub fn assemble(package: &Package, task: &str) -> Result<Expert, String> {
    assemble_with(package, task, None)
}

/// [`assemble`], merging into `recycled` (an evicted expert's layer tensors of this package) in place when given and
/// shaped alike; fresh buffers otherwise. Heads differ in size between tasks and are always allocated fresh.
pub fn assemble_with(
    package: &Package,
    task: &str,
    recycled: Option<LayerBuffers>,
) -> Result<Expert, String> {
    let entry = package
        .expert(task)
        .ok_or_else(|| format!("unknown task `{task}`"))?;
    assemble_entry(package, entry, recycled)
}

/// [`assemble_with`] for an expert that need not be in the package's manifest (added through the admin API).
pub fn assemble_entry(
    package: &Package,
    entry: &ExpertEntry,
    recycled: Option<LayerBuffers>,
) -> Result<Expert, String> {
    let task = entry.spec.id.as_str();
    let deltas = entry
        .deltas
        .as_ref()
        .ok_or_else(|| format!("expert `{task}` is disabled"))?;
    let version = entry.version.clone().unwrap_or_default();
    let classes = entry.spec.num_classes;
    let features = package.manifest.model.feature_dim;
    let head = (vec![classes, features], deltas.head_weight.clone());
    if let Some(mut layers) = recycled.filter(|l| fits(package, l)) {
        for ((base, (a, b)), (name, tensor)) in package
            .layers
            .iter()
            .zip(&deltas.factors)
            .zip(layers.iter_mut())
        {
            let (_, out) = tensor.extract_tensor_mut();
            merge_layer_into(base.shape, &base.w0, b, a, deltas.scale, out)
                .map_err(|e| format!("layer `{}`: {e}", base.name))?;
            name.clone_from(&base.name);
        }
        return Expert::from_layer_tensors(task, &version, layers, head, deltas.head_bias.clone());
    }
    let mut layers = Vec::with_capacity(package.layers.len());
    for (base, (a, b)) in package.layers.iter().zip(&deltas.factors) {
        let merged = merge_layer(base.shape, &base.w0, b, a, deltas.scale)
            .map_err(|e| format!("layer `{}`: {e}", base.name))?;
        layers.push((
            base.name.clone(),
            base.shape.weight_shape().to_vec(),
            merged,
        ));
    }
    Expert::new(task, &version, layers, head, deltas.head_bias.clone())
}

/// Whether recycled buffers have exactly this package's layer shapes (same count, same dims, layer by layer).
fn fits(package: &Package, layers: &[(String, Tensor<f32>)]) -> bool {
    layers.len() == package.layers.len()
        && package
            .layers
            .iter()
            .zip(layers)
            .all(|(base, (_, tensor))| {
                let (shape, _) = tensor.extract_tensor();
                shape.len() == 4
                    && shape
                        .iter()
                        .zip(base.shape.weight_shape())
                        .all(|(&d, w)| d == w as i64)
            })
}
