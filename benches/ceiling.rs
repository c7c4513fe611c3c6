//! The in-process ceiling (issue 5, item 2): ONNX Runtime throughput with no HTTP, side by side, per batch size.
//!
//! Variants, all on the same expert and the same ONNX Runtime library, interleaved round by round so that the
//! noise of a shared machine hits them alike:
//! - `standalone`: the merged single-task ONNX (`lorkd-train export-merged`: W_t and head baked in as constant
//!   initializers), one dedicated session at full optimisation. The best ONNX Runtime does for that network.
//! - `shared_direct`: the service's shared session (`student.onnx`) with W_t and the head fed as inputs, called
//!   directly (`Session::run`), no thread, no channel.
//! - `service`: the service's own path: `runtime::Backend` (backend thread, channels, batch assembly) fed one job
//!   of `batch` images.
//! - `shared_base`: the shared session fed only the input and head (W0 stays the overridable initializers),
//!   which tells what feeding the layer weights costs.
//! - `service_mixed` (issue 8): the service's mixed path (`LORKD_EXECUTION=mixed`): a batch of `batch` images of
//!   as many different experts (rotating through the package's experts; with a 1000-expert package every image
//!   has its own), one job each, in one run of the mixed-task graph.
//!
//! Also measures the resident memory one more standalone session adds (the naive "one model per task" cost).
//!
//! Environment: `LORKD_BENCH_PACKAGE` (default models/medmnist-lorkd), `LORKD_BENCH_TASK` (default: first task),
//! `LORKD_BENCH_MERGED` (merged ONNX of that task; without it `standalone` is skipped), `LORKD_BENCH_SECONDS`
//! (per variant and round, default 1.5), `LORKD_BENCH_ROUNDS` (default 5), `LORKD_BENCH_BATCHES` (default 1,8,32),
//! `LORKD_BENCH_THREADS` (ORT intra-op threads, default 0 = one per core), `LORKD_BENCH_OUT` (JSON result file). Run by `cargo bench --bench ceiling`; under `cargo test --benches` it
//! runs with tiny counts (a smoke check).

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lorkd::{cache, config::Execution, expert::Runnable, package::Package, runtime, App, Config};
use ort::{
    environment::Environment,
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue},
    value::Tensor,
};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// `LORKD_BENCH_THREADS`: ONNX Runtime intra-op threads for every variant (0 = its default, one per core).
fn threads() -> usize {
    env_or("LORKD_BENCH_THREADS", "0")
        .parse()
        .expect("LORKD_BENCH_THREADS")
}

fn session(environment: &Environment, bytes: &[u8]) -> Session {
    let mut builder = Session::builder(environment)
        .expect("session builder")
        .with_optimization_level(GraphOptimizationLevel::All)
        .expect("optimisation level");
    if threads() > 0 {
        builder = builder
            .with_intra_threads(threads())
            .expect("intra-op threads");
    }
    builder
        .commit_from_memory(bytes)
        .expect("ONNX Runtime loads the model")
}

/// One way of running `batch` images through the expert; returns the logits count as a sanity value.
type Runner<'a> = Box<dyn FnMut(&[f32], usize) -> usize + 'a>;

fn run_session(
    session: &mut Session,
    input: &[f32],
    batch: usize,
    side: usize,
    extra: &[(&str, &Tensor<f32>)],
) -> usize {
    let input = Tensor::from_array(([batch, 3, side, side], input.to_vec())).expect("input");
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
        vec![("input".into(), (&input).into())];
    for (name, value) in extra {
        inputs.push(((*name).into(), (*value).into()));
    }
    let outputs = session.run(inputs).expect("run");
    let (_, data) = outputs["logits"]
        .try_extract_tensor::<f32>()
        .expect("logits");
    data.len()
}

#[derive(Default, Clone)]
struct Cell {
    images_per_s: Vec<f64>,
    run_ms: Vec<f64>,
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then this is a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let package_dir = PathBuf::from(env_or("LORKD_BENCH_PACKAGE", "models/medmnist-lorkd"));
    let seconds: f64 = env_or("LORKD_BENCH_SECONDS", if smoke { "0.05" } else { "1.5" })
        .parse()
        .expect("LORKD_BENCH_SECONDS");
    let rounds: usize = env_or("LORKD_BENCH_ROUNDS", if smoke { "1" } else { "5" })
        .parse()
        .expect("LORKD_BENCH_ROUNDS");
    let batches: Vec<usize> = env_or("LORKD_BENCH_BATCHES", "1,8,32")
        .split(',')
        .map(|b| b.trim().parse().expect("LORKD_BENCH_BATCHES"))
        .collect();

    let environment =
        runtime::environment(&runtime::library_path(None)).expect("ONNX Runtime loads");
    let package = Package::load(&package_dir).expect("package loads");
    let task =
        std::env::var("LORKD_BENCH_TASK").unwrap_or_else(|_| package.manifest.tasks[0].id.clone());
    let side = package.manifest.input.height;
    assert_eq!(side, package.manifest.input.width, "square inputs only");
    let expert = Arc::new(cache::assemble(&package, &task).expect("expert assembles"));

    // Deterministic pseudo-image input, normalised range.
    let max_batch = *batches.iter().max().unwrap_or(&1);
    let input: Vec<f32> = (0..max_batch * 3 * side * side)
        .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 2.0)
        .collect();

    let merged_path = std::env::var("LORKD_BENCH_MERGED").ok().map(PathBuf::from);
    let merged_bytes = merged_path.as_ref().map(|p| {
        std::fs::read(p).unwrap_or_else(|e| panic!("cannot read merged model {}: {e}", p.display()))
    });

    let mut standalone = merged_bytes.as_ref().map(|b| session(&environment, b));
    let mut shared = session(&environment, &package.model_bytes);
    let mut shared_plain = session(&environment, &package.model_bytes);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The service as the server builds it (flags, not struct fields: the backend's settings evolve).
    let dir = package_dir.display().to_string();
    let threads = threads().to_string();
    let service = |extra: &[&str]| -> Option<App> {
        let mut args = vec![
            "--package",
            &dir,
            "--provider",
            "cpu",
            "--intra-op-threads",
            &threads,
        ];
        if !extra.contains(&"--max-batch-wait-ms") {
            args.extend_from_slice(&["--max-batch-wait-ms", "0"]);
        }
        args.extend_from_slice(extra);
        let config = match Config::from_args(&args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("service variant {extra:?} skipped: {e}");
                return None;
            }
        };
        Some(rt.block_on(App::build(config)).expect("service builds"))
    };
    // Every expert on the shared session (weights fed as inputs); when the server can promote hot experts to a
    // dedicated session, that variant too.
    let shared_app = service(&["--dedicated-sessions", "0"]).or_else(|| service(&[]));
    let shared_app = shared_app.expect("service builds");
    let dedicated_app = service(&["--dedicated-sessions", "1", "--promote-after", "1"]);
    let expert_of = |app: &App| {
        rt.block_on(
            app.state
                .cache
                .get(&app.state.experts.get(&task).expect("task")),
        )
        .expect("expert")
        .0
    };
    let shared_expert = expert_of(&shared_app);
    if let Some(app) = &dedicated_app {
        // Serve until the expert runs on its own session (the gauge says so), at most ~20 s.
        let e = expert_of(app);
        let x = vec![0.0f32; 3 * side * side];
        for _ in 0..200 {
            rt.block_on(app.state.backend.infer(e.clone(), x.clone(), 1, side, side))
                .expect("runs");
            if app
                .state
                .metrics
                .render()
                .lines()
                .any(|l| l.starts_with("lorkd_dedicated_sessions ") && !l.ends_with(" 0"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let tensor = |shape: Vec<usize>, data: &[f32]| {
        Tensor::from_array((shape, data.to_vec())).expect("tensor")
    };
    let owned: Vec<(&str, Tensor<f32>)> = expert
        .layers
        .iter()
        .map(|l| (l.name.as_str(), tensor(l.shape.clone(), &l.data)))
        .chain([
            (
                package.manifest.model.head_weight_input.as_str(),
                tensor(
                    vec![expert.classes, expert.feature_dim()],
                    &expert.head_weight,
                ),
            ),
            (
                package.manifest.model.head_bias_input.as_str(),
                tensor(vec![expert.classes], &expert.head_bias),
            ),
        ])
        .collect();
    let feeds: Vec<(&str, &Tensor<f32>)> = owned.iter().map(|(n, t)| (*n, t)).collect();
    let head_only: Vec<(&str, &Tensor<f32>)> = feeds[feeds.len() - 2..].to_vec();

    let mut runners: Vec<(&str, Runner)> = Vec::new();
    if let Some(s) = standalone.as_mut() {
        runners.push((
            "standalone",
            Box::new(move |x: &[f32], b: usize| run_session(s, x, b, side, &[])),
        ));
    }
    {
        let feeds = feeds.clone();
        let shared = &mut shared;
        runners.push((
            "shared_direct",
            Box::new(move |x: &[f32], b: usize| run_session(shared, x, b, side, &feeds)),
        ));
    }
    for (label, app) in [
        ("service_shared", Some(&shared_app)),
        ("service_dedicated", dedicated_app.as_ref()),
    ] {
        let Some(app) = app else { continue };
        let expert = if label == "service_shared" {
            shared_expert.clone()
        } else {
            expert_of(app)
        };
        let backend = app.state.backend.clone();
        let rt = &rt;
        runners.push((
            label,
            Box::new(move |x: &[f32], b: usize| {
                rt.block_on(backend.infer(expert.clone(), x.to_vec(), b, side, side))
                    .expect("service path runs")
                    .logits
                    .len()
            }),
        ));
    }
    // The mixed path: a batch of `b` images of `b` different experts (rotating through the package's experts, so
    // every run gathers other factors), each its own job, announced so that they form one run.
    let mixed_app = service(&["--execution", "mixed", "--max-batch-wait-ms", "50"])
        .filter(|app| app.state.backend.execution == Execution::Mixed);
    if let Some(app) = &mixed_app {
        let entries: Vec<_> = app
            .state
            .experts
            .snapshot()
            .values()
            .filter(|e| e.deltas.is_some())
            .cloned()
            .collect();
        let backend = app.state.backend.clone();
        let (rt, classes, mut next) = (&rt, expert.classes, 0usize);
        runners.push((
            "service_mixed",
            Box::new(move |x: &[f32], b: usize| {
                let stride = 3 * side * side;
                let jobs: Vec<_> = (0..b)
                    .map(|i| {
                        next = (next + 1) % entries.len();
                        (
                            entries[next].clone(),
                            x[i * stride..(i + 1) * stride].to_vec(),
                        )
                    })
                    .collect();
                rt.block_on(async {
                    let announced: Vec<_> = jobs.iter().map(|_| backend.announce()).collect();
                    let handles: Vec<_> = jobs
                        .into_iter()
                        .map(|(entry, image)| {
                            let backend = backend.clone();
                            tokio::spawn(async move {
                                let out = backend
                                    .infer(Runnable::from_entry(&entry, None), image, 1, side, side)
                                    .await
                                    .expect("mixed path runs");
                                assert_eq!(out.logits.len(), entry.spec.num_classes);
                                out.batch_images
                            })
                        })
                        .collect();
                    for handle in handles {
                        assert_eq!(handle.await.expect("job"), b, "one run per batch");
                    }
                    drop(announced);
                });
                b * classes
            }),
        ));
    }
    {
        let shared_plain = &mut shared_plain;
        runners.push((
            "shared_base",
            Box::new(move |x: &[f32], b: usize| run_session(shared_plain, x, b, side, &head_only)),
        ));
    }

    // Every variant must give one row of logits per image.
    for (name, run) in runners.iter_mut() {
        let n = run(&input[..2 * 3 * side * side], 2);
        assert_eq!(n, 2 * expert.classes, "{name}: wrong logits count");
    }

    let mut cells: BTreeMap<(String, usize), Cell> = BTreeMap::new();
    let budget = Duration::from_secs_f64(seconds);
    for round in 0..rounds {
        for &batch in &batches {
            let x = &input[..batch * 3 * side * side];
            // Rotate the order each round so no variant always runs first.
            let n = runners.len();
            for k in 0..n {
                let (name, run) = &mut runners[(k + round) % n];
                for _ in 0..2 {
                    run(x, batch); // warm
                }
                let mut times = Vec::new();
                let started = Instant::now();
                while started.elapsed() < budget || times.len() < 3 {
                    let t = Instant::now();
                    std::hint::black_box(run(x, batch));
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                let elapsed = started.elapsed().as_secs_f64();
                let cell = cells.entry((name.to_string(), batch)).or_default();
                cell.images_per_s
                    .push((times.len() * batch) as f64 / elapsed);
                cell.run_ms.push(median(&mut times));
            }
        }
    }
    drop(runners);

    // Naive memory: what each additional standalone session of the merged model adds to RSS.
    let naive = merged_bytes.as_ref().map(|bytes| {
        let count = if smoke { 2 } else { 8 };
        let before = rss_bytes();
        let mut sessions: Vec<Session> = (0..count).map(|_| session(&environment, bytes)).collect();
        for s in sessions.iter_mut() {
            run_session(s, &input[..3 * side * side], 1, side, &[]);
        }
        let per = (rss_bytes().saturating_sub(before)) as f64 / count as f64;
        drop(sessions);
        (per, bytes.len())
    });

    let mut rows = Vec::new();
    println!("ceiling: task {task}, {rounds} rounds x {seconds} s per variant and batch");
    println!(
        "{:<14} {:>5} {:>14} {:>12}",
        "variant", "batch", "images/s (med)", "run ms (med)"
    );
    for ((name, batch), cell) in &cells {
        let mut ips = cell.images_per_s.clone();
        let mut ms = cell.run_ms.clone();
        let (ips, ms) = (median(&mut ips), median(&mut ms));
        println!("{name:<14} {batch:>5} {ips:>14.1} {ms:>12.3}");
        rows.push(serde_json::json!({
            "variant": name, "batch": batch, "images_per_s": ips, "run_ms": ms,
            "rounds_images_per_s": cell.images_per_s,
        }));
    }
    let result = serde_json::json!({
        "task": task,
        "package": package_dir.display().to_string(),
        "merged_model": merged_path.map(|p| p.display().to_string()),
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "intra_op_threads": threads,
        "rows": rows,
        "expert_bytes": expert.bytes,
        "naive_session_rss_bytes": naive.map(|(per, _)| per),
        "merged_model_file_bytes": naive.map(|(_, size)| size),
        "smoke": smoke,
    });
    if let Ok(out) = std::env::var("LORKD_BENCH_OUT") {
        std::fs::write(&out, serde_json::to_string_pretty(&result).unwrap())
            .unwrap_or_else(|e| panic!("cannot write {out}: {e}"));
        println!("wrote {out}");
    }
}
