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
    cache::{CacheOutcome, ExpertCache},
    config::Config,
    error::ApiError,
    metrics::Metrics,
    package::{ExpertEntry, ExpertStatus, Package},
    preprocess::ImageLimits,
    runtime::{Backend, InferOutput},
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
    pub cache: Arc<ExpertCache>,
    pub backend: Backend,
    pub metrics: Metrics,
    pub admission: Arc<Semaphore>,
    /// Bounds CPU-heavy request work (image decoding, JSON tensor parsing) to about one job per core, so that a
    /// burst of large admitted requests cannot hold hundreds of decoded images in memory at once.
    pub decode_slots: Arc<Semaphore>,
    pub ready: AtomicBool,
    pub started: Instant,
    pub ort_library: String,
}

/// Holds a place in the admission queue until the response is ready.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
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
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_pixels: self.config.max_image_pixels,
            max_side: self.config.max_image_side,
        }
    }

    /// A known, enabled expert, or 404 (unknown) / 503 (disabled at load).
    pub fn servable(&self, task: &str) -> Result<&ExpertEntry, ApiError> {
        let entry = self
            .package
            .expert(task)
            .ok_or_else(|| ApiError::NotFound(format!("no expert for task `{task}`")))?;
        match &entry.status {
            ExpertStatus::Available => Ok(entry),
            ExpertStatus::Disabled { reason } => Err(ApiError::Unavailable(format!(
                "expert `{task}` is disabled: {reason}"
            ))),
        }
    }

    /// Takes a place in the bounded queue or answers 429 at once (before the body is read or decoded).
    pub fn admit(&self) -> Result<Admission, ApiError> {
        match self.admission.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.queue_depth.inc();
                Ok(Admission {
                    _permit: permit,
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

    /// Runs `work` on a blocking thread once a decode slot is free.
    pub async fn decode<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let _slot = self
            .decode_slots
            .acquire()
            .await
            .map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(ApiError::internal)
    }

    /// Gets (or assembles) the expert and runs `images` preprocessed images through it.
    pub async fn predict(
        &self,
        task: &str,
        input: Vec<f32>,
        images: usize,
        height: usize,
        width: usize,
    ) -> Result<Prediction, ApiError> {
        let started = Instant::now();
        let (expert, cache) = self.cache.get(task).await.map_err(ApiError::internal)?;
        let expert_seconds = started.elapsed().as_secs_f64();
        let version = expert.version.clone();
        let classes = expert.classes;
        let output = self
            .backend
            .infer(expert, input, images, height, width)
            .await
            .map_err(ApiError::internal)?;
        Ok(Prediction {
            version,
            classes,
            output,
            cache,
            expert_seconds,
        })
    }
}
