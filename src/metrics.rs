//! Prometheus metrics of one server instance (own registry, so several servers can live in one process).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub queue_depth: IntGauge,
    pub rejected: IntCounterVec,
    pub batch_size: Histogram,
    pub inference_seconds: Histogram,
    pub cache_hits: IntCounterVec,
    pub cache_misses: IntCounterVec,
    pub cache_evictions: IntCounterVec,
    pub assemblies: IntCounterVec,
    pub assembly_seconds: Histogram,
    pub cache_resident_bytes: IntGauge,
    pub cache_pooled_bytes: IntGauge,
    pub cache_resident_experts: IntGauge,
    pub cache_budget_bytes: IntGauge,
    pub dedicated_sessions: IntGauge,
    pub execution_batches: IntCounterVec,
    pub execution_images: IntCounterVec,
    pub promotions: IntCounterVec,
    pub session_build_seconds: Histogram,
    pub info: IntGaugeVec,
    pub experts: IntGaugeVec,
    pub connections: IntGauge,
    pub inference_failures: prometheus::IntCounter,
    pub backend_up: IntGauge,
    pub expert_changes: IntCounterVec,
    pub request_memory_bytes: IntGauge,
    pub request_memory_budget_bytes: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("lorkd".into()), None).expect("valid prefix");
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )
        .unwrap();
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route, method and status",
            )
            .buckets(latency_buckets.clone()),
            &["route", "method", "status"],
        )
        .unwrap();
        let queue_depth = IntGauge::new(
            "queue_depth",
            "Predict/infer requests admitted and not yet answered",
        )
        .unwrap();
        let rejected = IntCounterVec::new(
            Opts::new(
                "rejected_total",
                "Requests rejected before inference, by reason (queue_full, memory, unauthorized, too_many_images, body_timeout)",
            ),
            &["reason"],
        )
        .unwrap();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Images per ONNX Runtime run")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )
        .unwrap();
        let inference_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "inference_seconds",
                "Duration of one ONNX Runtime run (one batch)",
            )
            .buckets(latency_buckets.clone()),
        )
        .unwrap();
        let cache_hits = IntCounterVec::new(
            Opts::new(
                "expert_cache_hits_total",
                "Requests whose expert was already assembled",
            ),
            &["task"],
        )
        .unwrap();
        let cache_misses = IntCounterVec::new(Opts::new("expert_cache_misses_total", "Requests that found their expert not assembled (including those waiting on another request's assembly)"), &["task"]).unwrap();
        let cache_evictions = IntCounterVec::new(
            Opts::new(
                "expert_cache_evictions_total",
                "Assembled experts evicted to stay within the byte budget",
            ),
            &["task"],
        )
        .unwrap();
        let assemblies = IntCounterVec::new(
            Opts::new(
                "expert_assemblies_total",
                "Expert assemblies (W0 + scale * B @ A for every layer)",
            ),
            &["task"],
        )
        .unwrap();
        let assembly_seconds = Histogram::with_opts(
            HistogramOpts::new("expert_assembly_seconds", "Duration of one expert assembly")
                .buckets(latency_buckets),
        )
        .unwrap();
        let cache_resident_bytes = IntGauge::new(
            "expert_cache_resident_bytes",
            "Bytes of assembled expert weights held by the cache",
        )
        .unwrap();
        let cache_pooled_bytes = IntGauge::new(
            "expert_cache_pooled_bytes",
            "Bytes of evicted experts' layer buffers kept for the next assembly to reuse (outside the budget)",
        )
        .unwrap();
        let cache_resident_experts = IntGauge::new(
            "expert_cache_resident_experts",
            "Assembled experts held by the cache",
        )
        .unwrap();
        let cache_budget_bytes = IntGauge::new(
            "expert_cache_budget_bytes",
            "Byte budget of the expert cache",
        )
        .unwrap();
        let execution_batches = IntCounterVec::new(
            Opts::new(
                "execution_batches_total",
                "ONNX Runtime runs by execution path (merged: one assembled expert; mixed: the mixed-task graph)",
            ),
            &["path"],
        )
        .unwrap();
        let execution_images = IntCounterVec::new(
            Opts::new(
                "execution_images_total",
                "Images run by execution path (merged or mixed)",
            ),
            &["path"],
        )
        .unwrap();
        let dedicated_sessions = IntGauge::new(
            "dedicated_sessions",
            "Experts running on their own ONNX Runtime session (promoted)",
        )
        .unwrap();
        let promotions = IntCounterVec::new(
            Opts::new(
                "expert_promotions_total",
                "Experts promoted from the shared session to a dedicated one",
            ),
            &["task"],
        )
        .unwrap();
        let session_build_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "session_build_seconds",
                "Building (and warming up) one dedicated expert session",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .unwrap();
        let info = IntGaugeVec::new(
            Opts::new(
                "info",
                "Always 1: service version, package and execution provider in use",
            ),
            &["version", "package", "provider"],
        )
        .unwrap();
        let experts = IntGaugeVec::new(
            Opts::new("experts", "Experts of the package by status"),
            &["status"],
        )
        .unwrap();
        let connections = IntGauge::new(
            "connections",
            "Open client connections (capped by LORKD_MAX_CONNECTIONS)",
        )
        .unwrap();
        let request_memory_bytes = IntGauge::new(
            "request_memory_bytes",
            "Bytes of the request-memory budget in use (bodies, decoding, assembly), sampled at scrape",
        )
        .unwrap();
        let request_memory_budget_bytes = IntGauge::new(
            "request_memory_budget_bytes",
            "The request-memory budget (LORKD_REQUEST_MEMORY_BYTES)",
        )
        .unwrap();
        let inference_failures = prometheus::IntCounter::new(
            "inference_failures_total",
            "ONNX Runtime runs that failed (every job of the batch got an internal error)",
        )
        .unwrap();
        let backend_up = IntGauge::new(
            "backend_up",
            "1 while the inference backend thread runs, 0 once it has ended",
        )
        .unwrap();
        let expert_changes = IntCounterVec::new(
            Opts::new(
                "expert_changes_total",
                "Experts changed through the admin API, by change (add, replace, remove, reload)",
            ),
            &["change"],
        )
        .unwrap();
        let metrics = Metrics {
            registry,
            http_requests,
            http_duration,
            queue_depth,
            rejected,
            batch_size,
            inference_seconds,
            cache_hits,
            cache_misses,
            cache_evictions,
            assemblies,
            assembly_seconds,
            cache_resident_bytes,
            cache_pooled_bytes,
            cache_resident_experts,
            cache_budget_bytes,
            dedicated_sessions,
            execution_batches,
            execution_images,
            promotions,
            session_build_seconds,
            info,
            experts,
            connections,
            inference_failures,
            backend_up,
            expert_changes,
            request_memory_bytes,
            request_memory_budget_bytes,
        };
        let r = &metrics.registry;
        r.register(Box::new(metrics.http_requests.clone())).unwrap();
        r.register(Box::new(metrics.http_duration.clone())).unwrap();
        r.register(Box::new(metrics.queue_depth.clone())).unwrap();
        r.register(Box::new(metrics.rejected.clone())).unwrap();
        r.register(Box::new(metrics.batch_size.clone())).unwrap();
        r.register(Box::new(metrics.inference_seconds.clone()))
            .unwrap();
        r.register(Box::new(metrics.cache_hits.clone())).unwrap();
        r.register(Box::new(metrics.cache_misses.clone())).unwrap();
        r.register(Box::new(metrics.cache_evictions.clone()))
            .unwrap();
        r.register(Box::new(metrics.assemblies.clone())).unwrap();
        r.register(Box::new(metrics.assembly_seconds.clone()))
            .unwrap();
        r.register(Box::new(metrics.cache_pooled_bytes.clone()))
            .unwrap();
        r.register(Box::new(metrics.cache_resident_bytes.clone()))
            .unwrap();
        r.register(Box::new(metrics.cache_resident_experts.clone()))
            .unwrap();
        r.register(Box::new(metrics.cache_budget_bytes.clone()))
            .unwrap();
        r.register(Box::new(metrics.execution_batches.clone()))
            .unwrap();
        r.register(Box::new(metrics.execution_images.clone()))
            .unwrap();
        r.register(Box::new(metrics.dedicated_sessions.clone()))
            .unwrap();
        r.register(Box::new(metrics.promotions.clone())).unwrap();
        r.register(Box::new(metrics.session_build_seconds.clone()))
            .unwrap();
        r.register(Box::new(metrics.info.clone())).unwrap();
        r.register(Box::new(metrics.experts.clone())).unwrap();
        r.register(Box::new(metrics.connections.clone())).unwrap();
        r.register(Box::new(metrics.inference_failures.clone()))
            .unwrap();
        r.register(Box::new(metrics.backend_up.clone())).unwrap();
        r.register(Box::new(metrics.expert_changes.clone()))
            .unwrap();
        r.register(Box::new(metrics.request_memory_bytes.clone()))
            .unwrap();
        r.register(Box::new(metrics.request_memory_budget_bytes.clone()))
            .unwrap();
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
