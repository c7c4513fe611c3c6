//! Start-up (package, ONNX Runtime, backend), warm-up, and serving with graceful shutdown.

use std::{
    collections::HashSet,
    future::Future,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    api::{self, Port},
    auth::ApiKeys,
    budget::MemoryBudget,
    cache::ExpertCache,
    config::{Config, LogFormat},
    expert::Expert,
    metrics::Metrics,
    overlay::Overlay,
    package::{ExpertStatus, Package},
    registry::{Experts, Registry},
    runtime::{self, Backend, BackendConfig},
    state::{AppState, Shared},
};

/// Why the server could not start. Its message is meant for the operator, as is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

/// A loaded, not yet serving, application.
pub struct App {
    pub state: AppState,
}

fn task_list(names: &[String], experts: &Experts, what: &str) -> Result<Vec<String>, StartupError> {
    let mut out = Vec::new();
    for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if name == "all" {
            out.extend(
                experts
                    .iter()
                    .filter(|(_, e)| e.status == ExpertStatus::Available)
                    .map(|(id, _)| id.clone()),
            );
        } else if experts.contains_key(name) {
            out.push(name.to_string());
        } else {
            return Err(StartupError(format!(
                "{what} names task `{name}`, which the package does not have (tasks: {})",
                experts.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    out.dedup();
    Ok(out)
}

impl App {
    /// Loads and verifies the package, loads ONNX Runtime, creates the session and starts the backend thread.
    pub async fn build(config: Config) -> Result<App, StartupError> {
        let started = Instant::now();
        let library = runtime::library_path(
            (!config.ort_library.is_empty())
                .then(|| PathBuf::from(&config.ort_library))
                .as_ref(),
        );
        let package_path = config.package.clone();
        let package = tokio::task::spawn_blocking(move || Package::load(&package_path))
            .await
            .map_err(|e| StartupError(format!("package loading panicked: {e}")))?
            .map_err(|e| StartupError(e.to_string()))?;
        for warning in &package.warnings {
            tracing::warn!(%warning, "package");
        }
        let package = Arc::new(package);
        let overlay = if config.overlay_dir.is_empty() {
            None
        } else {
            Some(
                Overlay::open(std::path::Path::new(&config.overlay_dir), &package)
                    .map_err(StartupError)?,
            )
        };
        let loaded: Experts = package
            .experts
            .iter()
            .map(|(id, e)| (id.clone(), Arc::new(e.clone())))
            .collect();
        let experts = Registry::new(match &overlay {
            Some(overlay) => overlay.apply(&package, loaded),
            None => loaded,
        });
        let pinned: HashSet<String> = task_list(&config.pin, &experts.snapshot(), "LORKD_PIN")?
            .into_iter()
            .collect();
        task_list(&config.preload, &experts.snapshot(), "LORKD_PRELOAD")?;

        let metrics = Metrics::new();
        let admission = Arc::new(tokio::sync::Semaphore::new(config.queue_capacity as usize));
        let backend_config = BackendConfig {
            provider: config.provider,
            cuda_device: config.cuda_device,
            intra_op_threads: config.intra_op_threads,
            max_batch_size: config.max_batch_size as usize,
            max_batch_wait: config.max_batch_wait(),
            dedicated_sessions: config.dedicated_sessions as usize,
            promote_after: config.promote_after,
            execution: config.execution,
        };
        let (backend_package, backend_metrics, lib) =
            (package.clone(), metrics.clone(), library.clone());
        let backend = tokio::task::spawn_blocking(move || -> Result<Backend, String> {
            let environment = runtime::environment(&lib)?;
            Backend::start(
                &environment,
                backend_package,
                backend_config,
                backend_metrics,
            )
        })
        .await
        .map_err(|e| StartupError(format!("runtime start-up panicked: {e}")))?
        .map_err(StartupError)?;

        let (available, disabled) = experts.counts();
        tracing::info!(
            package = %package.manifest.name,
            experts = available + disabled,
            available,
            provider = backend.provider,
            seconds = started.elapsed().as_secs_f64(),
            "package loaded"
        );
        metrics
            .info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                package.manifest.name.as_str(),
                backend.provider,
            ])
            .set(1);
        metrics
            .experts
            .with_label_values(&["available"])
            .set(available as i64);
        metrics
            .experts
            .with_label_values(&["disabled"])
            .set(disabled as i64);
        let api_keys = ApiKeys::new(&config.load_api_keys().map_err(StartupError)?);
        let admin_keys = ApiKeys::new(&config.load_admin_keys().map_err(StartupError)?);
        if admin_keys.enabled() {
            tracing::info!(
                keys = admin_keys.len(),
                "admin API on (admin keys required)"
            );
        }
        if api_keys.enabled() {
            tracing::info!(keys = api_keys.len(), "API keys required on the API routes");
        } else {
            tracing::warn!("authentication is off (no LORKD_API_KEYS / LORKD_API_KEYS_FILE): anyone who reaches the port can use the API");
        }
        let plan = MemoryPlan::new(&config, &package);
        if config.request_memory_bytes < plan.expert {
            return Err(StartupError(format!(
                "LORKD_REQUEST_MEMORY_BYTES ({}) is below what one expert assembly needs ({} bytes): no expert could ever be assembled",
                config.request_memory_bytes, plan.expert
            )));
        }
        let memory = MemoryBudget::new(config.request_memory_bytes);
        metrics
            .request_memory_budget_bytes
            .set(memory.total_bytes().min(i64::MAX as u64) as i64);
        match memory_limit_of_this_container() {
            Some(limit) if plan.total() > limit => tracing::warn!(
                planned_bytes = plan.total(),
                limit_bytes = limit,
                "the memory plan (see docs/deploy.md) exceeds this container's memory limit: lower LORKD_CACHE_BYTES or LORKD_REQUEST_MEMORY_BYTES, or raise the limit"
            ),
            limit => tracing::info!(planned_bytes = plan.total(), limit_bytes = ?limit, "memory plan"),
        }
        let cache = Arc::new(ExpertCache::new(
            package.clone(),
            config.cache_bytes,
            pinned,
            metrics.clone(),
            memory.clone(),
        ));
        let shared = Shared {
            config,
            package,
            cache,
            backend,
            metrics,
            admission,
            memory,
            api_keys,
            admin_keys,
            experts,
            overlay,
            decode_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )),
            ready: false.into(),
            started: Instant::now(),
            memory_plan: plan,
        };
        Ok(App {
            state: AppState(Arc::new(shared)),
        })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Assembles the preload and pin lists and runs each once (or the base network when the lists are empty),
    /// then marks the server ready.
    pub async fn warm_up(&self) -> Result<(), StartupError> {
        let state = &self.state;
        let experts = state.experts.snapshot();
        let mut tasks = task_list(&state.config.pin, &experts, "LORKD_PIN")?;
        tasks.extend(task_list(&state.config.preload, &experts, "LORKD_PRELOAD")?);
        let mut seen = HashSet::new();
        tasks.retain(|t| seen.insert(t.clone()));
        let started = Instant::now();
        let mut warmed = 0;
        for task in &tasks {
            let entry = &experts[task];
            if entry.status != ExpertStatus::Available {
                tracing::warn!(task = %task, "preload skipped: expert is disabled");
                continue;
            }
            let (height, width) = (entry.spec.input.height, entry.spec.input.width);
            let (expert, _) = state
                .cache
                .get(entry)
                .await
                .map_err(|e| StartupError(format!("warm-up of `{task}`: {e}")))?;
            state
                .backend
                .infer(expert, vec![0.0; 3 * height * width], 1, height, width)
                .await
                .map_err(|e| StartupError(format!("warm-up run of `{task}`: {e}")))?;
            warmed += 1;
        }
        if warmed == 0 {
            let manifest = &state.package.manifest;
            let (height, width) = (manifest.input.height, manifest.input.width);
            let features = manifest.model.feature_dim;
            let mut base = Expert::new(
                "base",
                "base",
                Vec::new(),
                (vec![1, features], vec![0.0; features]),
                vec![0.0],
            )
            .map_err(StartupError)?;
            base.promotable = false;
            state
                .backend
                .infer(
                    Arc::new(base),
                    vec![0.0; 3 * height * width],
                    1,
                    height,
                    width,
                )
                .await
                .map_err(|e| StartupError(format!("warm-up run of the base network: {e}")))?;
        }
        state.ready.store(true, Ordering::Release);
        tracing::info!(
            experts = warmed,
            seconds = started.elapsed().as_secs_f64(),
            "warm-up done; ready"
        );
        Ok(())
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets in-flight requests finish for at most
/// `LORKD_SHUTDOWN_TIMEOUT_MS`.
pub async fn serve(
    app: &App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_ops(app, listener, None, shutdown).await
}

/// [`serve`], plus the ops routes on their own listener when one is given (`LORKD_OPS_PORT`).
pub async fn serve_with_ops(
    app: &App,
    listener: TcpListener,
    ops: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = &app.state.config;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = config.shutdown_timeout();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            drain_ms = drain.as_millis() as u64,
            "shutdown requested: finishing in-flight requests"
        );
        let _ = stop_tx.send(true);
    });
    // One connection cap for both listeners: the ops port cannot be used to get around it.
    let connections = Arc::new(Semaphore::new(config.max_connections as usize));
    let limits = ConnectionLimits {
        connections,
        header_timeout: config.header_timeout(),
        drain,
    };
    let main = accept_loop(
        api::router_for(app.state.clone(), Port::Main),
        listener,
        limits.clone(),
        app.state.metrics.clone(),
        stop_rx.clone(),
    );
    match ops {
        Some(ops) => {
            let ops = accept_loop(
                api::router_for(app.state.clone(), Port::Ops),
                ops,
                limits,
                app.state.metrics.clone(),
                stop_rx,
            );
            let (a, b) = tokio::join!(main, ops);
            a.and(b)
        }
        None => main.await,
    }
}

#[derive(Clone)]
struct ConnectionLimits {
    connections: Arc<Semaphore>,
    header_timeout: std::time::Duration,
    drain: std::time::Duration,
}

/// Accepts connections while a connection slot is free (further clients wait in the listen backlog), serves
/// each with HTTP/1.1 and a header read timeout, and on shutdown closes idle connections and gives the busy
/// ones `drain` to finish.
async fn accept_loop(
    router: axum::Router,
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Metrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    // Resolves once shutdown is asked for (or its sender is gone, which only happens when the runtime stops).
    let mut stop = stop;
    let shutdown = async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
    };
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = limits.connections.clone().acquire_owned() => permit.expect("never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning; the listener itself stays usable.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        metrics.connections.inc();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            metrics.connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.drain) => {
            tracing::warn!("drain timeout passed with requests still in flight; exiting");
        }
    }
    Ok(())
}

/// What the process is planned to hold at most (docs/deploy.md, "Memory"): a measured base for the binary,
/// ONNX Runtime and its arena at the largest batch, the package's weights, its experts' factors, the mixed-task
/// graph and the banks of one mixed run, the cache budget plus one pooled expert, the request-memory budget, and
/// socket buffers of every allowed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    pub base: u64,
    pub package: u64,
    /// The factors and heads of the package's experts (loaded once; the mixed path reads them in place).
    pub experts: u64,
    /// The mixed-task graph (twice, as for the shared graph) and the banks of the largest mixed run.
    pub mixed: u64,
    pub cache: u64,
    pub requests: u64,
    pub connections: u64,
    /// One expert's assembled layers (what an assembly reserves from the request budget).
    pub expert: u64,
}

/// Resident memory of the service with the package loaded and before any expert, measured (docs/deploy.md).
pub const BASE_BYTES: u64 = 96 << 20;
/// Per-connection allowance: hyper's read and write buffers plus the task (measured ~20 KiB; rounded up).
pub const CONNECTION_BYTES: u64 = 32 << 10;

impl MemoryPlan {
    pub fn new(config: &Config, package: &Package) -> Self {
        let expert_bytes = package.expert_weight_bytes();
        MemoryPlan {
            base: BASE_BYTES,
            // W0 is held twice (parsed layers for assembly, and the session's copy of the graph).
            package: 2 * package.model_bytes.len() as u64,
            experts: package
                .experts
                .values()
                .filter_map(|e| e.deltas.as_ref())
                .map(|d| d.parameter_count() as u64 * 4)
                .sum(),
            mixed: mixed_bytes(config, package),
            cache: config.cache_bytes.saturating_add(expert_bytes),
            requests: config.request_memory_bytes,
            connections: u64::from(config.max_connections) * CONNECTION_BYTES,
            expert: expert_bytes,
        }
    }

    /// The plan as JSON, its parts and their `total` (`--print-memory-plan`, `/v1/info`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("plan serialises");
        value["total"] = self.total().into();
        value
    }

    pub fn total(&self) -> u64 {
        self.base
            .saturating_add(self.package)
            .saturating_add(self.experts)
            .saturating_add(self.mixed)
            .saturating_add(self.cache)
            .saturating_add(self.requests)
            .saturating_add(self.connections)
    }
}

/// The mixed path's memory: its graph as loaded and as ONNX Runtime holds it, plus the banks of a run of
/// `LORKD_MAX_BATCH_SIZE` images of as many experts (a factor row and a padded head each). 0 when it is off.
fn mixed_bytes(config: &Config, package: &Package) -> u64 {
    let Some(eks) = package
        .eks
        .as_ref()
        .filter(|_| config.execution != crate::config::Execution::Merged)
    else {
        return 0;
    };
    let classes = package
        .manifest
        .tasks
        .iter()
        .map(|t| t.num_classes)
        .max()
        .unwrap_or(1) as u64;
    let row = eks.layout.width as u64 + classes * (package.manifest.model.feature_dim as u64 + 1);
    2 * eks.model_bytes.len() as u64 + u64::from(config.max_batch_size) * row * 4
}

/// The cgroup (v2, then v1) memory limit of this process, when there is one.
fn memory_limit_of_this_container() -> Option<u64> {
    for path in [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ] {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(limit) = text.trim().parse::<u64>() {
                // cgroup v1 reports "no limit" as a huge page-aligned number.
                return (limit < (1 << 60)).then_some(limit);
            }
        }
    }
    None
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Installs the global tracing subscriber (JSON or pretty, filter from config). Call once, from the binary.
pub fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The binary's whole life: start, bind, warm up (while already answering liveness), serve until a signal.
pub async fn run(config: Config) -> Result<(), StartupError> {
    let address = config.listen_addr().map_err(StartupError)?;
    let ops_address = config.ops_addr().map_err(StartupError)?;
    let app = App::build(config).await?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| StartupError(format!("cannot listen on {address}: {e}")))?;
    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
    let ops = match ops_address {
        Some(address) => {
            let ops = TcpListener::bind(address)
                .await
                .map_err(|e| StartupError(format!("cannot listen on {address} (ops): {e}")))?;
            tracing::info!(%address, "ops routes (metrics, info, health) listening");
            Some(ops)
        }
        None => None,
    };
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<StartupError>();
    let warm_state = App {
        state: app.state.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = warm_state.warm_up().await {
            let _ = failed_tx.send(e);
        }
    });
    let warm_up_failed = Arc::new(std::sync::Mutex::new(None));
    let failure = warm_up_failed.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {},
            Ok(error) = failed_rx => {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
            }
        }
    };
    serve_with_ops(&app, listener, ops, shutdown)
        .await
        .map_err(|e| StartupError(format!("server error: {e}")))?;
    let failed = warm_up_failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    match failed {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
