//! Native JSON API: expert listing, predict on an image, server info.

use std::time::Instant;

use axum::{
    extract::{Path, RawQuery, Request, State},
    http::header,
    Json,
};
use serde::Serialize;
use serde_json::{json, Value};

use super::{bad_multipart, check_content_length, multipart_of, read_body, softmax};
use crate::{
    error::ApiError,
    package::{ExpertEntry, ExpertStatus},
    preprocess::{self, InputInfo, PrepareOptions, PreprocessError, VoiFunction, Window},
    runtime::{ExecutionPath, SessionKind},
    state::AppState,
};

/// Labels returned when `top_k` is not given.
pub const DEFAULT_TOP_K: usize = 3;

pub(crate) fn expert_view(state: &AppState, entry: &ExpertEntry) -> Value {
    let manifest = &state.package.manifest;
    let spec = &entry.spec;
    let (status, reason) = match &entry.status {
        ExpertStatus::Available => ("available", None),
        ExpertStatus::Disabled { reason } => ("disabled", Some(reason.clone())),
    };
    let delta_parameters = entry.deltas.as_ref().map(|d| {
        d.factors
            .iter()
            .map(|(a, b)| a.len() + b.len())
            .sum::<usize>()
    });
    let head_parameters = spec.num_classes * (manifest.model.feature_dim + 1);
    json!({
        "id": spec.id,
        "name": spec.name,
        "modality": spec.modality,
        "labels": spec.labels,
        "num_classes": spec.num_classes,
        "input": spec.input,
        "version": entry.version,
        "status": status,
        "disabled_reason": reason,
        "rank": manifest.lora.rank,
        "alpha": manifest.lora.alpha,
        "scale": manifest.lora.scale,
        "parameters": {
            "shared": manifest.model.parameters,
            "delta": delta_parameters,
            "head": head_parameters,
        },
        "metrics": spec.metrics,
        "cache": state.cache.state(&spec.id),
    })
}

pub async fn list_experts(State(state): State<AppState>) -> Json<Value> {
    let experts: Vec<Value> = state
        .experts
        .snapshot()
        .values()
        .map(|e| expert_view(&state, e))
        .collect();
    Json(json!({ "package": state.package.manifest.name, "experts": experts }))
}

pub async fn get_expert(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let entry = state
        .experts
        .get(&task)
        .ok_or_else(|| ApiError::NotFound(format!("no expert for task `{task}`")))?;
    Ok(Json(expert_view(&state, &entry)))
}

pub async fn info(State(state): State<AppState>) -> Json<Value> {
    let package = &state.package;
    let manifest = &package.manifest;
    let (available, disabled) = state.experts.counts();
    Json(json!({
        "service": {"name": "lorkd", "version": env!("CARGO_PKG_VERSION"), "ready": state.is_ready(), "uptime_seconds": state.started.elapsed().as_secs_f64()},
        "package": {
            "name": manifest.name,
            "description": manifest.description,
            "format_version": manifest.format_version,
            "arch": manifest.model.arch,
            "model_sha256": package.model_sha256,
            "parameters": manifest.model.parameters,
            "flops": manifest.model.flops,
            "decomposed_layers": manifest.layers.len(),
            "lora": manifest.lora,
            "experts": {"total": available + disabled, "available": available, "disabled": disabled},
            "warnings": package.warnings,
        },
        "runtime": {
            "provider": state.backend.provider,
            "requested_provider": state.config.provider,
            "onnxruntime_version": crate::runtime::ORT_VERSION,
            "execution": state.backend.execution,
            "requested_execution": state.config.execution,
            "mixed_graph": package.eks.as_ref().map(|e| e.spec.file.as_str()),
            "dedicated_sessions": state.metrics.dedicated_sessions.get(),
        },
        "cache": {"budget_bytes": state.cache.budget(), "resident_bytes": state.cache.resident_bytes()},
        "request_memory": {"budget_bytes": state.memory.total_bytes(), "in_use_bytes": state.memory.in_use_bytes()},
        "memory_plan": state.memory_plan.to_json(),
        "authentication": if state.api_keys.enabled() { "api_keys" } else { "off" },
        "config": state.config,
    }))
}

#[derive(Debug, Serialize)]
pub struct Label {
    pub index: usize,
    pub label: String,
    pub probability: f64,
}

#[derive(Debug, Serialize)]
pub struct Timings {
    pub decode_ms: f64,
    pub expert_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub total_ms: f64,
}

/// The answer for one image: labels, logits and what was used of the image.
#[derive(Debug, Serialize)]
pub struct ImageResult {
    pub predictions: Vec<Label>,
    pub logits: Vec<f32>,
    pub input: InputInfo,
}

#[derive(Debug, Serialize)]
pub struct PredictResponse {
    pub task: String,
    pub expert_version: String,
    /// One image: its `predictions`, `logits` and `input` at the top level.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub single: Option<ImageResult>,
    /// Several images (multipart with several `image` parts): one result per image, in request order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<ImageResult>>,
    pub cache: &'static str,
    pub batch_size: usize,
    /// `shared` (weights fed as inputs), `dedicated` (promoted expert with its own session) or `mixed` (the
    /// mixed-task graph's session).
    pub session: SessionKind,
    /// `merged` (this expert assembled) or `mixed` (the batch's experts' factors gathered in one run).
    pub execution: ExecutionPath,
    pub timings: Timings,
}

/// The native predict query: `top_k`, `frame`, `window=center,width`, `return_pixels`.
#[derive(Debug, Default, PartialEq)]
pub struct PredictQuery {
    pub top_k: Option<usize>,
    pub prepare: PrepareOptions,
}

const KNOWN_QUERY: &str = "top_k, frame, window, return_pixels";

fn bad_query(message: String) -> ApiError {
    ApiError::bad_request("bad_query", message)
}

fn parse_query(query: Option<&str>) -> Result<PredictQuery, ApiError> {
    let mut parsed = PredictQuery::default();
    let Some(query) = query else {
        return Ok(parsed);
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // `window=40,400` arrives as `40%2C400` from some clients
        let value = value.replace("%2C", ",").replace("%2c", ",");
        match key {
            "top_k" => match value.parse::<usize>() {
                Ok(k) if k >= 1 => parsed.top_k = Some(k),
                _ => {
                    return Err(bad_query(format!(
                        "top_k must be a positive integer, got `{value}`"
                    )))
                }
            },
            "frame" => match value.parse::<u32>() {
                Ok(frame) => parsed.prepare.frame = Some(frame),
                _ => {
                    return Err(bad_query(format!(
                        "frame must be a 0-based frame index, got `{value}`"
                    )))
                }
            },
            "window" => {
                let window = value
                    .split_once(',')
                    .and_then(|(c, w)| Some((c.trim().parse::<f64>().ok()?, w.trim().parse::<f64>().ok()?)))
                    .map(|(center, width)| Window {
                        center,
                        width,
                        function: VoiFunction::Linear,
                    })
                    .filter(Window::is_valid)
                    .ok_or_else(|| {
                        bad_query(format!(
                            "window must be `center,width` with finite numbers and width >= 1, got `{value}`"
                        ))
                    })?;
                parsed.prepare.window = Some(window);
            }
            "return_pixels" => match value.as_str() {
                "true" | "1" | "" => parsed.prepare.return_pixels = true,
                "false" | "0" => parsed.prepare.return_pixels = false,
                _ => {
                    return Err(bad_query(format!(
                        "return_pixels must be true or false, got `{value}`"
                    )))
                }
            },
            other => {
                return Err(bad_query(format!(
                    "unknown query parameter `{other}` (known: {KNOWN_QUERY})"
                )))
            }
        }
    }
    Ok(parsed)
}

enum BodyKind {
    /// One PNG, JPEG or DICOM body (recognised by its bytes).
    Image,
    Multipart,
}

const ACCEPTED: &str =
    "send image/png, image/jpeg, application/dicom or multipart/form-data with field(s) `image`";

fn body_kind(request: &Request) -> Result<BodyKind, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "image/png" | "image/jpeg" | "image/jpg" | "application/dicom" => Ok(BodyKind::Image),
        "multipart/form-data" => Ok(BodyKind::Multipart),
        "" => Err(ApiError::UnsupportedMediaType(format!(
            "missing Content-Type; {ACCEPTED}"
        ))),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type `{other}` is not supported; {ACCEPTED}"
        ))),
    }
}

/// Every `image` part of a multipart body, in order (other fields are ignored); more than `limit` is 413.
/// Public for the fuzz targets.
pub async fn images_from_multipart(
    request: Request,
    bytes: axum::body::Bytes,
    limit: u32,
) -> Result<Vec<axum::body::Bytes>, ApiError> {
    let mut multipart = multipart_of(request, bytes).await?;
    let mut images = Vec::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| bad_multipart(e.body_text()))?
    {
        if field.name() != Some("image") {
            continue;
        }
        if images.len() == limit as usize {
            // Counted before the part is read, let alone decoded.
            return Err(ApiError::TooManyImages {
                images: images.len() + 1,
                limit,
            });
        }
        images.push(field.bytes().await.map_err(|e| {
            ApiError::bad_request(
                "bad_multipart",
                format!("cannot read field `image`: {}", e.body_text()),
            )
        })?);
    }
    if images.is_empty() {
        return Err(ApiError::bad_request(
            "missing_image",
            "multipart body has no field `image`",
        ));
    }
    Ok(images)
}

impl From<PreprocessError> for ApiError {
    fn from(error: PreprocessError) -> Self {
        match error {
            PreprocessError::Undecodable(m) => ApiError::bad_request("bad_image", m),
            PreprocessError::UnsupportedFormat(m) => ApiError::UnsupportedMediaType(m),
            PreprocessError::TooLarge(m) => ApiError::ImageTooLarge(m),
            PreprocessError::NotAnImage(m) => ApiError::Unprocessable {
                code: "not_an_image",
                message: m,
            },
            PreprocessError::BadFrame(m) => ApiError::bad_request("bad_frame", m),
            // Handlers that reserve memory map this through `state.memory_busy()` (which counts it).
            PreprocessError::MemoryBusy => ApiError::MemoryBusy { retry_after_s: 1 },
        }
    }
}

/// `POST /v1/experts/{task}/predict`
pub async fn predict(
    State(state): State<AppState>,
    Path(task): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<PredictResponse>, ApiError> {
    let started = Instant::now();
    let entry = state.servable(&task)?;
    let query = parse_query(query.as_deref())?;
    let top_k = query
        .top_k
        .unwrap_or(DEFAULT_TOP_K)
        .min(entry.spec.num_classes);
    let kind = body_kind(&request)?;
    check_content_length(&request, state.config.max_body_bytes)?;
    let timeout_ms = state.config.request_timeout_ms;
    let work = async {
        let (parts, body) = request.into_parts();
        let (bytes, mut memory) = read_body(body, &state).await?;
        let images = match kind {
            BodyKind::Image => vec![bytes],
            BodyKind::Multipart => {
                let images = images_from_multipart(
                    Request::from_parts(parts, axum::body::Body::empty()),
                    bytes,
                    state.config.max_client_batch_size,
                )
                .await?;
                // The parts may be copies of the body: count them as well.
                memory
                    .grow(images.iter().map(|i| i.len() as u64).sum())
                    .map_err(|_| state.memory_busy())?;
                images
            }
        };
        // Only now, with the body in hand, a place in the inference queue: stalled uploads never hold one.
        let _admission = state.admit()?;
        let count = images.len();
        let decode_started = Instant::now();
        let limits = state.image_limits();
        let spec_input = entry.spec.input.clone();
        let options = query.prepare;
        let worker = state.clone();
        // One blocking job decodes the images in order; only the small task inputs are kept. Each decode reserves
        // what it will hold (from the header) before allocating it.
        let (input, infos) = state
            .decode(
                memory,
                move |memory| -> Result<(Vec<f32>, Vec<InputInfo>), ApiError> {
                    let mut reserve =
                        |bytes: u64| memory.grow(bytes).map_err(|_| PreprocessError::MemoryBusy);
                    let mut input =
                        Vec::with_capacity(count * 3 * spec_input.height * spec_input.width);
                    let mut infos = Vec::with_capacity(count);
                    for bytes in &images {
                        let (x, info) =
                            preprocess::prepare(bytes, &options, limits, &spec_input, &mut reserve)
                                .map_err(|e| match e {
                                    PreprocessError::MemoryBusy => worker.memory_busy(),
                                    other => ApiError::from(other),
                                })?;
                        input.extend_from_slice(&x);
                        infos.push(info);
                    }
                    Ok((input, infos))
                },
            )
            .await??;
        let decode_ms = decode_started.elapsed().as_secs_f64() * 1e3;
        // The task input waits for its batch: still request memory until the answer is out.
        let _input_memory = state.reserve(input.len() * 4)?;
        let prediction = state
            .predict(
                &entry,
                input,
                count,
                entry.spec.input.height,
                entry.spec.input.width,
            )
            .await?;
        Ok::<_, ApiError>((decode_ms, infos, prediction))
    };
    let (decode_ms, infos, prediction) = tokio::time::timeout(state.config.request_timeout(), work)
        .await
        .map_err(|_| ApiError::Timeout { timeout_ms })??;

    let classes = prediction.classes;
    let mut results: Vec<ImageResult> = prediction
        .output
        .logits
        .chunks(classes)
        .zip(infos)
        .map(|(logits, input)| ImageResult {
            predictions: top_labels(logits, top_k, &entry.spec.labels),
            logits: logits.to_vec(),
            input,
        })
        .collect();
    let (single, results) = if results.len() == 1 {
        (results.pop(), None)
    } else {
        (None, Some(results))
    };
    Ok(Json(PredictResponse {
        task,
        expert_version: prediction.version,
        single,
        results,
        cache: if prediction.cache.hit { "hit" } else { "miss" },
        batch_size: prediction.output.batch_images,
        session: prediction.output.session,
        execution: prediction.output.path,
        timings: Timings {
            decode_ms,
            expert_ms: prediction.expert_seconds * 1e3,
            queue_ms: prediction.output.queue_seconds.max(0.0) * 1e3,
            inference_ms: prediction.output.run_seconds * 1e3,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

/// The `top_k` most probable labels (softmax of `logits`), ties by index.
fn top_labels(logits: &[f32], top_k: usize, labels: &[String]) -> Vec<Label> {
    let probabilities = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(top_k)
        .map(|i| Label {
            index: i,
            label: labels[i].clone(),
            probability: probabilities[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let top_k = |q| parse_query(Some(q)).map(|p| p.top_k);
        assert_eq!(parse_query(None).unwrap(), PredictQuery::default());
        assert_eq!(top_k("top_k=2").unwrap(), Some(2));
        assert!(top_k("top_k=0").is_err());
        assert!(top_k("top_k=abc").is_err());
        assert!(top_k("k=1").is_err());
        let q = parse_query(Some("window=40,400&frame=3&return_pixels=true")).unwrap();
        assert_eq!(
            q.prepare,
            PrepareOptions {
                frame: Some(3),
                window: Some(Window {
                    center: 40.0,
                    width: 400.0,
                    function: VoiFunction::Linear
                }),
                return_pixels: true,
            }
        );
        assert_eq!(
            parse_query(Some("window=-600%2C1500"))
                .unwrap()
                .prepare
                .window
                .unwrap()
                .center,
            -600.0
        );
        for bad in [
            "window=40",
            "window=40,0",
            "window=a,b",
            "window=1,inf",
            "frame=-1",
            "return_pixels=yes",
        ] {
            assert_eq!(
                parse_query(Some(bad)).unwrap_err().code(),
                "bad_query",
                "{bad}"
            );
        }
    }
}
