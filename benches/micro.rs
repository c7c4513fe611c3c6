//! Criterion micro-benchmarks (issue 5, item 1): expert assembly (whole expert and single layers), preprocessing
//! (decode + resize + normalise) for PNG and JPEG, and one inference through the service's path at batch 1, 8, 32.
//!
//! Package: `LORKD_BENCH_PACKAGE` (default models/medmnist-lorkd). Sample images come from `../shared/data/samples`
//! (`LORKD_BENCH_SAMPLES`). `cargo bench --bench micro`; `cargo test --benches` runs each once (smoke).

use std::{hint::black_box, path::PathBuf, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lorkd::{
    assembly::merge_layer,
    cache,
    package::Package,
    preprocess::{self, ImageLimits},
    runtime, App, Config,
};

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 40_000_000,
    max_side: 16_384,
};

fn package() -> Package {
    let dir =
        std::env::var("LORKD_BENCH_PACKAGE").unwrap_or_else(|_| "models/medmnist-lorkd".into());
    Package::load(&dir).unwrap_or_else(|e| panic!("package {dir}: {e}"))
}

fn samples() -> PathBuf {
    PathBuf::from(
        std::env::var("LORKD_BENCH_SAMPLES").unwrap_or_else(|_| "../shared/data/samples".into()),
    )
}

fn ort_environment() -> ort::environment::Environment {
    runtime::environment(&runtime::library_path(None)).expect("ONNX Runtime loads")
}

fn assembly(c: &mut Criterion) {
    let _env = ort_environment(); // tensors of the assembled expert need the loaded library
    let package = package();
    let mut group = c.benchmark_group("assembly");
    for task in package.experts.keys() {
        // Whole expert, as the cache builds it: every layer merged, plus ORT tensors and the head.
        group.bench_with_input(BenchmarkId::new("expert", task), task, |b, task| {
            b.iter(|| cache::assemble(&package, black_box(task)).expect("assembles"))
        });
    }
    // The merge arithmetic alone (all layers), without tensor creation.
    let task = package.experts.keys().next().expect("a task").clone();
    let deltas = package.experts[&task].deltas.clone().expect("enabled");
    group.bench_function(BenchmarkId::new("merge_all_layers", &task), |b| {
        b.iter(|| {
            for (base, (a, bf)) in package.layers.iter().zip(&deltas.factors) {
                black_box(merge_layer(base.shape, &base.w0, bf, a, deltas.scale).expect("merges"));
            }
        })
    });
    // The same, keeping every merged layer alive until the end (as an assembled expert does): the difference to
    // the line above is fresh-memory cost (page faults), not arithmetic.
    group.bench_function(BenchmarkId::new("merge_all_layers_kept", &task), |b| {
        b.iter(|| {
            package
                .layers
                .iter()
                .zip(&deltas.factors)
                .map(|(base, (a, bf))| {
                    merge_layer(base.shape, &base.w0, bf, a, deltas.scale).expect("merges")
                })
                .collect::<Vec<_>>()
        })
    });
    // Single layers: the smallest, the median and the largest by weight count.
    let mut order: Vec<usize> = (0..package.layers.len()).collect();
    order.sort_by_key(|&i| package.layers[i].shape.weight_len());
    let picks = [order[0], order[order.len() / 2], order[order.len() - 1]];
    for (label, &i) in ["smallest", "median", "largest"].iter().zip(&picks) {
        let base = &package.layers[i];
        let (a, bf) = &deltas.factors[i];
        let id = format!("{label}:{}:{:?}", base.name, base.shape.weight_shape());
        group.throughput(Throughput::Elements(base.shape.weight_len() as u64));
        group.bench_function(BenchmarkId::new("layer", id), |b| {
            b.iter(|| merge_layer(base.shape, &base.w0, bf, a, deltas.scale).expect("merges"))
        });
    }
    group.finish();
}

fn preprocessing(c: &mut Criterion) {
    let package = package();
    // An RGB task (resize + normalise to its input); the first task when none is RGB.
    let spec = package
        .manifest
        .tasks
        .iter()
        .find(|t| t.input.channels == 3)
        .unwrap_or(&package.manifest.tasks[0])
        .clone();
    let golden = package.root.join("golden").join(&spec.id).join("0.png");
    let images = [
        ("png_microaneurysms", samples().join("microaneurysms.png")),
        ("jpeg_retina", samples().join("retina.jpg")),
        ("png_golden_28px", golden),
    ];
    let mut group = c.benchmark_group("preprocess");
    for (name, path) in images {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!(
                    "preprocess/{name}: skipped, cannot read {}: {e}",
                    path.display()
                );
                continue;
            }
        };
        let (w, h) = preprocess::decode(&bytes, LIMITS)
            .expect("decodes")
            .dimensions();
        group.bench_function(
            BenchmarkId::new("decode_resize_normalise", format!("{name}:{w}x{h}")),
            |b| {
                b.iter(|| {
                    let pixels = preprocess::decode(black_box(&bytes), LIMITS).expect("decodes");
                    preprocess::to_task_input(&pixels, &spec.input)
                })
            },
        );
    }
    group.finish();
}

fn inference(c: &mut Criterion) {
    let dir =
        std::env::var("LORKD_BENCH_PACKAGE").unwrap_or_else(|_| "models/medmnist-lorkd".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The service's backend as the server builds it; experts stay on the shared session (weights fed as inputs)
    // where the server has the flag for it.
    let base = [
        "--package",
        dir.as_str(),
        "--provider",
        "cpu",
        "--max-batch-wait-ms",
        "0",
    ];
    let config = Config::from_args(base.iter().chain(&["--dedicated-sessions", "0"]))
        .or_else(|_| Config::from_args(base))
        .expect("config");
    let app = rt.block_on(App::build(config)).expect("service builds");
    let package = app.state.package.clone();
    let task = package.manifest.tasks[0].id.clone();
    let (expert, _) = rt
        .block_on(
            app.state
                .cache
                .get(&app.state.experts.get(&task).expect("task")),
        )
        .expect("assembles");
    let backend = app.state.backend.clone();
    let (h, w) = (package.manifest.input.height, package.manifest.input.width);
    let mut group = c.benchmark_group("inference");
    for batch in [1usize, 8, 32] {
        let input: Vec<f32> = (0..batch * 3 * h * w)
            .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 2.0)
            .collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(
            BenchmarkId::new("service_path_shared_session", batch),
            &batch,
            |b, &batch| {
                b.iter(|| {
                    rt.block_on(backend.infer(expert.clone(), input.clone(), batch, h, w))
                        .expect("runs")
                })
            },
        );
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = assembly, preprocessing, inference
}
criterion_main!(benches);
