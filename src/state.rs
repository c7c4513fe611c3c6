//! The one handle HTTP handlers talk to: package, cache, backend, metrics and admission control, behind an `Arc`.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    auth::ApiKeys,
    budget::{MemoryBudget, Reservation},
    cache::{AssemblyError, CacheOutcome, ExpertCache},
    config::{Config, Execution},
    error::ApiError,
    expert::Runnable,
    metrics::Metrics,
    overlay::Overlay,
    package::{ExpertEntry, ExpertStatus, Package},
    preprocess::ImageLimits,
    registry::Registry,
    runtime::{Announced, Backend, InferOutput},
};

#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Config,
    pub package: Arc<Package>,
    /// The experts being served (the package's, changed by the admin API); read through snapshots.
    pub experts: Registry,
    /// Where admin changes are persisted (`LORKD_OVERLAY_DIR`); None keeps them in memory only.
    pub overlay: Option<Overlay>,
    pub cache: Arc<ExpertCache>,
    pub backend: Backend,
    pub metrics: Metrics,
    pub admission: Arc<Semaphore>,
    /// Request memory in use at once (bodies, decoding, assembly): see `budget`.
    pub memory: MemoryBudget,
    pub api_keys: ApiKeys,
    /// Keys of the admin scope (`LORKD_ADMIN_KEYS`); none: the admin API is off.
    pub admin_keys: ApiKeys,
    /// Bounds CPU-heavy request work (image decoding, JSON tensor parsing) to about one job per core, so that a
    /// burst of large admitted requests cannot hold hundreds of decoded images in memory at once.
    pub decode_slots: Arc<Semaphore>,
    pub ready: AtomicBool,
    pub started: Instant,
    /// What these settings let the process hold at most (computed once at start-up).
    pub memory_plan: crate::server::MemoryPlan,
}

/// Holds a place in the admission queue until the response is ready.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    /// Tells the batcher this request's work is coming (it may wait for it to fill a batch).
    _announced: Announced,
    metrics: Metrics,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.metrics.queue_depth.dec();
    }
}

/// Result of running one request's images through an expert.
pub struct Prediction {
    pub version: String,
    pub classes: usize,
    pub output: InferOutput,
    pub cache: CacheOutcome,
    pub expert_seconds: f64,
}

impl Shared {
    /// Warmed up, and the inference backend runs and its recent runs have not all failed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.backend.health.healthy()
    }

    /// The process can still serve: its inference backend thread has not ended.
    pub fn is_live(&self) -> bool {
        self.backend.health.running()
    }

    /// 503 + Retry-After for a spent request-memory budget (counted once here).
    pub fn memory_busy(&self) -> ApiError {
        self.metrics.rejected.with_label_values(&["memory"]).inc();
        ApiError::MemoryBusy { retry_after_s: 1 }
    }

    /// Reserves `bytes` of request memory now, or 503 `memory_busy`.
    pub fn reserve(&self, bytes: usize) -> Result<Reservation, ApiError> {
        self.memory
            .try_reserve(bytes as u64)
            .map_err(|_| self.memory_busy())
    }

    /// 413 when a request carries more images than `LORKD_MAX_CLIENT_BATCH_SIZE`.
    pub fn check_image_count(&self, images: usize) -> Result<(), ApiError> {
        let limit = self.config.max_client_batch_size;
        if images > limit as usize {
            self.metrics
                .rejected
                .with_label_values(&["too_many_images"])
                .inc();
            return Err(ApiError::TooManyImages { images, limit });
        }
        Ok(())
    }

    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.config.max_image_pixels,
            max_side: self.config.max_image_side,
        }
    }

    /// A known, enabled expert of the current registry, or 404 (unknown) / 503 (disabled). The caller keeps the
    /// returned entry for the whole request: a replacement meanwhile does not change what it runs.
    pub fn servable(&self, task: &str) -> Result<Arc<ExpertEntry>, ApiError> {
        let entry = self
            .experts
            .get(task)
            .ok_or_else(|| ApiError::NotFound(format!("no expert for task `{task}`")))?;
        match &entry.status {
            ExpertStatus::Available => Ok(entry),
            ExpertStatus::Disabled { reason } => Err(ApiError::Unavailable(format!(
                "expert `{task}` is disabled: {reason}"
            ))),
        }
    }

    /// Takes a place in the bounded inference queue or answers 429 at once. Called once the body is read, so
    /// that slow or stalled uploads never hold a place (reading is bounded by the memory budget and timeouts).
    pub fn admit(&self) -> Result<Admission, ApiError> {
        match self.admission.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.queue_depth.inc();
                Ok(Admission {
                    _permit: permit,
                    _announced: self.backend.announce(),
                    metrics: self.metrics.clone(),
                })
            }
            Err(_) => {
                self.metrics
                    .rejected
                    .with_label_values(&["queue_full"])
                    .inc();
                Err(ApiError::Overloaded {
                    capacity: self.config.queue_capacity,
                    retry_after_s: 1,
                })
            }
        }
    }

    /// Runs `work` on a blocking thread once a decode slot is free. The slot and `memory` (the bytes the work
    /// needs) move into the blocking job: they are released when the work ends, not when the request is
    /// cancelled, so a client that hangs up cannot free them while its decoding still runs.
    pub async fn decode<T: Send + 'static>(
        &self,
        memory: Reservation,
        work: impl FnOnce(&mut Reservation) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let slot = self
            .decode_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || {
            let mut memory = memory;
            let out = work(&mut memory);
            drop((slot, memory));
            out
        })
        .await
        .map_err(ApiError::internal)
    }

    /// The expert in the form the execution mode runs: assembled (`merged`: assembling it now when it is not
    /// resident), as factors only (`mixed`), or `auto`: assembled when resident, else factors, and a hot expert
    /// (`LORKD_ASSEMBLE_AFTER` requests within a second) is assembled in the background for later batches.
    async fn runnable(
        &self,
        entry: &Arc<ExpertEntry>,
    ) -> Result<(Runnable, CacheOutcome), ApiError> {
        let cold = CacheOutcome {
            hit: false,
            assembly_seconds: None,
        };
        match self.backend.execution {
            Execution::Merged => {
                let (expert, outcome) = self.cache.get(entry).await.map_err(|e| match e {
                    AssemblyError::MemoryBusy => self.memory_busy(),
                    AssemblyError::Failed(detail) => ApiError::internal(detail),
                })?;
                Ok((Runnable::from_entry(entry, Some(expert)), outcome))
            }
            Execution::Mixed => Ok((Runnable::from_entry(entry, None), cold)),
            Execution::Auto => {
                if let Some(expert) = self.cache.peek(entry) {
                    let hit = CacheOutcome {
                        hit: true,
                        assembly_seconds: None,
                    };
                    return Ok((Runnable::from_entry(entry, Some(expert)), hit));
                }
                if self
                    .cache
                    .note_demand(&entry.spec.id, self.config.assemble_after)
                {
                    let (cache, entry) = (self.cache.clone(), entry.clone());
                    tokio::spawn(async move {
                        // Best effort: a spent memory budget or a failure leaves the expert on the mixed path.
                        if let Err(error) = cache.get(&entry).await {
                            tracing::debug!(task = %entry.spec.id, %error, "background assembly skipped");
                        }
                    });
                }
                Ok((Runnable::from_entry(entry, None), cold))
            }
        }
    }

    /// Runs `images` preprocessed images through the expert, in the form the execution mode runs it.
    pub async fn predict(
        &self,
        entry: &Arc<ExpertEntry>,
        input: Vec<f32>,
        images: usize,
        height: usize,
        width: usize,
    ) -> Result<Prediction, ApiError> {
        let started = Instant::now();
        let (expert, cache) = self.runnable(entry).await?;
        let expert_seconds = started.elapsed().as_secs_f64();
        let version = expert.version.clone();
        let classes = expert.classes;
        // Never more than LORKD_MAX_BATCH_SIZE images in one ONNX Runtime run: the runtime's memory arena grows to
        // the largest run it has seen and keeps that size, so the batch size is what bounds it.
        let per_run = self.config.max_batch_size.max(1) as usize;
        let output = if images <= per_run {
            self.backend
                .infer(expert, input, images, height, width)
                .await
                .map_err(ApiError::internal)?
        } else {
            let stride = 3 * height * width;
            let mut merged: Option<InferOutput> = None;
            // One run after another: a request this large is not worth more memory to finish sooner.
            for chunk in input.chunks(per_run * stride) {
                let output = self
                    .backend
                    .infer(
                        expert.clone(),
                        chunk.to_vec(),
                        chunk.len() / stride,
                        height,
                        width,
                    )
                    .await
                    .map_err(ApiError::internal)?;
                match &mut merged {
                    None => merged = Some(output),
                    Some(all) => {
                        all.logits.extend_from_slice(&output.logits);
                        all.queue_seconds += output.queue_seconds;
                        all.run_seconds += output.run_seconds;
                        all.batch_images = all.batch_images.max(output.batch_images);
                    }
                }
            }
            merged.expect("images > per_run >= 1 gives at least one run")
        };
        Ok(Prediction {
            version,
            classes,
            output,
            cache,
            expert_seconds,
        })
    }
}
