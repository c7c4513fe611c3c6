//! ONNX Runtime: the one process-wide environment, the execution provider choice, and the batching backend thread
//! that owns the session and answers inference jobs through channels.

use std::{
    collections::VecDeque,
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

use crate::{config::Provider, metrics::Metrics, package::Package};

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

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
}

impl Expert {
    pub fn new(
        task: &str,
        version: &str,
        layers: Vec<(String, Vec<usize>, Vec<f32>)>,
        head_weight: (Vec<usize>, Vec<f32>),
        head_bias: Vec<f32>,
    ) -> Result<Expert, String> {
        let mut bytes = (head_weight.1.len() + head_bias.len()) * 4;
        let classes = head_bias.len();
        let layers = layers
            .into_iter()
            .map(|(name, shape, data)| {
                bytes += data.len() * 4;
                Tensor::from_array((shape, data))
                    .map(|t| (name, t))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Expert {
            task: task.to_string(),
            version: version.to_string(),
            classes,
            layers,
            head_weight: Tensor::from_array(head_weight).map_err(|e| e.to_string())?,
            head_bias: Tensor::from_array((vec![classes], head_bias)).map_err(|e| e.to_string())?,
            bytes,
        })
    }
}

/// Settings of the backend thread.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub provider: Provider,
    pub cuda_device: i32,
    pub intra_op_threads: usize,
    pub max_batch_size: usize,
    pub max_batch_wait: Duration,
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

/// Handle to the backend thread. Cloning is cheap; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Backend {
    jobs: mpsc::Sender<Job>,
    /// `cpu` or `cuda`: what the session actually runs on.
    pub provider: &'static str,
}

struct Names {
    input: String,
    output: String,
    head_weight: String,
    head_bias: String,
}

impl Backend {
    /// Creates the shared session (blocking; call off the async runtime) and starts the backend thread.
    /// `admitted` tells the thread how many requests are in the server; it only waits for a batch to fill while
    /// more are on their way.
    pub fn start(
        environment: &Environment,
        package: &Package,
        config: BackendConfig,
        metrics: Metrics,
        admitted: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Result<Backend, String> {
        let (session, provider) = create_session(environment, package, &config)?;
        let spec = &package.manifest.model;
        let names = Names {
            input: spec.input_name.clone(),
            output: spec.output_name.clone(),
            head_weight: spec.head_weight_input.clone(),
            head_bias: spec.head_bias_input.clone(),
        };
        let (jobs, rx) = mpsc::channel();
        thread::Builder::new()
            .name("lorkd-backend".into())
            .spawn(move || worker(session, names, rx, config, metrics, admitted))
            .map_err(|e| format!("cannot start the backend thread: {e}"))?;
        Ok(Backend { jobs, provider })
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
            .send(job)
            .map_err(|_| "backend thread is gone".to_string())?;
        answer
            .await
            .map_err(|_| "backend dropped the job".to_string())?
    }
}

fn create_session(
    environment: &Environment,
    package: &Package,
    config: &BackendConfig,
) -> Result<(Session, &'static str), String> {
    let build = |cuda: bool| -> Result<Session, String> {
        let mut builder = Session::builder(environment)
            .map_err(|e| e.to_string())?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| e.to_string())?;
        if config.intra_op_threads > 0 {
            builder = builder
                .with_intra_threads(config.intra_op_threads)
                .map_err(|e| e.to_string())?;
        }
        if cuda {
            ep::CUDA::default()
                .with_device_id(config.cuda_device)
                .register(&mut builder)
                .map_err(|e| format!("CUDA execution provider: {e}"))?;
        }
        builder
            .commit_from_memory(&package.model_bytes)
            .map_err(|e| format!("ONNX Runtime cannot load the shared model: {e}"))
    };
    let cuda_compiled = ep::CUDA::is_available().unwrap_or(false);
    match config.provider {
        Provider::Cpu => Ok((build(false)?, "cpu")),
        Provider::Cuda if !cuda_compiled => Err("provider `cuda` requested, but the loaded ONNX Runtime library has no CUDA execution provider (the PyPI `onnxruntime` wheel is CPU-only; use `onnxruntime-gpu`, or provider cpu/auto)".into()),
        Provider::Cuda => Ok((build(true)?, "cuda")),
        Provider::Auto if !cuda_compiled => {
            tracing::info!("provider auto: the loaded ONNX Runtime has no CUDA execution provider; using CPU");
            Ok((build(false)?, "cpu"))
        }
        Provider::Auto => match build(true) {
            Ok(session) => Ok((session, "cuda")),
            Err(e) => {
                tracing::warn!(error = %e, "provider auto: CUDA unusable, falling back to CPU");
                Ok((build(false)?, "cpu"))
            }
        },
    }
}

fn same_expert(a: &Job, b: &Job) -> bool {
    Arc::ptr_eq(&a.expert, &b.expert)
}

fn worker(
    mut session: Session,
    names: Names,
    rx: mpsc::Receiver<Job>,
    config: BackendConfig,
    metrics: Metrics,
    admitted: Arc<dyn Fn() -> usize + Send + Sync>,
) {
    let max_images = config.max_batch_size.max(1);
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match pending.pop_front() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // every handle dropped: the server is gone
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
        let deadline = Instant::now() + config.max_batch_wait;
        while images < max_images {
            // Wait for the batch to fill only while more admitted requests are on their way.
            let others_in_flight = admitted() > batch.len() + pending.len();
            let next = if others_in_flight {
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok()
            } else {
                rx.try_recv().ok()
            };
            let Some(job) = next else { break };
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
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_batch(&mut session, &names, &batch)));
        let result = result.unwrap_or_else(|_| Err("inference panicked".to_string()));
        match result {
            Ok((logits, run_seconds)) => {
                let total: usize = batch.iter().map(|j| j.images).sum();
                metrics.batch_size.observe(total as f64);
                metrics.inference_seconds.observe(run_seconds);
                let classes = batch[0].expert.classes;
                let mut offset = 0;
                for job in batch {
                    let n = job.images * classes;
                    let output = InferOutput {
                        logits: logits[offset..offset + n].to_vec(),
                        queue_seconds: job.enqueued.elapsed().as_secs_f64() - run_seconds,
                        run_seconds,
                        batch_images: total,
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
    }
}

fn run_batch(
    session: &mut Session,
    names: &Names,
    batch: &[Job],
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
    inputs.push((
        names.head_weight.as_str().into(),
        (&expert.head_weight).into(),
    ));
    inputs.push((names.head_bias.as_str().into(), (&expert.head_bias).into()));
    for (name, value) in &expert.layers {
        inputs.push((name.as_str().into(), value.into()));
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
