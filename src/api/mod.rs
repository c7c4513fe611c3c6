//! HTTP layer: the route list (one source for the router and the OpenAPI document), middleware, shared helpers.

pub mod native;
pub mod oip;
pub mod openapi;

use std::time::Instant;

use axum::{
    body::Body,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{header, HeaderName, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, MethodRouter},
    Router,
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{error::ApiError, state::AppState};

/// Which wire format a route's errors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Native,
    Oip,
    Ops,
}

/// One query parameter, for the OpenAPI document.
#[derive(Debug, Clone, Copy)]
pub struct QueryParam {
    pub name: &'static str,
    pub description: &'static str,
    pub schema: &'static str,
}

/// One route: what the router mounts and what the OpenAPI document describes.
#[derive(Debug, Clone, Copy)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub api: Api,
    pub query: &'static [QueryParam],
    /// Request body content types with the schema each carries (`#/components/schemas/...` name or `binary`).
    pub request: &'static [(&'static str, &'static str)],
    /// `(status, description, schema)`; schema is a component name, `text` or `none`.
    pub responses: &'static [(u16, &'static str, &'static str)],
}

/// Every route of the service. The router and `/openapi.json` are both built from this list.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "GET",
        path: "/v1/experts",
        operation_id: "listExperts",
        summary: "List every expert of the package with its metadata, version and cache state",
        api: Api::Native,
        query: &[],
        request: &[],
        responses: &[(200, "Experts", "ExpertList")],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/experts/{task}",
        operation_id: "getExpert",
        summary: "One expert's metadata, version and cache state",
        api: Api::Native,
        query: &[],
        request: &[],
        responses: &[(200, "Expert", "Expert"), (404, "Unknown task", "Error")],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/experts/{task}/predict",
        operation_id: "predict",
        summary: "Classify PNG/JPEG/DICOM images with the task's expert (raw body, or multipart with one or more `image` parts answered in order)",
        api: Api::Native,
        query: &[
            QueryParam { name: "top_k", description: "How many labels to return (default 3, at most the task's classes)", schema: "integer" },
            QueryParam { name: "frame", description: "0-based frame of a multi-frame DICOM object (default 0, the first)", schema: "integer" },
            QueryParam { name: "window", description: "`center,width`: VOI window (LINEAR) for greyscale DICOM and 16-bit PNG, overriding the file's (default: the file's first VOI LUT, else its first window, else min-max of the frame when more than 8 bits are stored, else the stored range)", schema: "string" },
            QueryParam { name: "return_pixels", description: "`true`: also return the 8-bit image used (after windowing/colour conversion, before resize and normalisation) as `input.pixels_png` (base64 PNG)", schema: "boolean" },
        ],
        request: &[("image/png", "binary"), ("image/jpeg", "binary"), ("application/dicom", "binary"), ("multipart/form-data", "MultipartImage")],
        responses: &[
            (200, "Prediction (one image), or `results` in request order (several images)", "Prediction"),
            (400, "Undecodable, truncated or non-Part-10 image (`bad_image`), bad query, frame out of range (`bad_frame`)", "Error"),
            (404, "Unknown task", "Error"),
            (413, "Body over the limit, or more images than LORKD_MAX_CLIENT_BATCH_SIZE (`too_many_images`)", "Error"),
            (415, "Content type not accepted, or an image format / DICOM transfer syntax (named) / photometric interpretation the server does not decode", "Error"),
            (422, "Image dimensions (all DICOM frames counted) over the limit, checked before decoding; or a DICOM object that is not an image to classify (`not_an_image`: RT dose, segmentation, no pixel data)", "Error"),
            (429, "Queue full; see Retry-After", "Error"),
            (500, "Internal error (details only in the server log)", "Error"),
            (503, "Expert disabled", "Error"),
            (504, "Request timed out", "Error"),
        ],
    },
    RouteDoc {
        method: "GET",
        path: "/v1/info",
        operation_id: "info",
        summary: "Package, execution provider and configuration",
        api: Api::Native,
        query: &[],
        request: &[],
        responses: &[(200, "Server information", "Info")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2",
        operation_id: "serverMetadata",
        summary: "Open Inference Protocol: server metadata",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Server metadata", "OipServerMetadata")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/health/live",
        operation_id: "serverLive",
        summary: "Open Inference Protocol: liveness",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Live", "OipLive")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/health/ready",
        operation_id: "serverReady",
        summary: "Open Inference Protocol: readiness (package loaded, warm-up done)",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Ready", "OipReady"), (503, "Not ready yet", "OipReady")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/models/{task}",
        operation_id: "modelMetadata",
        summary: "Open Inference Protocol: model metadata (each expert is a model; version = expert version hash)",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Model metadata", "OipModelMetadata"), (404, "Unknown model", "OipError")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/models/{task}/ready",
        operation_id: "modelReady",
        summary: "Open Inference Protocol: model readiness",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Model ready", "OipModelReady"), (404, "Unknown model", "OipError"), (503, "Model disabled or server not ready", "OipModelReady")],
    },
    RouteDoc {
        method: "POST",
        path: "/v2/models/{task}/infer",
        operation_id: "modelInfer",
        summary: "Open Inference Protocol: inference on an FP32 tensor [N, 3, H, W] (preprocessed, JSON or binary tensor extension), returns logits [N, classes]",
        api: Api::Oip,
        query: &[],
        request: &[("application/json", "OipInferRequest"), ("application/octet-stream", "OipBinaryInferRequest")],
        responses: &[
            (200, "Inference result (JSON; with binary outputs requested, the JSON header of `Inference-Header-Content-Length` bytes followed by little-endian FP32 logits, `application/octet-stream`)", "OipInferResponse"),
            (400, "Bad JSON, wrong tensor name, shape or datatype, NaN/inf", "OipError"),
            (404, "Unknown model", "OipError"),
            (413, "Body over the limit, or N over LORKD_MAX_CLIENT_BATCH_SIZE", "OipError"),
            (429, "Queue full; see Retry-After", "OipError"),
            (500, "Internal error", "OipError"),
            (503, "Model disabled", "OipError"),
            (504, "Request timed out", "OipError"),
        ],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/models/{task}/versions/{version}",
        operation_id: "versionedModelMetadata",
        summary: "Open Inference Protocol: model metadata for one version (only the expert's current version hash exists)",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Model metadata", "OipModelMetadata"), (404, "Unknown model or version", "OipError")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/models/{task}/versions/{version}/ready",
        operation_id: "versionedModelReady",
        summary: "Open Inference Protocol: readiness of one model version",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Model ready", "OipModelReady"), (404, "Unknown model or version", "OipError"), (503, "Model disabled or server not ready", "OipModelReady")],
    },
    RouteDoc {
        method: "POST",
        path: "/v2/models/{task}/versions/{version}/infer",
        operation_id: "versionedModelInfer",
        summary: "Open Inference Protocol: inference pinned to one model version (same body and errors as unversioned infer)",
        api: Api::Oip,
        query: &[],
        request: &[("application/json", "OipInferRequest"), ("application/octet-stream", "OipBinaryInferRequest")],
        responses: &[
            (200, "Inference result (JSON; with binary outputs requested, the JSON header of `Inference-Header-Content-Length` bytes followed by little-endian FP32 logits, `application/octet-stream`)", "OipInferResponse"),
            (400, "Bad JSON, wrong tensor name, shape or datatype, NaN/inf", "OipError"),
            (404, "Unknown model or version", "OipError"),
            (413, "Body over the limit, or N over LORKD_MAX_CLIENT_BATCH_SIZE", "OipError"),
            (429, "Queue full; see Retry-After", "OipError"),
            (500, "Internal error", "OipError"),
            (503, "Model disabled", "OipError"),
            (504, "Request timed out", "OipError"),
        ],
    },
    RouteDoc {
        method: "GET",
        path: "/metrics",
        operation_id: "metrics",
        summary: "Prometheus metrics",
        api: Api::Ops,
        query: &[],
        request: &[],
        responses: &[(200, "Prometheus text exposition", "text")],
    },
    RouteDoc {
        method: "GET",
        path: "/openapi.json",
        operation_id: "openapi",
        summary: "This OpenAPI document",
        api: Api::Ops,
        query: &[],
        request: &[],
        responses: &[(200, "OpenAPI 3.1 document", "object")],
    },
];

fn handler(operation_id: &str) -> MethodRouter<AppState> {
    match operation_id {
        "listExperts" => get(native::list_experts),
        "getExpert" => get(native::get_expert),
        "predict" => post(native::predict),
        "info" => get(native::info),
        "serverMetadata" => get(oip::server_metadata),
        "serverLive" => get(oip::live),
        "serverReady" => get(oip::ready),
        "modelMetadata" => get(oip::model_metadata),
        "modelReady" => get(oip::model_ready),
        "modelInfer" => post(oip::infer),
        "versionedModelMetadata" => get(oip::versioned_model_metadata),
        "versionedModelReady" => get(oip::versioned_model_ready),
        "versionedModelInfer" => post(oip::versioned_infer),
        "metrics" => get(metrics),
        "openapi" => get(openapi_json),
        other => panic!("route {other} has no handler"),
    }
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The full application: routes from [`ROUTES`], JSON fallbacks, request ids, tracing and metrics.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for route in ROUTES {
        router = router.route(route.path, handler(route.operation_id));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        // Bodies are read by the handlers with the configured limit (so 413 is our JSON error).
        .layer(DefaultBodyLimit::disable())
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request| {
                            let request_id = request.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
                            // Path only: no query strings, headers or bodies (patient data never reaches the log).
                            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %request_id)
                        })
                        .on_request(())
                        // The response is logged by `record_metrics`, which knows the route (probes at debug).
                        .on_response(())
                        .on_failure(()),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone())),
        )
        .with_state(state)
}

async fn record_metrics(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let status_code = response.status().as_u16();
    // Kubernetes probes and Prometheus scrapes arrive every few seconds: at info they would flood the log.
    if route.starts_with("/v2/health") || route == "/metrics" {
        tracing::debug!(status = status_code, latency_ms, "response");
    } else {
        tracing::info!(status = status_code, latency_ms, "response");
    }
    let status = status_code.to_string();
    let labels = [route.as_str(), method.as_str(), status.as_str()];
    state.metrics.http_requests.with_label_values(&labels).inc();
    state
        .metrics
        .http_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(method: Method, request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "method {method} is not allowed on {}",
        request.uri().path()
    ))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn openapi_json() -> Response {
    axum::Json(openapi::document()).into_response()
}

/// Reads a request body up to `limit` bytes; over it is 413, a broken stream is 400.
pub async fn read_body(body: Body, limit: u64) -> Result<axum::body::Bytes, ApiError> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Err(e) => Err(ApiError::bad_request(
            "bad_body",
            format!("cannot read request body: {e}"),
        )),
    }
}

/// 413 straight from `Content-Length`, before reading anything.
pub fn check_content_length(request: &Request, limit: u64) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(ApiError::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

/// Numerically stable softmax in f64.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_sums_to_one() {
        let p = softmax(&[1000.0, 1000.0, 998.0]);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((p[0] - p[1]).abs() < 1e-12 && p[2] < p[0]);
    }

    #[test]
    fn every_route_has_a_handler_and_paths_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            let _ = handler(route.operation_id);
            assert!(
                seen.insert((route.method, route.path)),
                "{} {} twice",
                route.method,
                route.path
            );
        }
    }
}
