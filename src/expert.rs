//! An expert as the backend runs it: assembled weights for the merged path, factors for the mixed path, or both.

use std::sync::Arc;

use crate::{
    assembly::{merge_layer, merge_layer_into},
    package::{ExpertDeltas, ExpertEntry, Package},
};

/// One assembled layer: `W_t = W0 + dW_t` as a plain row-major buffer, fed to the shared session by name.
#[derive(Debug)]
pub struct Layer {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// An assembled expert: merged weights and head as plain buffers (ONNX Runtime tensors are views made per run).
#[derive(Debug)]
pub struct Expert {
    pub task: String,
    pub version: String,
    pub classes: usize,
    /// Every decomposed layer's `W_t`; empty for the plain base network.
    pub layers: Vec<Layer>,
    /// `[classes, feature_dim]`, row-major.
    pub head_weight: Vec<f32>,
    pub head_bias: Vec<f32>,
    /// Bytes of weights this expert holds (what the cache budget counts).
    pub bytes: usize,
    /// Whether the backend may promote it to a dedicated session (false for the warm-up base network).
    pub promotable: bool,
}

impl Expert {
    /// `layers` = `(graph input name, shape, W_t)`; `head_weight` = `(shape [classes, F], data)`.
    pub fn new(
        task: &str,
        version: &str,
        layers: Vec<(String, Vec<usize>, Vec<f32>)>,
        head_weight: (Vec<usize>, Vec<f32>),
        head_bias: Vec<f32>,
    ) -> Result<Expert, String> {
        let layers = layers
            .into_iter()
            .map(|(name, shape, data)| Layer { name, shape, data })
            .collect();
        Expert::from_layers(task, version, layers, head_weight, head_bias)
    }

    /// Like [`Expert::new`], with the layers already built (recycled buffers, merged in place).
    pub fn from_layers(
        task: &str,
        version: &str,
        layers: Vec<Layer>,
        head_weight: (Vec<usize>, Vec<f32>),
        head_bias: Vec<f32>,
    ) -> Result<Expert, String> {
        let classes = head_bias.len();
        for layer in &layers {
            if layer.shape.iter().product::<usize>() != layer.data.len() {
                return Err(format!(
                    "layer `{}`: {} values for shape {:?}",
                    layer.name,
                    layer.data.len(),
                    layer.shape
                ));
            }
        }
        if head_weight.0.len() != 2
            || head_weight.0[0] != classes
            || head_weight.0[1] * classes != head_weight.1.len()
        {
            return Err(format!(
                "head weight {:?} does not fit {classes} classes",
                head_weight.0
            ));
        }
        let bytes = (head_weight.1.len() + head_bias.len()) * 4
            + layers.iter().map(|l| l.data.len() * 4).sum::<usize>();
        Ok(Expert {
            task: task.to_string(),
            version: version.to_string(),
            classes,
            layers,
            head_weight: head_weight.1,
            head_bias,
            bytes,
            promotable: true,
        })
    }

    pub fn feature_dim(&self) -> usize {
        self.head_weight.len() / self.classes.max(1)
    }
}

/// What a job names: the expert's identity, and the forms it can run in. The mixed path needs `deltas`, the
/// merged path `assembled`; the backend's scheduler picks between the forms a batch's jobs have.
#[derive(Debug, Clone)]
pub struct Runnable {
    pub task: String,
    pub version: String,
    pub classes: usize,
    pub deltas: Option<Arc<ExpertDeltas>>,
    pub assembled: Option<Arc<Expert>>,
}

impl Runnable {
    /// A registry entry, with its assembled form when the cache had it.
    pub fn from_entry(entry: &ExpertEntry, assembled: Option<Arc<Expert>>) -> Runnable {
        Runnable {
            task: entry.spec.id.clone(),
            version: entry.version.clone().unwrap_or_default(),
            classes: entry.spec.num_classes,
            deltas: entry.deltas.clone(),
            assembled,
        }
    }

    /// Whether two jobs are for the same expert (same task and version).
    pub fn same_expert(&self, other: &Runnable) -> bool {
        self.task == other.task && self.version == other.version
    }
}

impl From<Arc<Expert>> for Runnable {
    fn from(expert: Arc<Expert>) -> Runnable {
        Runnable {
            task: expert.task.clone(),
            version: expert.version.clone(),
            classes: expert.classes,
            deltas: None,
            assembled: Some(expert),
        }
    }
}

/// Builds `entry`'s expert from the package: `W0 + scale * B @ A` for every layer, plus its head. Merges into
/// `recycled` (an evicted expert's layers of this package) in place when given and shaped alike; fresh buffers
/// otherwise. Heads differ in size between tasks and are always allocated fresh.
pub fn assemble_entry(
    package: &Package,
    entry: &ExpertEntry,
    recycled: Option<Vec<Layer>>,
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
        for ((base, (a, b)), layer) in package
            .layers
            .iter()
            .zip(&deltas.factors)
            .zip(layers.iter_mut())
        {
            merge_layer_into(base.shape, &base.w0, b, a, deltas.scale, &mut layer.data)
                .map_err(|e| format!("layer `{}`: {e}", base.name))?;
            layer.name.clone_from(&base.name);
        }
        return Expert::from_layers(task, &version, layers, head, deltas.head_bias.clone());
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
fn fits(package: &Package, layers: &[Layer]) -> bool {
    layers.len() == package.layers.len()
        && package
            .layers
            .iter()
            .zip(layers)
            .all(|(base, layer)| layer.shape[..] == base.shape.weight_shape()[..])
}
