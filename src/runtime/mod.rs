//! The inference backend: the handle the HTTP side talks to (`Backend`), and the thread behind it that owns the
//! ONNX Runtime sessions and answers jobs through channels.
//!
//! `environment` loads the library, `session` builds and runs sessions, `batcher` forms batches from the job
//! queue, `scheduler` picks the path of each part of a batch, `worker` is the thread tying them together.

mod batcher;
mod environment;
mod scheduler;
mod session;
mod worker;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ort::{environment::Environment, session::Session};
use tokio::sync::oneshot;

pub use environment::{environment, library_path, ORT_VERSION, SETUP_LIBRARY};
pub use scheduler::{CostModel, ExecutionPath, Group, Plan};

use crate::{
    config::Execution, config::Provider, expert::Runnable, metrics::Metrics, package::Package,
};

/// Settings of the backend thread.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub provider: Provider,
    pub cuda_device: i32,
    pub intra_op_threads: usize,
    pub max_batch_size: usize,
    pub max_batch_wait: Duration,
    /// Most experts promoted to a dedicated session (0 = every expert runs on the shared session).
    pub dedicated_sessions: usize,
    /// Requests an expert serves on the shared session before it is promoted.
    pub promote_after: u64,
    pub execution: Execution,
}

/// Which session ran a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// The one shared session, expert weights fed as graph inputs.
    Shared,
    /// The expert's own session, weights baked in as plain initializers (constant-folded and pre-packed by ORT).
    Dedicated,
    /// The mixed-task graph's session (factors and heads of the batch's experts fed as banks).
    Mixed,
}

/// What one inference job gives back.
#[derive(Debug, Clone)]
pub struct InferOutput {
    /// `images x classes`, row-major.
    pub logits: Vec<f32>,
    pub queue_seconds: f64,
    pub run_seconds: f64,
    /// Images in the ONNX Runtime run this job was part of.
    pub batch_images: usize,
    pub session: SessionKind,
    pub path: ExecutionPath,
}

struct Job {
    runnable: Runnable,
    input: Vec<f32>,
    images: usize,
    height: usize,
    width: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<InferOutput, String>>,
}

/// What the backend thread receives from promotion threads: a freshly built dedicated session, or a failure.
enum Installed {
    Session {
        task: String,
        version: String,
        session: Box<Session>,
    },
    BuildFailed {
        task: String,
    },
}

/// Consecutive failed ONNX Runtime runs after which the backend reports itself unhealthy (readiness 503) until
/// a run succeeds again.
pub const UNHEALTHY_AFTER_FAILURES: u32 = 3;

/// What the backend thread tells the HTTP side about itself (readiness and liveness read it).
#[derive(Debug, Default)]
pub struct BackendHealth {
    running: AtomicBool,
    consecutive_failures: AtomicU32,
}

impl BackendHealth {
    /// The backend thread is running (false once it has ended, normally or by a panic).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Acquire)
    }

    /// Running, and its last [`UNHEALTHY_AFTER_FAILURES`] runs did not all fail.
    pub fn healthy(&self) -> bool {
        self.running() && self.consecutive_failures() < UNHEALTHY_AFTER_FAILURES
    }

    fn record(&self, ok: bool, metrics: &Metrics, error: Option<&str>) {
        if ok {
            self.consecutive_failures.store(0, Ordering::Release);
            return;
        }
        let now = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        metrics.inference_failures.inc();
        if now == UNHEALTHY_AFTER_FAILURES {
            tracing::error!(
                error = error.unwrap_or(""),
                failures = now,
                "ONNX Runtime runs keep failing: reporting not ready"
            );
        }
    }
}

/// Marks the backend as ended when the thread's function returns or unwinds.
struct RunningGuard {
    health: Arc<BackendHealth>,
    metrics: Metrics,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.health.running.store(false, Ordering::Release);
        self.metrics.backend_up.set(0);
        tracing::error!("the inference backend thread has ended");
    }
}

/// Work announced to the backend and not yet finished: while some is outstanding beyond the batch being formed,
/// the batcher waits (up to `LORKD_MAX_BATCH_WAIT_MS`) for it to join.
pub struct Announced {
    expected: Arc<AtomicUsize>,
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.expected.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle to the backend thread. Cloning is cheap; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Backend {
    jobs: mpsc::Sender<Job>,
    pub health: Arc<BackendHealth>,
    /// `cpu` or `cuda`: what the sessions actually run on.
    pub provider: &'static str,
    /// The execution mode in effect (`merged` when the package has no usable mixed-task graph).
    pub execution: Execution,
    expected: Arc<AtomicUsize>,
}

impl Backend {
    /// Creates the sessions (blocking; call off the async runtime), measures both paths once, and starts the
    /// backend thread.
    pub fn start(
        environment: &Environment,
        package: Arc<Package>,
        config: BackendConfig,
        metrics: Metrics,
    ) -> Result<Backend, String> {
        let (jobs, rx) = mpsc::channel();
        let health = Arc::new(BackendHealth::default());
        let expected = Arc::new(AtomicUsize::new(0));
        let mut worker = worker::Worker::new(
            environment,
            package,
            config,
            metrics.clone(),
            health.clone(),
        )?;
        let (provider, execution) = (worker.provider(), worker.execution());
        worker.measure_paths();
        health.running.store(true, Ordering::Release);
        metrics.backend_up.set(1);
        let guard = RunningGuard {
            health: health.clone(),
            metrics,
        };
        let batcher = batcher::Batcher::new(worker.batch_policy(), expected.clone());
        thread::Builder::new()
            .name("lorkd-backend".into())
            .spawn(move || {
                let _guard = guard;
                worker.run(rx, batcher)
            })
            .map_err(|e| format!("cannot start the backend thread: {e}"))?;
        Ok(Backend {
            jobs,
            health,
            provider,
            execution,
            expected,
        })
    }

    /// Tells the batcher that a job is on its way (the request is being decoded); the batch it would join waits
    /// for it up to the batch wait. Hold it until the answer is in.
    pub fn announce(&self) -> Announced {
        self.expected.fetch_add(1, Ordering::AcqRel);
        Announced {
            expected: self.expected.clone(),
        }
    }

    /// Runs `images` images (`input` = images x 3 x height x width floats) through `expert`.
    pub async fn infer(
        &self,
        expert: impl Into<Runnable>,
        input: Vec<f32>,
        images: usize,
        height: usize,
        width: usize,
    ) -> Result<InferOutput, String> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            runnable: expert.into(),
            input,
            images,
            height,
            width,
            enqueued: Instant::now(),
            reply,
        };
        self.jobs
            .send(job)
            .map_err(|_| "backend thread is gone".to_string())?;
        answer
            .await
            .map_err(|_| "backend dropped the job".to_string())?
    }
}
