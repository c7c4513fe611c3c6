//! ONNX Runtime sessions: building them for the configured provider, and running one batch on the merged path
//! (an assembled expert's weights fed to the shared graph, or baked into its own session) or the mixed path.

use std::{borrow::Cow, sync::Arc};

use ort::{
    environment::Environment,
    ep::{self, ExecutionProvider},
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue},
    value::TensorRef,
};

use super::{BackendConfig, Job};
use crate::{
    bank::RunBanks,
    config::Provider,
    expert::Expert,
    onnx,
    package::{EksSpec, Package},
};

/// Graph input and output names of the shared (merged) graph.
#[derive(Clone)]
pub struct Names {
    pub input: String,
    pub output: String,
    pub head_weight: String,
    pub head_bias: String,
}

impl Names {
    pub fn of(package: &Package) -> Names {
        let spec = &package.manifest.model;
        Names {
            input: spec.input_name.clone(),
            output: spec.output_name.clone(),
            head_weight: spec.head_weight_input.clone(),
            head_bias: spec.head_bias_input.clone(),
        }
    }
}

/// Builds sessions for the provider chosen at start-up; shared with the threads that build dedicated sessions.
pub struct SessionFactory {
    pub environment: Environment,
    pub package: Arc<Package>,
    pub config: BackendConfig,
    pub cuda: bool,
}

impl SessionFactory {
    pub fn build(&self, model_bytes: &[u8]) -> Result<Session, String> {
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

    /// The shared graph's session on the configured provider (`auto` falls back to CPU when CUDA is unusable);
    /// remembers the choice for every later session. Returns the provider's name.
    pub fn shared_session(&mut self) -> Result<(Session, &'static str), String> {
        let cuda_compiled = ep::CUDA::is_available().unwrap_or(false);
        let package = self.package.clone();
        let provider = self.config.provider;
        let mut with = |cuda: bool| {
            self.cuda = cuda;
            self.build(&package.model_bytes)
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

    /// The expert as a standalone model (weights and head baked in), built and run once.
    pub fn dedicated(
        &self,
        expert: &Expert,
        names: &Names,
        height: usize,
        width: usize,
    ) -> Result<Session, String> {
        let head_dims = [expert.classes, expert.feature_dim()];
        let head_bias_dims = [expert.classes];
        let mut bake: Vec<onnx::Bake<'_>> = expert
            .layers
            .iter()
            .map(|l| onnx::Bake {
                name: &l.name,
                dims: &l.shape,
                data: &l.data,
            })
            .collect();
        bake.push(onnx::Bake {
            name: &names.head_weight,
            dims: &head_dims,
            data: &expert.head_weight,
        });
        bake.push(onnx::Bake {
            name: &names.head_bias,
            dims: &head_bias_dims,
            data: &expert.head_bias,
        });
        let model = onnx::bake_initializers(&self.package.model_bytes, &bake)?;
        let mut session = self.build(&model)?;
        // First run allocates ORT's arenas: do it here, not on a client's request.
        let input = vec![0.0f32; 3 * height * width];
        let input = view([1, 3, height, width], &input)?;
        session
            .run(vec![(names.input.as_str(), input)])
            .map_err(|e| format!("warm-up run: {e}"))?;
        Ok(session)
    }
}

fn view<'a, const N: usize>(
    shape: [usize; N],
    data: &'a [f32],
) -> Result<SessionInputValue<'a>, String> {
    TensorRef::from_array_view((shape, data))
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// The images of `jobs`, one after another: the batch's input tensor data.
pub fn stack_inputs(jobs: &[Job]) -> Vec<f32> {
    let mut input = Vec::with_capacity(jobs.iter().map(|j| j.input.len()).sum());
    for job in jobs {
        input.extend_from_slice(&job.input);
    }
    input
}

/// Runs `input` (`images` images of the batch) through one assembled expert. `feed_weights`: the shared session
/// takes the weights as inputs; a dedicated session has them baked in. Returns `images x classes` logits.
pub fn run_merged(
    session: &mut Session,
    names: &Names,
    expert: &Expert,
    input: &[f32],
    images: usize,
    (height, width): (usize, usize),
    feed_weights: bool,
) -> Result<Vec<f32>, String> {
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        Vec::with_capacity(expert.layers.len() + 3);
    inputs.push((
        names.input.as_str().into(),
        view([images, 3, height, width], input)?,
    ));
    if feed_weights {
        inputs.push((
            names.head_weight.as_str().into(),
            view([expert.classes, expert.feature_dim()], &expert.head_weight)?,
        ));
        inputs.push((
            names.head_bias.as_str().into(),
            view([expert.classes], &expert.head_bias)?,
        ));
        for layer in &expert.layers {
            let tensor =
                TensorRef::from_array_view((layer.shape.as_slice(), layer.data.as_slice()))
                    .map_err(|e| e.to_string())?;
            inputs.push((layer.name.as_str().into(), tensor.into()));
        }
    }
    let outputs = session
        .run(inputs)
        .map_err(|e| format!("ONNX Runtime run failed: {e}"))?;
    logits(&outputs, &names.output, [images, expert.classes])
}

/// Runs `input` through the mixed-task graph: every image with its own expert's factors and head, gathered
/// from `banks`. Returns `images x banks.classes` logits (heads padded to the largest class count).
pub fn run_mixed(
    session: &mut Session,
    spec: &EksSpec,
    banks: &RunBanks,
    input: &[f32],
    (height, width): (usize, usize),
) -> Result<Vec<f32>, String> {
    let images = banks.rows_of_images.len();
    let features = banks.head_weight.len() / (banks.rows * banks.classes).max(1);
    let rows = TensorRef::from_array_view(([images], banks.rows_of_images.as_slice()))
        .map_err(|e| e.to_string())?;
    let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
        (
            spec.input_name.as_str().into(),
            view([images, 3, height, width], input)?,
        ),
        (spec.task_input.as_str().into(), rows.into()),
        (
            spec.bank_input.as_str().into(),
            view([banks.rows, spec.bank_width], &banks.factors)?,
        ),
        (
            spec.head_weight_input.as_str().into(),
            view([banks.rows, banks.classes, features], &banks.head_weight)?,
        ),
        (
            spec.head_bias_input.as_str().into(),
            view([banks.rows, banks.classes], &banks.head_bias)?,
        ),
    ];
    let outputs = session
        .run(inputs)
        .map_err(|e| format!("ONNX Runtime run failed (mixed graph): {e}"))?;
    logits(&outputs, &spec.output_name, [images, banks.classes])
}

fn logits(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
    expected: [usize; 2],
) -> Result<Vec<f32>, String> {
    let output = outputs
        .get(name)
        .ok_or_else(|| format!("model has no output `{name}`"))?;
    let (shape, data) = output
        .try_extract_tensor::<f32>()
        .map_err(|e| format!("output `{name}`: {e}"))?;
    let expected = expected.map(|d| d as i64);
    if shape[..] != expected[..] {
        return Err(format!(
            "output `{name}` has shape {:?}, expected {:?}",
            &shape[..],
            expected
        ));
    }
    Ok(data.to_vec())
}
