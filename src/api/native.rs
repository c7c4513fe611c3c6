//! Native JSON API: expert listing, predict on an image, server info.

use std::time::Instant;

use axum::{
    extract::{FromRequest, Path, RawQuery, Request, State},
    http::header,
    Json,
};
use serde::Serialize;
use serde_json::{json, Value};

use super::{check_content_length, read_body, softmax};
use crate::{
    error::ApiError,
    package::{ExpertEntry, ExpertStatus},
    preprocess::{self, PreprocessError},
    runtime::SessionKind,
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
            "execution": "one shared ONNX Runtime session fed the assembled weights as graph inputs; when LORKD_DEDICATED_SESSIONS > 0, experts that served LORKD_PROMOTE_AFTER requests get their own session with the weights baked in",
            "dedicated_sessions": state.metrics.dedicated_sessions.get(),
        },
        "cache": {"budget_bytes": state.cache.budget(), "resident_bytes": state.cache.resident_bytes()},
        "request_memory": {"budget_bytes": state.memory.total_bytes(), "in_use_bytes": state.memory.in_use_bytes()},
        "memory_plan": crate::server::MemoryPlan::new(&state.config, package),
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

#[derive(Debug, Serialize)]
pub struct PredictResponse {
    pub task: String,
    pub expert_version: String,
    pub predictions: Vec<Label>,
    pub logits: Vec<f32>,
    pub cache: &'static str,
    pub batch_size: usize,
    /// `shared` (weights fed as inputs) or `dedicated` (promoted expert with its own session).
    pub session: SessionKind,
    pub timings: Timings,
}

fn parse_top_k(query: Option<&str>) -> Result<Option<usize>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let mut top_k = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "top_k" => match value.parse::<usize>() {
                Ok(k) if k >= 1 => top_k = Some(k),
                _ => {
                    return Err(ApiError::bad_request(
                        "bad_query",
                        format!("top_k must be a positive integer, got `{value}`"),
                    ))
                }
            },
            other => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("unknown query parameter `{other}` (known: top_k)"),
                ))
            }
        }
    }
    Ok(top_k)
}

enum BodyKind {
    Image,
    Multipart,
}

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
        "image/png" | "image/jpeg" | "image/jpg" => Ok(BodyKind::Image),
        "multipart/form-data" => Ok(BodyKind::Multipart),
        "" => Err(ApiError::UnsupportedMediaType("missing Content-Type; send image/png, image/jpeg or multipart/form-data with field `image`".into())),
        other => Err(ApiError::UnsupportedMediaType(format!("Content-Type `{other}` is not supported; send image/png, image/jpeg or multipart/form-data with field `image`"))),
    }
}

async fn image_from_multipart(
    request: Request,
    bytes: axum::body::Bytes,
) -> Result<axum::body::Bytes, ApiError> {
    let (parts, _) = request.into_parts();
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    let mut multipart = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|e| {
            ApiError::bad_request(
                "bad_multipart",
                format!("invalid multipart body: {}", e.body_text()),
            )
        })?;
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) if field.name() == Some("image") => {
                return field.bytes().await.map_err(|e| {
                    ApiError::bad_request(
                        "bad_multipart",
                        format!("cannot read field `image`: {}", e.body_text()),
                    )
                });
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(ApiError::bad_request(
                    "missing_image",
                    "multipart body has no field `image`",
                ))
            }
            Err(e) => {
                return Err(ApiError::bad_request(
                    "bad_multipart",
                    format!("invalid multipart body: {}", e.body_text()),
                ))
            }
        }
    }
}

impl From<PreprocessError> for ApiError {
    fn from(error: PreprocessError) -> Self {
        match error {
            PreprocessError::Undecodable(m) => ApiError::bad_request("bad_image", m),
            PreprocessError::UnsupportedFormat(m) => ApiError::UnsupportedMediaType(m),
            PreprocessError::TooLarge(m) => ApiError::ImageTooLarge(m),
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
    let top_k = parse_top_k(query.as_deref())?
        .unwrap_or(DEFAULT_TOP_K)
        .min(entry.spec.num_classes);
    let kind = body_kind(&request)?;
    check_content_length(&request, state.config.max_body_bytes)?;
    let timeout_ms = state.config.request_timeout_ms;
    let work = async {
        let (parts, body) = request.into_parts();
        let (bytes, mut memory) = read_body(body, &state).await?;
        let bytes = match kind {
            BodyKind::Image => bytes,
            BodyKind::Multipart => {
                let image = image_from_multipart(
                    Request::from_parts(parts, axum::body::Body::empty()),
                    bytes,
                )
                .await?;
                // The part may be a copy of the body: count it as well.
                memory
                    .grow(image.len() as u64)
                    .map_err(|_| state.memory_busy())?;
                image
            }
        };
        // Only now, with the body in hand, a place in the inference queue: stalled uploads never hold one.
        let _admission = state.admit()?;
        let decode_started = Instant::now();
        let limits = state.image_limits();
        let spec_input = entry.spec.input.clone();
        let worker = state.clone();
        let input = state
            .decode(memory, move |memory| -> Result<Vec<f32>, ApiError> {
                if let Some(needed) = preprocess::decoded_bytes(&bytes, limits)? {
                    memory.grow(needed).map_err(|_| worker.memory_busy())?;
                }
                let pixels = preprocess::decode(&bytes, limits)?;
                Ok(preprocess::to_task_input(&pixels, &spec_input))
            })
            .await??;
        let decode_ms = decode_started.elapsed().as_secs_f64() * 1e3;
        // The task input waits for its batch: still request memory until the answer is out.
        let _input_memory = state.reserve(input.len() * 4)?;
        let prediction = state
            .predict(
                &entry,
                input,
                1,
                entry.spec.input.height,
                entry.spec.input.width,
            )
            .await?;
        Ok::<_, ApiError>((decode_ms, prediction))
    };
    let (decode_ms, prediction) = tokio::time::timeout(state.config.request_timeout(), work)
        .await
        .map_err(|_| ApiError::Timeout { timeout_ms })??;

    let logits = prediction.output.logits;
    let probabilities = softmax(&logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    let predictions = order
        .into_iter()
        .take(top_k)
        .map(|i| Label {
            index: i,
            label: entry.spec.labels[i].clone(),
            probability: probabilities[i],
        })
        .collect();
    Ok(Json(PredictResponse {
        task,
        expert_version: prediction.version,
        predictions,
        logits,
        cache: if prediction.cache.hit { "hit" } else { "miss" },
        batch_size: prediction.output.batch_images,
        session: prediction.output.session,
        timings: Timings {
            decode_ms,
            expert_ms: prediction.expert_seconds * 1e3,
            queue_ms: prediction.output.queue_seconds.max(0.0) * 1e3,
            inference_ms: prediction.output.run_seconds * 1e3,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_parsing() {
        assert_eq!(parse_top_k(None).unwrap(), None);
        assert_eq!(parse_top_k(Some("top_k=2")).unwrap(), Some(2));
        assert!(parse_top_k(Some("top_k=0")).is_err());
        assert!(parse_top_k(Some("top_k=abc")).is_err());
        assert!(parse_top_k(Some("k=1")).is_err());
    }
}
