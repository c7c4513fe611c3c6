//! ONNX Runtime: the one process-wide environment, the execution provider choice, and the batching backend thread
//! that owns the session and answers inference jobs through channels.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, OnceLock},
    thread,
    time::{Duration, Instant},
};

use ort::{
    environment::Environment,
    ep::{self, ExecutionProvider},
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue},
    value::Tensor,
};
use tokio::sync::oneshot;

use crate::{config::Provider, metrics::Metrics, onnx, package::Package};

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The ONNX Runtime release lorkd is built and tested against (`ort` 2.0.0-rc.15, `load-dynamic`).
pub const ORT_VERSION: &str = "1.31.1";

/// Where scripts/setup.sh unpacks the library from the PyPI wheel.
pub const SETUP_LIBRARY: &str = ".ort/lib/libonnxruntime.so.1.31.1";

/// Which library file to load: the explicit flag, else `ORT_DYLIB_PATH`, else the set-up script's copy when
/// present, else the system search path.
pub fn library_path(explicit: Option<&PathBuf>) -> PathBuf {
    explicit
        .cloned()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .or_else(|| {
            Path::new(SETUP_LIBRARY)
                .exists()
                .then(|| PathBuf::from(SETUP_LIBRARY))
        })
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// Loads ONNX Runtime from `library` and creates the process's one environment (later calls reuse the first).
pub fn environment(library: &Path) -> Result<Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            if library.components().count() > 1 && !library.exists() {
                return Err(format!(
                    "ONNX Runtime library not found at {} (run scripts/setup.sh, or set LORKD_ORT_LIBRARY / ORT_DYLIB_PATH)",
                    library.display()
                ));
            }
            let builder = ort::init_from(library).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e} (run scripts/setup.sh, or point LORKD_ORT_LIBRARY / ORT_DYLIB_PATH at libonnxruntime.so.1.31.1)",
                    library.display()
                )
            })?;
            builder
                .with_name("lorkd")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .clone()
}

/// An assembled expert: its weights as ready ONNX Runtime tensors, fed as graph inputs of the shared session.
pub struct Expert {
    pub task: String,
    pub version: String,
    pub classes: usize,
    /// `(graph input name, W_t)` for every decomposed layer; empty for the plain base network.
    pub layers: Vec<(String, Tensor<f32>)>,
    pub head_weight: Tensor<f32>,
    pub head_bias: Tensor<f32>,
    /// Bytes of weights this expert holds (what the cache budget counts).
    pub bytes: usize,
    /// Whether the backend may promote it to a dedicated session (false for the warm-up base network).
    pub promotable: bool,
}

impl Expert {
    pub fn new(
        task: &str,
        version: &str,
        layers: Vec<(String, Vec<usize>, Vec<f32>)>,
        head_weight: (Vec<usize>, Vec<f32>),
        head_bias: Vec<f32>,
    ) -> Result<Expert, String> {
        let layers = layers
            .into_iter()
            .map(|(name, shape, data)| {
                Tensor::from_array((shape, data))
                    .map(|t| (name, t))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Expert::from_layer_tensors(task, version, layers, head_weight, head_bias)
    }

    /// Like [`Expert::new`], with the layers already ONNX Runtime tensors (recycled buffers, merged in place).
    pub fn from_layer_tensors(
        task: &str,
        version: &str,
        layers: Vec<(String, Tensor<f32>)>,
        head_weight: (Vec<usize>, Vec<f32>),
        head_bias: Vec<f32>,
    ) -> Result<Expert, String> {
        let classes = head_bias.len();
        let bytes = (head_weight.1.len() + head_bias.len()) * 4 + layer_bytes(&layers);
        Ok(Expert {
            task: task.to_string(),
            version: version.to_string(),
            classes,
            layers,
            head_weight: Tensor::from_array(head_weight).map_err(|e| e.to_string())?,
            head_bias: Tensor::from_array((vec![classes], head_bias)).map_err(|e| e.to_string())?,
            bytes,
            promotable: true,
        })
    }
}

/// Bytes of weights held by `layers`.
fn layer_bytes(layers: &[(String, Tensor<f32>)]) -> usize {
    layers
        .iter()
        .map(|(_, t)| t.extract_tensor().1.len() * 4)
        .sum()
}

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
}

/// Which session ran a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// The one shared session, expert weights fed as graph inputs.
    Shared,
    /// The expert's own session, weights baked in as plain initializers (constant-folded and pre-packed by ORT).
    Dedicated,
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
}

struct Job {
    expert: Arc<Expert>,
    input: Vec<f32>,
    images: usize,
    height: usize,
    width: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<InferOutput, String>>,
}

/// What the backend thread receives: work, or a freshly built dedicated session to install.
enum Message {
    Job(Job),
    Installed {
        task: String,
        version: String,
        session: Box<Session>,
    },
    BuildFailed {
        task: String,
    },
}

/// How often an idle backend thread looks for finished promotions (they arrive on their own channel).
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Consecutive failed ONNX Runtime runs after which the backend reports itself unhealthy (readiness 503) until
/// a run succeeds again.
pub const UNHEALTHY_AFTER_FAILURES: u32 = 3;

/// What the backend thread tells the HTTP side about itself (readiness and liveness read it).
#[derive(Debug, Default)]
pub struct BackendHealth {
    running: std::sync::atomic::AtomicBool,
    consecutive_failures: std::sync::atomic::AtomicU32,
}

impl BackendHealth {
    /// The backend thread is running (false once it has ended, normally or by a panic).
    pub fn running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Running, and its last [`UNHEALTHY_AFTER_FAILURES`] runs did not all fail.
    pub fn healthy(&self) -> bool {
        self.running() && self.consecutive_failures() < UNHEALTHY_AFTER_FAILURES
    }
}

/// Marks the backend as ended when the thread's function returns or unwinds.
struct RunningGuard {
    health: Arc<BackendHealth>,
    metrics: Metrics,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.health
            .running
            .store(false, std::sync::atomic::Ordering::Release);
        self.metrics.backend_up.set(0);
        tracing::error!("the inference backend thread has ended");
    }
}

/// Handle to the backend thread. Cloning is cheap; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Backend {
    jobs: mpsc::Sender<Message>,
    pub health: Arc<BackendHealth>,
    /// `cpu` or `cuda`: what the sessions actually run on.
    pub provider: &'static str,
}

#[derive(Clone)]
struct Names {
    input: String,
    output: String,
    head_weight: String,
    head_bias: String,
}

/// Everything needed to build more sessions later (dedicated experts), owned by the backend thread.
struct SessionFactory {
    environment: Environment,
    package: Arc<Package>,
    config: BackendConfig,
    cuda: bool,
}

impl SessionFactory {
    fn build(&self, model_bytes: &[u8]) -> Result<Session, String> {
        let mut builder = Session::builder(&self.environment)
            .map_err(|e| e.to_string())?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| e.to_string())?;
        if self.config.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(self.config.intra_op_threads)
                .map_err(|e| e.to_string())?;
        }
        if self.cuda {
            ep::CUDA::default()
                .with_device_id(self.config.cuda_device)
                .register(&mut builder)
                .map_err(|e| format!("CUDA execution provider: {e}"))?;
        }
        builder
            .commit_from_memory(model_bytes)
            .map_err(|e| format!("ONNX Runtime cannot load the model: {e}"))
    }

    /// The expert as a standalone model (weights and head baked in), built and run once.
    fn dedicated(
        &self,
        expert: &Expert,
        names: &Names,
        height: usize,
        width: usize,
    ) -> Result<Session, String> {
        let mut bake = Vec::with_capacity(expert.layers.len() + 2);
        for (name, tensor) in &expert.layers {
            let (shape, data) = tensor.extract_tensor();
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            bake.push((name.as_str(), dims, data));
        }
        let (head_shape, head_weight) = expert.head_weight.extract_tensor();
        let head_dims: Vec<usize> = head_shape.iter().map(|&d| d as usize).collect();
        let (_, head_bias) = expert.head_bias.extract_tensor();
        bake.push((names.head_weight.as_str(), head_dims, head_weight));
        bake.push((names.head_bias.as_str(), vec![expert.classes], head_bias));
        let bake: Vec<onnx::Bake<'_>> = bake
            .iter()
            .map(|(name, dims, data)| onnx::Bake { name, dims, data })
            .collect();
        let model = onnx::bake_initializers(&self.package.model_bytes, &bake)?;
        let mut session = self.build(&model)?;
        // First run allocates ORT's arenas: do it here, not on a client's request.
        let input = Tensor::from_array(([1, 3, height, width], vec![0.0f32; 3 * height * width]))
            .map_err(|e| e.to_string())?;
        session
            .run(vec![(names.input.as_str(), input)])
            .map_err(|e| format!("warm-up run: {e}"))?;
        Ok(session)
    }
}

impl Backend {
    /// Creates the shared session (blocking; call off the async runtime) and starts the backend thread.
    /// `admitted` tells the thread how many requests are in the server; it only waits for a batch to fill while
    /// more are on their way.
    pub fn start(
        environment: &Environment,
        package: Arc<Package>,
        config: BackendConfig,
        metrics: Metrics,
        admitted: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Result<Backend, String> {
        let mut factory = SessionFactory {
            environment: environment.clone(),
            package: package.clone(),
            config: config.clone(),
            cuda: false,
        };
        let (session, provider) = create_session(&mut factory)?;
        let spec = &package.manifest.model;
        let names = Names {
            input: spec.input_name.clone(),
            output: spec.output_name.clone(),
            head_weight: spec.head_weight_input.clone(),
            head_bias: spec.head_bias_input.clone(),
        };
        let (jobs, rx) = mpsc::channel();
        // Promotion threads answer on their own channel: if the worker held a sender of its job channel, that
        // channel would never close and the thread would outlive every handle.
        let (installer, installed) = mpsc::channel();
        let health = Arc::new(BackendHealth::default());
        health
            .running
            .store(true, std::sync::atomic::Ordering::Release);
        metrics.backend_up.set(1);
        let health_for_worker = health.clone();
        let guard = RunningGuard {
            health: health.clone(),
            metrics: metrics.clone(),
        };
        thread::Builder::new()
            .name("lorkd-backend".into())
            .spawn(move || {
                let _guard = guard;
                Worker {
                    shared: session,
                    dedicated: HashMap::new(),
                    building: HashSet::new(),
                    served: HashMap::new(),
                    factory: Arc::new(factory),
                    names,
                    metrics,
                    installer,
                    installed,
                    health: health_for_worker,
                }
                .run(rx, admitted)
            })
            .map_err(|e| format!("cannot start the backend thread: {e}"))?;
        Ok(Backend {
            jobs,
            health,
            provider,
        })
    }

    /// Runs `images` images (`input` = images x 3 x height x width floats) through `expert`.
    pub async fn infer(
        &self,
        expert: Arc<Expert>,
        input: Vec<f32>,
        images: usize,
        height: usize,
        width: usize,
    ) -> Result<InferOutput, String> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            expert,
            input,
            images,
            height,
            width,
            enqueued: Instant::now(),
            reply,
        };
        self.jobs
            .send(Message::Job(job))
            .map_err(|_| "backend thread is gone".to_string())?;
        answer
            .await
            .map_err(|_| "backend dropped the job".to_string())?
    }
}

fn create_session(factory: &mut SessionFactory) -> Result<(Session, &'static str), String> {
    let cuda_compiled = ep::CUDA::is_available().unwrap_or(false);
    let provider = factory.config.provider;
    let mut with = |cuda: bool| {
        factory.cuda = cuda;
        factory.build(&factory.package.model_bytes)
    };
    match provider {
        Provider::Cpu => Ok((with(false)?, "cpu")),
        Provider::Cuda if !cuda_compiled => Err("provider `cuda` requested, but the loaded ONNX Runtime library has no CUDA execution provider (the PyPI `onnxruntime` wheel is CPU-only; use `onnxruntime-gpu`, or provider cpu/auto)".into()),
        Provider::Cuda => Ok((with(true)?, "cuda")),
        Provider::Auto if !cuda_compiled => {
            tracing::info!("provider auto: the loaded ONNX Runtime has no CUDA execution provider; using CPU");
            Ok((with(false)?, "cpu"))
        }
        Provider::Auto => match with(true) {
            Ok(session) => Ok((session, "cuda")),
            Err(e) => {
                tracing::warn!(error = %e, "provider auto: CUDA unusable, falling back to CPU");
                Ok((with(false)?, "cpu"))
            }
        },
    }
}

fn same_expert(a: &Job, b: &Job) -> bool {
    Arc::ptr_eq(&a.expert, &b.expert)
}

struct Worker {
    shared: Session,
    /// task -> (expert version, its own session)
    dedicated: HashMap<String, (String, Box<Session>)>,
    building: HashSet<String>,
    /// Jobs served per task on the shared session (promotion counter).
    served: HashMap<String, u64>,
    factory: Arc<SessionFactory>,
    names: Names,
    metrics: Metrics,
    /// Given to promotion threads; they answer on `installed`, which the loop drains between batches.
    installer: mpsc::Sender<Message>,
    installed: mpsc::Receiver<Message>,
    health: Arc<BackendHealth>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Message>, admitted: Arc<dyn Fn() -> usize + Send + Sync>) {
        let max_images = self.factory.config.max_batch_size.max(1);
        let max_wait = self.factory.config.max_batch_wait;
        let mut pending: VecDeque<Job> = VecDeque::new();
        loop {
            while let Ok(message) = self.installed.try_recv() {
                self.handle(message);
            }
            let first = match pending.pop_front() {
                Some(job) => job,
                // Idle: wake now and then to install sessions that promotion threads finished meanwhile.
                None => match rx.recv_timeout(IDLE_POLL) {
                    Ok(Message::Job(job)) => job,
                    Ok(other) => {
                        self.handle(other);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    // Every handle dropped: the server is gone.
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
            };
            let mut batch = vec![first];
            let mut images = batch[0].images;
            // Jobs for the same expert that were set aside while an earlier batch formed.
            let mut i = 0;
            while i < pending.len() && images < max_images {
                if same_expert(&pending[i], &batch[0]) && images + pending[i].images <= max_images {
                    let job = pending.remove(i).expect("index checked");
                    images += job.images;
                    batch.push(job);
                } else {
                    i += 1;
                }
            }
            let deadline = Instant::now() + max_wait;
            while images < max_images {
                // Wait for the batch to fill only while more admitted requests are on their way.
                let others_in_flight = admitted() > batch.len() + pending.len();
                let next = if others_in_flight {
                    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                        .ok()
                } else {
                    rx.try_recv().ok()
                };
                let job = match next {
                    Some(Message::Job(job)) => job,
                    Some(other) => {
                        self.handle(other);
                        continue;
                    }
                    None => break,
                };
                if same_expert(&job, &batch[0]) && images + job.images <= max_images {
                    images += job.images;
                    batch.push(job);
                } else {
                    pending.push_back(job);
                }
            }
            // Clients that gave up (timeout, disconnect) are not worth running for.
            batch.retain(|job| !job.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            self.serve(batch);
        }
    }

    fn handle(&mut self, message: Message) {
        match message {
            Message::Job(_) => unreachable!("jobs are batched by the caller"),
            Message::Installed {
                task,
                version,
                session,
            } => {
                self.building.remove(&task);
                tracing::info!(task = %task, "expert promoted to a dedicated session");
                self.dedicated.insert(task, (version, session));
                self.metrics
                    .dedicated_sessions
                    .set(self.dedicated.len() as i64);
            }
            Message::BuildFailed { task } => {
                // Stays on the shared session; tried again after another `promote_after` requests.
                self.building.remove(&task);
                self.served.insert(task, 0);
            }
        }
    }

    fn serve(&mut self, batch: Vec<Job>) {
        let expert = batch[0].expert.clone();
        let dedicated = self
            .dedicated
            .get_mut(&expert.task)
            .filter(|(version, _)| *version == expert.version)
            .map(|(_, session)| session);
        let kind = if dedicated.is_some() {
            SessionKind::Dedicated
        } else {
            SessionKind::Shared
        };
        let mut kind = kind;
        let mut result = std::panic::catch_unwind(AssertUnwindSafe(|| match dedicated {
            Some(session) => run_batch(session, &self.names, &batch, false),
            None => run_batch(&mut self.shared, &self.names, &batch, true),
        }))
        .unwrap_or_else(|_| Err("inference panicked".to_string()));
        if kind == SessionKind::Dedicated && result.is_err() {
            // A dedicated session is an optimisation: drop it and answer from the shared session.
            tracing::warn!(task = %expert.task, error = ?result.as_ref().err(), "dedicated session failed; back to the shared session");
            self.dedicated.remove(&expert.task);
            self.metrics
                .dedicated_sessions
                .set(self.dedicated.len() as i64);
            kind = SessionKind::Shared;
            result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                run_batch(&mut self.shared, &self.names, &batch, true)
            }))
            .unwrap_or_else(|_| Err("inference panicked".to_string()));
        }
        let total: usize = batch.iter().map(|j| j.images).sum();
        let (height, width) = (batch[0].height, batch[0].width);
        let jobs = batch.len() as u64;
        let failures = &self.health.consecutive_failures;
        match &result {
            Ok(_) => failures.store(0, std::sync::atomic::Ordering::Release),
            Err(error) => {
                let now = failures.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
                self.metrics.inference_failures.inc();
                if now == UNHEALTHY_AFTER_FAILURES {
                    tracing::error!(%error, failures = now, "ONNX Runtime runs keep failing: reporting not ready");
                }
            }
        }
        match result {
            Ok((logits, run_seconds)) => {
                self.metrics.batch_size.observe(total as f64);
                self.metrics.inference_seconds.observe(run_seconds);
                let classes = expert.classes;
                let mut offset = 0;
                for job in batch {
                    let n = job.images * classes;
                    let output = InferOutput {
                        logits: logits[offset..offset + n].to_vec(),
                        queue_seconds: job.enqueued.elapsed().as_secs_f64() - run_seconds,
                        run_seconds,
                        batch_images: total,
                        session: kind,
                    };
                    offset += n;
                    let _ = job.reply.send(Ok(output));
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
        if kind == SessionKind::Shared && expert.promotable {
            let served = self.served.entry(expert.task.clone()).or_default();
            *served += jobs;
            let config = &self.factory.config;
            if *served >= config.promote_after
                && self.dedicated.len() + self.building.len() < config.dedicated_sessions
                && !self.building.contains(&expert.task)
            {
                self.promote(expert, height, width);
            }
        }
    }

    /// Builds the expert's own session on a helper thread; the shared session keeps serving it meanwhile.
    fn promote(&mut self, expert: Arc<Expert>, height: usize, width: usize) {
        self.building.insert(expert.task.clone());
        self.dedicated.remove(&expert.task); // an older version, if any
        let (factory, names, installer, metrics) = (
            self.factory.clone(),
            self.names.clone(),
            self.installer.clone(),
            self.metrics.clone(),
        );
        let spawned = thread::Builder::new().name("lorkd-promote".into()).spawn(move || {
            let started = Instant::now();
            let message = match factory.dedicated(&expert, &names, height, width) {
                Ok(session) => {
                    metrics.session_build_seconds.observe(started.elapsed().as_secs_f64());
                    metrics.promotions.with_label_values(&[&expert.task]).inc();
                    Message::Installed { task: expert.task.clone(), version: expert.version.clone(), session: Box::new(session) }
                }
                Err(error) => {
                    tracing::warn!(task = %expert.task, %error, "building a dedicated session failed");
                    Message::BuildFailed { task: expert.task.clone() }
                }
            };
            let _ = installer.send(message);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a promotion thread");
        }
    }
}

fn run_batch(
    session: &mut Session,
    names: &Names,
    batch: &[Job],
    feed_weights: bool,
) -> Result<(Vec<f32>, f64), String> {
    let expert = &batch[0].expert;
    let (height, width) = (batch[0].height, batch[0].width);
    let images: usize = batch.iter().map(|j| j.images).sum();
    let mut input = Vec::with_capacity(images * 3 * height * width);
    for job in batch {
        input.extend_from_slice(&job.input);
    }
    let input =
        Tensor::from_array(([images, 3, height, width], input)).map_err(|e| e.to_string())?;
    let mut inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(expert.layers.len() + 3);
    inputs.push((names.input.as_str().into(), (&input).into()));
    if feed_weights {
        inputs.push((
            names.head_weight.as_str().into(),
            (&expert.head_weight).into(),
        ));
        inputs.push((names.head_bias.as_str().into(), (&expert.head_bias).into()));
        for (name, value) in &expert.layers {
            inputs.push((name.as_str().into(), value.into()));
        }
    }
    let started = Instant::now();
    let outputs = session
        .run(inputs)
        .map_err(|e| format!("ONNX Runtime run failed: {e}"))?;
    let run_seconds = started.elapsed().as_secs_f64();
    let output = outputs
        .get(&names.output)
        .ok_or_else(|| format!("model has no output `{}`", names.output))?;
    let (shape, data) = output
        .try_extract_tensor::<f32>()
        .map_err(|e| format!("output `{}`: {e}", names.output))?;
    let expected = [images as i64, expert.classes as i64];
    if shape[..] != expected[..] {
        return Err(format!(
            "output `{}` has shape {:?}, expected {:?}",
            names.output,
            &shape[..],
            expected
        ));
    }
    Ok((data.to_vec(), run_seconds))
}
