//! Loads and verifies a lorkd package (models/FORMAT.md v1): manifest, checksums, shared weights W0, expert deltas.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use safetensors::{tensor::Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{assembly::LayerShape, bank::BankLayout, onnx};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub model: ModelSpec,
    pub input: InputSpec,
    pub lora: LoraSpec,
    pub layers: Vec<LayerSpec>,
    pub tasks: Vec<TaskSpec>,
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub provenance: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSpec {
    pub file: String,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub opset: Option<u32>,
    pub input_name: String,
    pub output_name: String,
    pub head_weight_input: String,
    pub head_bias_input: String,
    pub feature_dim: usize,
    #[serde(default)]
    pub parameters: Option<u64>,
    #[serde(default)]
    pub flops: Option<u64>,
    /// The optional mixed-task graph (FORMAT.md section 8); absent in packages made before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eks: Option<EksSpec>,
}

/// `manifest.model.eks`: the mixed-task graph's file, its input and output names, and the bank row layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EksSpec {
    pub file: String,
    pub input_name: String,
    /// int64 `[batch]`: each image's bank row.
    pub task_input: String,
    /// float32 `[rows, bank_width]`.
    pub bank_input: String,
    /// float32 `[rows, classes, feature_dim]`.
    pub head_weight_input: String,
    /// float32 `[rows, classes]`.
    pub head_bias_input: String,
    pub output_name: String,
    pub rank: usize,
    pub bank_width: usize,
    pub segments: Vec<EksSegment>,
}

/// Where one factor of one layer sits in a bank row (row-major `[rows, cols]` from `offset`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EksSegment {
    pub layer: String,
    pub factor: Factor,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Factor {
    A,
    B,
}

/// The loaded mixed-task graph: its bytes and the checked bank layout.
#[derive(Debug)]
pub struct EksModel {
    pub spec: EksSpec,
    pub model_bytes: Vec<u8>,
    pub layout: BankLayout,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    #[serde(default)]
    pub layout: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kernel: usize,
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub modality: String,
    pub labels: Vec<String>,
    pub num_classes: usize,
    pub file: String,
    pub input: TaskInput,
    #[serde(default)]
    pub metrics: serde_json::Value,
}

/// What a task's images must become before the graph's `input` (FORMAT.md section 4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskInput {
    /// 1: grey task (luma, replicated to 3 channels); 3: RGB task.
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// One decomposed layer: its name, shapes and the shared weights W0 (BatchNorm folded).
#[derive(Debug)]
pub struct BaseLayer {
    pub name: String,
    pub shape: LayerShape,
    pub w0: Vec<f32>,
}

/// A task's verified low-rank factors and head, as stored in `experts/<task>.safetensors`.
#[derive(Debug)]
pub struct ExpertDeltas {
    pub scale: f32,
    /// `(A, B)` per layer, in `manifest.layers` order.
    pub factors: Vec<(Vec<f32>, Vec<f32>)>,
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
}

impl ExpertDeltas {
    pub fn parameter_count(&self) -> usize {
        self.factors
            .iter()
            .map(|(a, b)| a.len() + b.len())
            .sum::<usize>()
            + self.head_weight.len()
            + self.head_bias.len()
    }
}

/// Whether an expert can serve.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ExpertStatus {
    Available,
    Disabled { reason: String },
}

#[derive(Debug, Clone)]
pub struct ExpertEntry {
    pub spec: TaskSpec,
    pub status: ExpertStatus,
    /// `expert_version` of FORMAT.md (16 hex chars); None when the file could not be hashed.
    pub version: Option<String>,
    pub deltas: Option<Arc<ExpertDeltas>>,
}

/// A loaded, verified package. Immutable after load.
#[derive(Debug)]
pub struct Package {
    pub root: PathBuf,
    pub manifest: Manifest,
    pub model_bytes: Vec<u8>,
    pub model_sha256: String,
    pub layers: Vec<BaseLayer>,
    /// Declared dims of the graph's image input (what a task's input size must fit).
    pub graph_input: Option<Vec<onnx::Dim>>,
    /// The experts as loaded from the manifest. What is served is `state.experts` (the registry), which starts
    /// from these and follows the admin API.
    pub experts: BTreeMap<String, ExpertEntry>,
    /// The mixed-task graph, when the package has one and it fits the package (else a warning says why).
    pub eks: Option<EksModel>,
    /// Problems that do not stop serving (e.g. a golden file with a wrong checksum).
    pub warnings: Vec<String>,
}

/// The package cannot be served at all (bad manifest or shared model).
#[derive(Debug, thiserror::Error)]
#[error("package {path}: {message}")]
pub struct PackageError {
    pub path: String,
    pub message: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `first 16 hex chars of sha256(sha256(student.onnx) || ":" || sha256(expert file))` (FORMAT.md).
pub fn expert_version(model_sha256: &str, expert_sha256: &str) -> String {
    sha256_hex(format!("{model_sha256}:{expert_sha256}").as_bytes())[..16].to_string()
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`
pub fn valid_task_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// A `files` key must stay inside the package folder.
fn safe_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

impl Package {
    pub fn load(root: impl AsRef<Path>) -> Result<Package, PackageError> {
        let root = root.as_ref().to_path_buf();
        let fail = |message: String| PackageError {
            path: root.display().to_string(),
            message,
        };

        let manifest_path = root.join("manifest.json");
        let manifest_bytes = std::fs::read(&manifest_path)
            .map_err(|e| fail(format!("cannot read manifest.json: {e}")))?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| fail(format!("manifest.json does not follow the format: {e}")))?;
        if manifest.format != "lorkd-package" || manifest.format_version != 1 {
            return Err(fail(format!(
                "manifest format is `{}` version {}, this server reads `lorkd-package` version 1",
                manifest.format, manifest.format_version
            )));
        }
        if manifest.lora.rank == 0 || !manifest.lora.scale.is_finite() {
            return Err(fail(
                "manifest lora.rank must be positive and lora.scale finite".into(),
            ));
        }
        let layer_shapes = manifest
            .layers
            .iter()
            .map(|l| layer_shape(l, manifest.lora.rank))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fail)?;

        // The shared model: any problem here makes the package unusable.
        let model_file = manifest.model.file.clone();
        let expected = manifest.files.get(&model_file).ok_or_else(|| {
            fail(format!(
                "shared model `{model_file}` is not listed in manifest files"
            ))
        })?;
        if !safe_relative(&model_file) {
            return Err(fail(format!(
                "shared model path `{model_file}` leaves the package folder"
            )));
        }
        let model_bytes = std::fs::read(root.join(&model_file))
            .map_err(|e| fail(format!("cannot read shared model `{model_file}`: {e}")))?;
        let model_sha256 = sha256_hex(&model_bytes);
        if !model_sha256.eq_ignore_ascii_case(expected) {
            return Err(fail(format!("shared model `{model_file}` has sha256 {model_sha256}, manifest lists {expected}: refusing to serve a modified model")));
        }
        let names: Vec<&str> = manifest.layers.iter().map(|l| l.name.as_str()).collect();
        let info = onnx::read_model(&model_bytes, &names)
            .map_err(|e| fail(format!("shared model `{model_file}`: {e}")))?;
        let required_inputs = [
            &manifest.model.input_name,
            &manifest.model.head_weight_input,
            &manifest.model.head_bias_input,
        ];
        for name in required_inputs
            .into_iter()
            .chain(manifest.layers.iter().map(|l| &l.name))
        {
            if !info.input_names.iter().any(|n| n == name) {
                return Err(fail(format!(
                    "shared model `{model_file}` has no graph input `{name}`"
                )));
            }
        }
        let mut initializers = info.initializers;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (spec, shape) in manifest.layers.iter().zip(&layer_shapes) {
            let tensor = initializers.remove(&spec.name).ok_or_else(|| {
                fail(format!(
                    "shared model has no initializer (W0) for layer `{}`",
                    spec.name
                ))
            })?;
            if tensor.dims != shape.weight_shape() {
                return Err(fail(format!(
                    "W0 of `{}` has shape {:?}, manifest says {:?}",
                    spec.name, tensor.dims, spec.shape
                )));
            }
            layers.push(BaseLayer {
                name: spec.name.clone(),
                shape: *shape,
                w0: tensor.data,
            });
        }

        // Every other listed file is verified; only expert files matter for serving.
        let mut warnings = Vec::new();
        let expert_files: HashSet<&str> = manifest.tasks.iter().map(|t| t.file.as_str()).collect();
        let eks = match &manifest.model.eks {
            None => None,
            Some(spec) => match load_eks(&root, &manifest, spec, &layers) {
                Ok(eks) => Some(eks),
                Err(reason) => {
                    warnings.push(format!("mixed-task graph not used: {reason}"));
                    None
                }
            },
        };
        let eks_file = manifest.model.eks.as_ref().map(|e| e.file.as_str());
        for (path, expected) in &manifest.files {
            if path == &model_file
                || expert_files.contains(path.as_str())
                || Some(path.as_str()) == eks_file
            {
                continue;
            }
            if !safe_relative(path) {
                warnings.push(format!("file `{path}` leaves the package folder; not read"));
                continue;
            }
            match std::fs::read(root.join(path)) {
                Ok(bytes) if sha256_hex(&bytes).eq_ignore_ascii_case(expected) => {}
                Ok(_) => warnings.push(format!("file `{path}` does not match its sha256")),
                Err(e) => {
                    tracing::warn!(file = %path, error = %e, "package file cannot be read");
                    warnings.push(format!("file `{path}` cannot be read"))
                }
            }
        }

        let mut experts = BTreeMap::new();
        for spec in &manifest.tasks {
            if !valid_task_id(&spec.id) {
                warnings.push(format!(
                    "task id `{}` is not valid (^[a-z0-9][a-z0-9_-]{{0,63}}$); skipped",
                    spec.id
                ));
                continue;
            }
            if experts.contains_key(&spec.id) {
                warnings.push(format!(
                    "task id `{}` appears twice; the second is skipped",
                    spec.id
                ));
                continue;
            }
            let graph_input = info.input_dims.get(&manifest.model.input_name);
            let entry = load_expert(
                &root,
                &manifest,
                &layer_shapes,
                &model_sha256,
                graph_input.map(Vec::as_slice),
                spec,
            );
            experts.insert(spec.id.clone(), entry);
        }
        let graph_input = info.input_dims.get(&manifest.model.input_name).cloned();
        Ok(Package {
            root,
            manifest,
            model_bytes,
            model_sha256,
            layers,
            graph_input,
            experts,
            eks,
            warnings,
        })
    }

    pub fn expert(&self, task: &str) -> Option<&ExpertEntry> {
        self.experts.get(task)
    }

    /// Bytes of one assembled expert's decomposed layers (f32 weights of every `W_t`): what an assembly allocates.
    pub fn expert_weight_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.shape.weight_shape().iter().product::<usize>() as u64 * 4)
            .sum()
    }

    /// Verifies an expert file that is not (yet) part of the package against this package's shared model, with
    /// the same rules as loading (task id, spec, input size, tensor names and shapes, scale, finite values).
    /// Returns the servable entry and the file's sha256. The error is a client-facing message (no paths).
    pub fn verify_expert(
        &self,
        spec: &TaskSpec,
        bytes: &[u8],
    ) -> Result<(ExpertEntry, String), String> {
        if !valid_task_id(&spec.id) {
            return Err(format!(
                "task id `{}` is not valid (^[a-z0-9][a-z0-9_-]{{0,63}}$)",
                spec.id
            ));
        }
        check_task_spec(spec)?;
        onnx::check_image_input(
            self.graph_input.as_deref(),
            spec.input.height,
            spec.input.width,
        )?;
        let shapes: Vec<LayerShape> = self.layers.iter().map(|l| l.shape).collect();
        let deltas = parse_expert(bytes, &self.manifest, &shapes, spec)?;
        let sha = sha256_hex(bytes);
        Ok((
            ExpertEntry {
                spec: spec.clone(),
                status: ExpertStatus::Available,
                version: Some(expert_version(&self.model_sha256, &sha)),
                deltas: Some(Arc::new(deltas)),
            },
            sha,
        ))
    }
}

/// Reads and checks the mixed-task graph: listed and matching its sha256, inside the package, the names the
/// manifest gives among its inputs, and a bank layout that fits the layers. The error names no paths.
fn load_eks(
    root: &Path,
    manifest: &Manifest,
    spec: &EksSpec,
    layers: &[BaseLayer],
) -> Result<EksModel, String> {
    let file = &spec.file;
    if !safe_relative(file) {
        return Err(format!("`{file}` leaves the package folder"));
    }
    let expected = manifest
        .files
        .get(file)
        .ok_or_else(|| format!("`{file}` is not listed in manifest files"))?;
    let model_bytes = std::fs::read(root.join(file)).map_err(|e| {
        tracing::warn!(file = %file, error = %e, "mixed-task graph cannot be read");
        format!("`{file}` cannot be read")
    })?;
    if !sha256_hex(&model_bytes).eq_ignore_ascii_case(expected) {
        return Err(format!("`{file}` does not match its sha256"));
    }
    let info = onnx::read_model(&model_bytes, &[])?;
    for name in [
        &spec.input_name,
        &spec.task_input,
        &spec.bank_input,
        &spec.head_weight_input,
        &spec.head_bias_input,
    ] {
        if !info.input_names.iter().any(|n| n == name) {
            return Err(format!("`{file}` has no graph input `{name}`"));
        }
    }
    let layout = BankLayout::new(spec, layers, manifest.lora.rank)?;
    Ok(EksModel {
        spec: spec.clone(),
        model_bytes,
        layout,
    })
}

fn layer_shape(spec: &LayerSpec, rank: usize) -> Result<LayerShape, String> {
    let [cout, cin, kh, kw] = spec.shape[..] else {
        return Err(format!(
            "layer `{}` shape {:?} is not [Cout, Cin, k, k]",
            spec.name, spec.shape
        ));
    };
    if kh != kw || kh != spec.kernel || kh == 0 {
        return Err(format!(
            "layer `{}` kernel {} does not match shape {:?}",
            spec.name, spec.kernel, spec.shape
        ));
    }
    let shape = LayerShape {
        out_channels: cout,
        in_channels: cin,
        kernel: kh,
        rank_k: rank * kh,
    };
    if spec.a_shape[..] != shape.a_shape() || spec.b_shape[..] != shape.b_shape() {
        return Err(format!(
            "layer `{}` factor shapes A {:?} B {:?} do not match rank {rank} (expected A {:?} B {:?})",
            spec.name,
            spec.a_shape,
            spec.b_shape,
            shape.a_shape(),
            shape.b_shape()
        ));
    }
    Ok(shape)
}

fn load_expert(
    root: &Path,
    manifest: &Manifest,
    shapes: &[LayerShape],
    model_sha256: &str,
    graph_input: Option<&[onnx::Dim]>,
    spec: &TaskSpec,
) -> ExpertEntry {
    let mut version = None;
    let result = (|| -> Result<ExpertDeltas, String> {
        check_task_spec(spec)?;
        // A task whose images the graph cannot take would load and then fail every request: disable it here.
        onnx::check_image_input(graph_input, spec.input.height, spec.input.width)?;
        let expected = manifest.files.get(&spec.file).ok_or_else(|| {
            format!(
                "expert file `{}` is not listed in manifest files",
                spec.file
            )
        })?;
        if !safe_relative(&spec.file) {
            return Err(format!(
                "expert file `{}` leaves the package folder",
                spec.file
            ));
        }
        // The OS error stays in the log: disabled reasons are shown to clients (`/v1/experts`).
        let bytes = std::fs::read(root.join(&spec.file)).map_err(|e| {
            tracing::warn!(task = %spec.id, file = %spec.file, error = %e, "cannot read expert file");
            format!("cannot read expert file `{}`", spec.file)
        })?;
        let sha = sha256_hex(&bytes);
        if !sha.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "expert file `{}` has sha256 {sha}, manifest lists {expected}",
                spec.file
            ));
        }
        version = Some(expert_version(model_sha256, &sha));
        parse_expert(&bytes, manifest, shapes, spec)
    })();
    match result {
        Ok(deltas) => ExpertEntry {
            spec: spec.clone(),
            status: ExpertStatus::Available,
            version,
            deltas: Some(Arc::new(deltas)),
        },
        Err(reason) => {
            tracing::warn!(task = %spec.id, %reason, "expert disabled");
            ExpertEntry {
                spec: spec.clone(),
                status: ExpertStatus::Disabled { reason },
                version,
                deltas: None,
            }
        }
    }
}

fn check_task_spec(spec: &TaskSpec) -> Result<(), String> {
    if spec.labels.len() != spec.num_classes || spec.num_classes == 0 {
        return Err(format!(
            "task has {} labels but num_classes {}",
            spec.labels.len(),
            spec.num_classes
        ));
    }
    let input = &spec.input;
    if !matches!(input.channels, 1 | 3) || input.height == 0 || input.width == 0 {
        return Err(format!(
            "task input spec {input:?} is not supported (channels 1 or 3, positive size)"
        ));
    }
    if input.std.iter().any(|s| !s.is_finite() || *s == 0.0)
        || input.mean.iter().any(|m| !m.is_finite())
    {
        return Err("task input mean/std must be finite and std non-zero".into());
    }
    Ok(())
}

fn parse_expert(
    bytes: &[u8],
    manifest: &Manifest,
    shapes: &[LayerShape],
    spec: &TaskSpec,
) -> Result<ExpertDeltas, String> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| meta.get(key).map(String::as_str).unwrap_or("");
    if field("format") != "lorkd-expert" || field("format_version") != "1" {
        return Err(format!(
            "metadata format is `{}` version `{}`, expected `lorkd-expert` version 1",
            field("format"),
            field("format_version")
        ));
    }
    if field("task") != spec.id {
        return Err(format!(
            "file is for task `{}`, manifest says `{}`",
            field("task"),
            spec.id
        ));
    }
    let scale: f64 = field("scale")
        .parse()
        .map_err(|_| format!("metadata scale `{}` is not a number", field("scale")))?;
    if (scale - manifest.lora.scale).abs() > 1e-6 * manifest.lora.scale.abs().max(1.0) {
        return Err(format!(
            "metadata scale {scale} differs from manifest lora.scale {}",
            manifest.lora.scale
        ));
    }
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
        let view = tensors
            .tensor(name)
            .map_err(|_| format!("tensor `{name}` is missing"))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor `{name}` is {:?}, expected F32",
                view.dtype()
            ));
        }
        if view.shape() != shape {
            return Err(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                view.shape()
            ));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("tensor `{name}` holds NaN or infinite values"));
        }
        Ok(values)
    };
    let mut factors = Vec::with_capacity(shapes.len());
    for (layer, shape) in manifest.layers.iter().zip(shapes) {
        let a = read(&format!("{}.lora_A", layer.name), &shape.a_shape())?;
        let b = read(&format!("{}.lora_B", layer.name), &shape.b_shape())?;
        factors.push((a, b));
    }
    let head_weight = read(
        "head.weight",
        &[spec.num_classes, manifest.model.feature_dim],
    )?;
    let head_bias = read("head.bias", &[spec.num_classes])?;
    Ok(ExpertDeltas {
        scale: scale as f32,
        factors,
        head_weight,
        head_bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_follow_the_format() {
        for ok in ["breast", "a", "0x", "derma-2_b"] {
            assert!(valid_task_id(ok), "{ok}");
        }
        for bad in ["", "Breast", "-x", "_x", "a/b", "a.b", &"x".repeat(65)] {
            assert!(!valid_task_id(bad), "{bad}");
        }
    }

    #[test]
    fn expert_version_is_sixteen_hex_of_the_joined_digests() {
        let v = expert_version("aa", "bb");
        assert_eq!(v, sha256_hex(b"aa:bb")[..16]);
        assert_eq!(v.len(), 16);
        assert_ne!(v, expert_version("aa", "bc"));
    }

    #[test]
    fn paths_must_stay_inside_the_package() {
        assert!(safe_relative("experts/a.safetensors"));
        assert!(!safe_relative("../x"));
        assert!(!safe_relative("/etc/passwd"));
        assert!(!safe_relative(""));
    }

    #[test]
    fn layer_shapes_are_checked_against_rank() {
        let spec = LayerSpec {
            name: "c".into(),
            shape: vec![24, 3, 3, 3],
            kernel: 3,
            a_shape: vec![12, 9],
            b_shape: vec![72, 12],
        };
        let shape = layer_shape(&spec, 4).unwrap();
        assert_eq!(shape.rank_k, 12);
        assert!(layer_shape(&spec, 2).is_err());
    }
}
