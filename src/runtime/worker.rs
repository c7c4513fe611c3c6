//! The backend thread: takes batches from the batcher, splits each into runs as the scheduler plans, runs them
//! on its sessions, answers every job, and keeps health, metrics, costs and dedicated sessions up to date.

use std::{
    collections::{HashMap, HashSet},
    panic::AssertUnwindSafe,
    sync::{mpsc, Arc},
    thread,
    time::Instant,
};

use ort::{environment::Environment, session::Session};

use super::{
    batcher::{BatchPolicy, Batcher, Next},
    scheduler::{self, CostModel, ExecutionPath, Group},
    session::{self, Names, SessionFactory},
    BackendConfig, BackendHealth, InferOutput, Installed, Job, SessionKind,
};
use crate::{
    bank::{BankJob, RunBanks},
    config::Execution,
    expert::Expert,
    metrics::Metrics,
    package::{ExpertDeltas, Package},
};

/// Warm-up runs per path and batch size that seed the cost model.
const MEASURE_RUNS: usize = 3;

pub struct Worker {
    shared: Session,
    /// The mixed-task graph's session, when the package has one and the mode uses it.
    mixed: Option<Session>,
    banks: RunBanks,
    /// task -> (expert version, its own session)
    dedicated: HashMap<String, (String, Box<Session>)>,
    building: HashSet<String>,
    /// Jobs served per task on the shared session (promotion counter).
    served: HashMap<String, u64>,
    factory: Arc<SessionFactory>,
    names: Names,
    metrics: Metrics,
    health: Arc<BackendHealth>,
    /// Given to promotion threads; they answer on `installed`, which the loop drains between batches.
    installer: mpsc::Sender<Installed>,
    installed: mpsc::Receiver<Installed>,
    provider: &'static str,
    /// The mode in effect: `merged` when the package has no usable mixed graph.
    execution: Execution,
    costs: CostModel,
}

impl Worker {
    pub fn new(
        environment: &Environment,
        package: Arc<Package>,
        config: BackendConfig,
        metrics: Metrics,
        health: Arc<BackendHealth>,
    ) -> Result<Worker, String> {
        let mut factory = SessionFactory {
            environment: environment.clone(),
            package: package.clone(),
            config: config.clone(),
            cuda: false,
        };
        let (shared, provider) = factory.shared_session()?;
        let mixed = match (&package.eks, config.execution) {
            (_, Execution::Merged) | (None, _) => None,
            (Some(eks), _) => match factory.build(&eks.model_bytes) {
                Ok(session) => Some(session),
                Err(error) => {
                    tracing::warn!(%error, "the mixed-task graph does not load; every batch runs merged");
                    None
                }
            },
        };
        let execution = if mixed.is_some() {
            config.execution
        } else {
            Execution::Merged
        };
        if config.execution != execution {
            tracing::warn!(
                requested = ?config.execution,
                "the package has no usable mixed-task graph; execution is merged"
            );
        }
        let (installer, installed) = mpsc::channel();
        Ok(Worker {
            shared,
            mixed,
            banks: RunBanks::default(),
            dedicated: HashMap::new(),
            building: HashSet::new(),
            served: HashMap::new(),
            factory: Arc::new(factory),
            names: Names::of(&package),
            metrics,
            health,
            installer,
            installed,
            provider,
            execution,
            costs: CostModel::new(config.max_batch_size),
        })
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn execution(&self) -> Execution {
        self.execution
    }

    pub fn batch_policy(&self) -> BatchPolicy {
        let config = &self.factory.config;
        BatchPolicy {
            max_images: config.max_batch_size,
            max_wait: config.max_batch_wait,
            mixing: self.execution != Execution::Merged,
        }
    }

    /// Seeds the cost model: both paths at batch 1 and at the largest batch, with the base network's weights fed
    /// like an expert's (merged) and one bank row of zero factors (mixed). Also allocates ORT's arenas before the
    /// first client comes.
    pub fn measure_paths(&mut self) {
        let package = self.factory.package.clone();
        let (height, width) = (package.manifest.input.height, package.manifest.input.width);
        let features = package.manifest.model.feature_dim;
        let layers = package
            .layers
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.shape.weight_shape().to_vec(),
                    l.w0.clone(),
                )
            })
            .collect();
        let Ok(base) = Expert::new(
            "base",
            "base",
            layers,
            (vec![2, features], vec![0.0; 2 * features]),
            vec![0.0; 2],
        ) else {
            return;
        };
        let zero = Arc::new(ExpertDeltas {
            scale: 1.0,
            factors: package
                .layers
                .iter()
                .map(|l| {
                    let (a, b) = (l.shape.a_shape(), l.shape.b_shape());
                    (vec![0.0; a[0] * a[1]], vec![0.0; b[0] * b[1]])
                })
                .collect(),
            head_weight: vec![0.0; 2 * features],
            head_bias: vec![0.0; 2],
        });
        let max = self.factory.config.max_batch_size.max(1);
        for images in [1, max] {
            let input = vec![0.0f32; images * 3 * height * width];
            for _ in 0..MEASURE_RUNS {
                // `mixed` runs nothing merged but the warm-up base network: no reason to grow the shared session's
                // memory arena to the largest batch.
                if self.execution != Execution::Mixed || images == 1 {
                    let started = Instant::now();
                    let merged = session::run_merged(
                        &mut self.shared,
                        &self.names,
                        &base,
                        &input,
                        images,
                        (height, width),
                        true,
                    );
                    match merged {
                        Ok(_) => self.costs.observe(
                            ExecutionPath::Merged,
                            images,
                            started.elapsed().as_secs_f64(),
                        ),
                        Err(error) => tracing::warn!(%error, "measuring the merged path failed"),
                    }
                }
                let (Some(mixed), Some(eks)) = (self.mixed.as_mut(), package.eks.as_ref()) else {
                    continue;
                };
                let jobs = [BankJob {
                    deltas: &zero,
                    classes: 2,
                    images,
                }];
                self.banks.fill(&eks.layout, features, &jobs);
                let started = Instant::now();
                match session::run_mixed(mixed, &eks.spec, &self.banks, &input, (height, width)) {
                    Ok(_) => self.costs.observe(
                        ExecutionPath::Mixed,
                        images,
                        started.elapsed().as_secs_f64(),
                    ),
                    Err(error) => tracing::warn!(%error, "measuring the mixed path failed"),
                }
            }
        }
        tracing::info!(
            execution = ?self.execution,
            merged_1 = ?self.costs.estimate(ExecutionPath::Merged, 1),
            merged_max = ?self.costs.estimate(ExecutionPath::Merged, max),
            mixed_1 = ?self.costs.estimate(ExecutionPath::Mixed, 1),
            mixed_max = ?self.costs.estimate(ExecutionPath::Mixed, max),
            "execution paths measured (seconds per run)"
        );
    }

    pub fn run(mut self, rx: mpsc::Receiver<Job>, mut batcher: Batcher) {
        loop {
            while let Ok(message) = self.installed.try_recv() {
                self.install(message);
            }
            match batcher.next(&rx) {
                Next::Batch(batch) => self.serve(batch),
                Next::Idle => {}
                Next::Closed => return,
            }
        }
    }

    fn install(&mut self, message: Installed) {
        match message {
            Installed::Session {
                task,
                version,
                session,
            } => {
                self.building.remove(&task);
                tracing::info!(task = %task, "expert promoted to a dedicated session");
                self.dedicated.insert(task, (version, session));
                self.metrics
                    .dedicated_sessions
                    .set(self.dedicated.len() as i64);
            }
            Installed::BuildFailed { task } => {
                // Stays on the shared session; tried again after another `promote_after` requests.
                self.building.remove(&task);
                self.served.insert(task, 0);
            }
        }
    }

    /// Splits the batch into its experts' groups, plans the runs and answers every job.
    fn serve(&mut self, batch: Vec<Job>) {
        let mut groups: Vec<Vec<Job>> = Vec::new();
        for job in batch {
            match groups
                .iter_mut()
                .find(|g| g[0].runnable.same_expert(&job.runnable))
            {
                Some(group) => group.push(job),
                None => groups.push(vec![job]),
            }
        }
        let infos: Vec<Group> = groups
            .iter()
            .map(|g| Group {
                images: g.iter().map(|j| j.images).sum(),
                assembled: g[0].runnable.assembled.is_some(),
                mixable: self.mixed.is_some() && g[0].runnable.deltas.is_some(),
            })
            .collect();
        let plan = scheduler::plan(self.execution, &infos, &self.costs);
        let mut groups: Vec<Option<Vec<Job>>> = groups.into_iter().map(Some).collect();
        for i in plan.merged {
            if let Some(group) = groups[i].take() {
                self.run_merged(group);
            }
        }
        let mixed: Vec<Job> = plan
            .mixed
            .iter()
            .filter_map(|&i| groups[i].take())
            .flatten()
            .collect();
        if !mixed.is_empty() {
            self.run_mixed(mixed);
        }
    }

    /// One expert's jobs on its dedicated session when it has one, else on the shared session.
    fn run_merged(&mut self, jobs: Vec<Job>) {
        let Some(expert) = jobs[0].runnable.assembled.clone() else {
            answer_all(jobs, Err("expert is not assembled".into()));
            return;
        };
        let (height, width) = (jobs[0].height, jobs[0].width);
        let images: usize = jobs.iter().map(|j| j.images).sum();
        let input = session::stack_inputs(&jobs);
        let names = &self.names;
        let run = |session: &mut Session, feed: bool| {
            let started = Instant::now();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                session::run_merged(
                    session,
                    names,
                    &expert,
                    &input,
                    images,
                    (height, width),
                    feed,
                )
            }))
            .unwrap_or_else(|_| Err("inference panicked".to_string()))
            .map(|logits| (logits, started.elapsed().as_secs_f64()))
        };
        let dedicated = self
            .dedicated
            .get_mut(&expert.task)
            .filter(|(version, _)| *version == expert.version)
            .map(|(_, session)| session);
        let (mut kind, mut result) = match dedicated {
            Some(session) => (SessionKind::Dedicated, run(session, false)),
            None => (SessionKind::Shared, run(&mut self.shared, true)),
        };
        if kind == SessionKind::Dedicated && result.is_err() {
            // A dedicated session is an optimisation: drop it and answer from the shared session.
            tracing::warn!(task = %expert.task, error = ?result.as_ref().err(), "dedicated session failed; back to the shared session");
            self.dedicated.remove(&expert.task);
            self.metrics
                .dedicated_sessions
                .set(self.dedicated.len() as i64);
            kind = SessionKind::Shared;
            result = run(&mut self.shared, true);
        }
        let served_jobs = jobs.len() as u64;
        self.finish(jobs, result, expert.classes, kind, ExecutionPath::Merged);
        if kind == SessionKind::Shared && expert.promotable {
            let served = self.served.entry(expert.task.clone()).or_default();
            *served += served_jobs;
            let config = &self.factory.config;
            if *served >= config.promote_after
                && self.dedicated.len() + self.building.len() < config.dedicated_sessions
                && !self.building.contains(&expert.task)
            {
                self.promote(expert, height, width);
            }
        }
    }

    /// Jobs of any experts in one run of the mixed-task graph.
    fn run_mixed(&mut self, jobs: Vec<Job>) {
        let package = self.factory.package.clone();
        let (Some(session), Some(eks)) = (self.mixed.as_mut(), package.eks.as_ref()) else {
            answer_all(jobs, Err("the mixed path is not available".into()));
            return;
        };
        let bank_jobs: Option<Vec<BankJob<'_>>> = jobs
            .iter()
            .map(|j| {
                j.runnable.deltas.as_ref().map(|deltas| BankJob {
                    deltas,
                    classes: j.runnable.classes,
                    images: j.images,
                })
            })
            .collect();
        let Some(bank_jobs) = bank_jobs else {
            answer_all(jobs, Err("an expert of the batch has no factors".into()));
            return;
        };
        let (height, width) = (jobs[0].height, jobs[0].width);
        let input = session::stack_inputs(&jobs);
        let banks = &mut self.banks;
        let started = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            banks.fill(&eks.layout, package.manifest.model.feature_dim, &bank_jobs);
            session::run_mixed(session, &eks.spec, banks, &input, (height, width))
        }))
        .unwrap_or_else(|_| Err("inference panicked".to_string()))
        .map(|logits| (logits, started.elapsed().as_secs_f64()));
        drop(bank_jobs);
        let stride = self.banks.classes;
        self.finish(
            jobs,
            result,
            stride,
            SessionKind::Mixed,
            ExecutionPath::Mixed,
        );
    }

    /// Records the run (health, metrics, costs) and answers each job with its images' logits: `stride` values per
    /// image in the output, of which the job's expert's first `classes` are its own.
    fn finish(
        &mut self,
        jobs: Vec<Job>,
        result: Result<(Vec<f32>, f64), String>,
        stride: usize,
        session: SessionKind,
        path: ExecutionPath,
    ) {
        self.health.record(
            result.is_ok(),
            &self.metrics,
            result.as_ref().err().map(String::as_str),
        );
        let (logits, run_seconds) = match result {
            Ok(ok) => ok,
            Err(error) => {
                answer_all(jobs, Err(error));
                return;
            }
        };
        let total: usize = jobs.iter().map(|j| j.images).sum();
        self.costs.observe(path, total, run_seconds);
        self.metrics.batch_size.observe(total as f64);
        self.metrics.inference_seconds.observe(run_seconds);
        self.metrics
            .execution_batches
            .with_label_values(&[path.as_str()])
            .inc();
        self.metrics
            .execution_images
            .with_label_values(&[path.as_str()])
            .inc_by(total as u64);
        let mut rows = logits.chunks_exact(stride.max(1));
        for job in jobs {
            let classes = job.runnable.classes.min(stride);
            let mut own = Vec::with_capacity(job.images * classes);
            for row in rows.by_ref().take(job.images) {
                own.extend_from_slice(&row[..classes]);
            }
            let output = InferOutput {
                logits: own,
                queue_seconds: (job.enqueued.elapsed().as_secs_f64() - run_seconds).max(0.0),
                run_seconds,
                batch_images: total,
                session,
                path,
            };
            let _ = job.reply.send(Ok(output));
        }
    }

    /// Builds the expert's own session on a helper thread; the shared session keeps serving it meanwhile.
    fn promote(&mut self, expert: Arc<Expert>, height: usize, width: usize) {
        self.building.insert(expert.task.clone());
        self.dedicated.remove(&expert.task); // an older version, if any
        let (factory, names, installer, metrics) = (
            self.factory.clone(),
            self.names.clone(),
            self.installer.clone(),
            self.metrics.clone(),
        );
        let spawned = thread::Builder::new().name("lorkd-promote".into()).spawn(move || {
            let started = Instant::now();
            let message = match factory.dedicated(&expert, &names, height, width) {
                Ok(session) => {
                    metrics.session_build_seconds.observe(started.elapsed().as_secs_f64());
                    metrics.promotions.with_label_values(&[&expert.task]).inc();
                    Installed::Session { task: expert.task.clone(), version: expert.version.clone(), session: Box::new(session) }
                }
                Err(error) => {
                    tracing::warn!(task = %expert.task, %error, "building a dedicated session failed");
                    Installed::BuildFailed { task: expert.task.clone() }
                }
            };
            let _ = installer.send(message);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a promotion thread");
        }
    }
}

fn answer_all(jobs: Vec<Job>, result: Result<InferOutput, String>) {
    for job in jobs {
        let _ = job.reply.send(result.clone());
    }
}
