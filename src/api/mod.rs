//! HTTP layer: the route list (one source for the router and the OpenAPI document), middleware, shared helpers.

pub mod admin;
pub mod native;
pub mod oip;
pub mod openapi;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use axum::body::Bytes;
use axum::{
    body::Body,
    extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State},
    http::{header, HeaderName, HeaderValue, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put, MethodRouter},
    Router,
};
use http_body_util::BodyExt;
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::{
    budget::Reservation,
    error::{ApiError, ErrorForm},
    state::{AppState, Shared},
};

/// Which wire format a route's errors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Native,
    Oip,
    Ops,
    /// Expert lifecycle: admin keys only.
    Admin,
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
            (413, "Body over LORKD_MAX_BODY_BYTES (`payload_too_large`), or more images than LORKD_MAX_CLIENT_BATCH_SIZE (`too_many_images`)", "Error"),
            (415, "Content type not accepted, or an image format / DICOM transfer syntax (named) / photometric interpretation the server does not decode", "Error"),
            (422, "Image dimensions (all DICOM frames counted) over the limit, checked before decoding; or a DICOM object that is not an image to classify (`not_an_image`: RT dose, segmentation, no pixel data)", "Error"),
            (429, "Queue full; see Retry-After", "Error"),
            (500, "Internal error (details only in the server log)", "Error"),
            (503, "Expert disabled, or the request-memory budget is in use (memory_busy, see Retry-After)", "Error"),
            (504, "Request timed out", "Error"),
        ],
    },
    RouteDoc {
        method: "PUT",
        path: "/v1/experts/{task}",
        operation_id: "putExpert",
        summary: "Admin: add or replace an expert while serving (multipart: `spec` JSON task spec, `expert` safetensors); verified before it is visible, persisted in LORKD_OVERLAY_DIR",
        api: Api::Admin,
        query: &[],
        request: &[("multipart/form-data", "ExpertUpload")],
        responses: &[
            (200, "Replaced (the version hash changed)", "Expert"),
            (201, "Added", "Expert"),
            (400, "Bad multipart body or task spec", "Error"),
            (403, "Not an admin key, or the admin API is off", "Error"),
            (413, "Body over the limit", "Error"),
            (422, "The expert does not fit the package (task id, spec, input size, tensors, scale); nothing changed", "Error"),
            (503, "The request-memory budget is in use (see Retry-After)", "Error"),
        ],
    },
    RouteDoc {
        method: "DELETE",
        path: "/v1/experts/{task}",
        operation_id: "deleteExpert",
        summary: "Admin: stop serving an expert (requests already running finish); persisted in LORKD_OVERLAY_DIR",
        api: Api::Admin,
        query: &[],
        request: &[],
        responses: &[(200, "Removed", "ExpertRemoved"), (403, "Not an admin key, or the admin API is off", "Error"), (404, "Unknown task", "Error")],
    },
    RouteDoc {
        method: "POST",
        path: "/v1/admin/reload",
        operation_id: "reload",
        summary: "Admin: read the package folder and the overlay again and serve what changed (same shared student only)",
        api: Api::Admin,
        query: &[],
        request: &[],
        responses: &[(200, "Reloaded", "ReloadResult"), (403, "Not an admin key, or the admin API is off", "Error"), (409, "The shared student changed (restart) or the folder cannot be loaded; nothing changed", "Error")],
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
        responses: &[(200, "Live", "OipLive"), (503, "The inference backend has ended: restart the process", "OipLive")],
    },
    RouteDoc {
        method: "GET",
        path: "/v2/health/ready",
        operation_id: "serverReady",
        summary: "Open Inference Protocol: readiness (package loaded, warm-up done, inference backend healthy)",
        api: Api::Oip,
        query: &[],
        request: &[],
        responses: &[(200, "Ready", "OipReady"), (503, "Not ready yet, or the last inference runs all failed", "OipReady")],
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
            (413, "Body over LORKD_MAX_BODY_BYTES, or N over LORKD_MAX_CLIENT_BATCH_SIZE", "OipError"),
            (429, "Queue full; see Retry-After", "OipError"),
            (500, "Internal error", "OipError"),
            (503, "Model disabled, or the request-memory budget is in use (see Retry-After)", "OipError"),
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
            (413, "Body over LORKD_MAX_BODY_BYTES, or N over LORKD_MAX_CLIENT_BATCH_SIZE", "OipError"),
            (429, "Queue full; see Retry-After", "OipError"),
            (500, "Internal error", "OipError"),
            (503, "Model disabled, or the request-memory budget is in use (see Retry-After)", "OipError"),
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
        "putExpert" => put(admin::put_expert),
        "deleteExpert" => delete(admin::delete_expert),
        "reload" => post(admin::reload),
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

/// Routes that answer without an API key: health probes (kubelets carry no key) and the API description.
pub(crate) fn is_open(operation_id: &str) -> bool {
    matches!(operation_id, "serverLive" | "serverReady" | "openapi")
}

/// 401 without a key, 403 with a key that is not an admin key (or when no admin key is configured: the admin
/// API is off), before the handler runs.
async fn require_admin_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let verdict = if !state.admin_keys.enabled() {
        Err(ApiError::Forbidden(
            "the admin API is off: set LORKD_ADMIN_KEYS or LORKD_ADMIN_KEYS_FILE",
        ))
    } else {
        match state.admin_keys.check(request.headers()) {
            Ok(()) => Ok(()),
            // A valid API key without the admin scope is forbidden, not unauthenticated.
            Err(_)
                if state.api_keys.enabled() && state.api_keys.check(request.headers()).is_ok() =>
            {
                Err(ApiError::Forbidden("this key has no admin scope"))
            }
            Err(error) => Err(error),
        }
    };
    if let Err(error) = verdict {
        state
            .metrics
            .rejected
            .with_label_values(&["unauthorized"])
            .inc();
        return error.into_response();
    }
    next.run(request).await
}

/// Routes that move to the ops port when `LORKD_OPS_PORT` is set (the public port then exposes only the API).
fn is_ops(operation_id: &str) -> bool {
    matches!(operation_id, "metrics" | "info")
}

/// Which listener a router is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The API port; it also carries the ops routes when no ops port is configured.
    Main,
    /// `LORKD_OPS_PORT`: metrics, info and health probes only, no API key (keep it off the public Service).
    Ops,
}

/// The full application: routes from [`ROUTES`], JSON fallbacks, request ids, tracing and metrics.
pub fn router(state: AppState) -> Router {
    router_for(state, Port::Main)
}

/// The routes of one listener (see [`Port`]).
pub fn router_for(state: AppState, port: Port) -> Router {
    let separate_ops = state.config.ops_port != 0;
    let mut router = Router::new();
    for route in ROUTES {
        let op = route.operation_id;
        let mounted = match port {
            Port::Main => !(separate_ops && is_ops(op)),
            Port::Ops => is_ops(op) || matches!(op, "serverLive" | "serverReady"),
        };
        if !mounted {
            continue;
        }
        let mut method_router = handler(op);
        if route.api == Api::Admin {
            method_router = method_router.route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_admin_key,
            ));
        } else if port == Port::Main && !is_open(op) {
            method_router = method_router.route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_api_key,
            ));
        }
        // Several operations share a path (GET/PUT/DELETE /v1/experts/{task}): merge their method routers.
        router = router.route(route.path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .layer(middleware::from_fn(close_if_body_unread))
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

/// Marks when a request body has been read to its end.
struct TrackEnd {
    inner: Body,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for TrackEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.ended.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request answered before its body was read (401, 403, 404, 413, 415, a bad query...) leaves the body's bytes
/// in the connection: the answer says `Connection: close`, so the client opens a new connection instead of
/// reusing one the server is about to close (which clients see as a reset on their next request).
async fn close_if_body_unread(request: Request, next: Next) -> Response {
    if http_body::Body::is_end_stream(request.body()) {
        return next.run(request).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let (parts, body) = request.into_parts();
    let body = Body::new(TrackEnd {
        inner: body,
        ended: ended.clone(),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::Acquire) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// 401 before the handler runs (and so before any body is read) unless the request carries an accepted key.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Err(error) = state.api_keys.check(request.headers()) {
        state
            .metrics
            .rejected
            .with_label_values(&["unauthorized"])
            .inc();
        let oip = request.uri().path().starts_with("/v2");
        return error.into_response_with(if oip {
            ErrorForm::Oip
        } else {
            ErrorForm::Native
        });
    }
    next.run(request).await
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
    state
        .metrics
        .request_memory_bytes
        .set(state.memory.in_use_bytes().min(i64::MAX as u64) as i64);
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

/// Reads a request body into memory reserved from the request-memory budget, growing the reservation as bytes
/// arrive (a declared `Content-Length` reserves nothing: stalled clients hold only what they sent).
/// Over `LORKD_MAX_BODY_BYTES` is 413, a spent budget 503, a body not complete within `LORKD_BODY_TIMEOUT_MS`
/// 408, a broken stream 400.
pub async fn read_body(body: Body, state: &Shared) -> Result<(Bytes, Reservation), ApiError> {
    let limit = state.config.max_body_bytes;
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let deadline = tokio::time::Instant::now() + state.config.body_timeout();
    let mut reservation = state.memory.empty();
    let mut buffer: Vec<u8> = Vec::new();
    let mut body = body;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                state
                    .metrics
                    .rejected
                    .with_label_values(&["body_timeout"])
                    .inc();
                return Err(ApiError::BodyTimeout {
                    timeout_ms: state.config.body_timeout_ms,
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                // The transport's error text (OS errors included) stays in the (debug) log.
                tracing::debug!(error = %e, "request body broke off");
                return Err(ApiError::bad_request(
                    "bad_body",
                    "cannot read the request body: the connection failed while sending it",
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let needed = buffer.len().saturating_add(data.len());
        if needed > limit_usize {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        if needed > buffer.capacity() {
            // Grow geometrically (few copies), never past the limit, and reserve the capacity before allocating it.
            let capacity = needed
                .max(buffer.capacity().saturating_mul(2))
                .min(limit_usize);
            reservation
                .grow_to(capacity as u64)
                .map_err(|_| state.memory_busy())?;
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok((Bytes::from(buffer), reservation))
}

/// An already read body as a multipart stream (boundary from the request's `Content-Type`); 400 `bad_multipart` when
/// it is not one.
pub async fn multipart_of(
    request: Request,
    body: Bytes,
) -> Result<axum::extract::Multipart, ApiError> {
    let (parts, _) = request.into_parts();
    axum::extract::Multipart::from_request(Request::from_parts(parts, Body::from(body)), &())
        .await
        .map_err(|e| bad_multipart(e.body_text()))
}

/// 400 `bad_multipart` with the parser's reason.
pub fn bad_multipart(reason: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("bad_multipart", format!("invalid multipart body: {reason}"))
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
