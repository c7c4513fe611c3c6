//! Golden parity: every golden case of the package, through the native API (PNG) and OIP v2 (tensor), within tolerance.

mod common;

use common::*;
use serde_json::{json, Value};

/// Every golden case through both APIs (and all of a task's cases in one OIP batch); returns the max errors.
async fn check_golden(
    server: &TestServer,
    package: &std::path::Path,
    expect_session: Option<&str>,
) -> Vec<(String, f32, f32)> {
    let golden = golden(package);
    let manifest = manifest(package);
    let tasks = task_ids(package);
    assert!(!golden.cases.is_empty());
    let client = reqwest::Client::new();
    let mut report: Vec<(String, f32, f32)> = Vec::new();

    for task in &tasks {
        let spec = manifest["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == task.as_str())
            .unwrap();
        let cases: Vec<&GoldenCase> = golden.cases.iter().filter(|c| &c.task == task).collect();
        assert!(!cases.is_empty(), "no golden case for task {task}");
        let (mut native_max, mut oip_max) = (0.0f32, 0.0f32);
        let mut batch = Vec::new();
        for case in &cases {
            let png = std::fs::read(package.join(&case.file)).unwrap();

            let body = predict_png(
                &client,
                server.url(&format!("/v1/experts/{task}/predict?top_k=1")),
                png.clone(),
            )
            .await;
            let logits: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
            let diff = max_abs_diff(&logits, &case.logits);
            assert!(
                diff <= golden.tolerance,
                "{task} {} native: max diff {diff} > {}",
                case.file,
                golden.tolerance
            );
            assert_eq!(
                body["predictions"][0]["index"], case.top1,
                "{task} {} native top-1",
                case.file
            );
            assert_eq!(argmax(&logits), case.top1);
            if let Some(session) = expect_session {
                assert_eq!(body["session"], session);
            }
            native_max = native_max.max(diff);

            let input = preprocess_in_test(&png, spec);
            batch.extend_from_slice(&input);
            let (h, w) = (
                spec["input"]["height"].as_u64().unwrap(),
                spec["input"]["width"].as_u64().unwrap(),
            );
            let request = json!({"id": case.file, "inputs": [{"name": "input", "shape": [1, 3, h, w], "datatype": "FP32", "data": input}]});
            let response = client
                .post(server.url(&format!("/v2/models/{task}/infer")))
                .json(&request)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["model_name"], task.as_str());
            assert_eq!(body["id"], case.file.as_str());
            let output = &body["outputs"][0];
            assert_eq!(output["name"], "logits");
            assert_eq!(output["datatype"], "FP32");
            assert_eq!(output["shape"], json!([1, case.logits.len()]));
            let logits: Vec<f32> = serde_json::from_value(output["data"].clone()).unwrap();
            let diff = max_abs_diff(&logits, &case.logits);
            assert!(
                diff <= golden.tolerance,
                "{task} {} OIP: max diff {diff} > {}",
                case.file,
                golden.tolerance
            );
            assert_eq!(argmax(&logits), case.top1);
            oip_max = oip_max.max(diff);
        }

        // All of the task's cases in one OIP request (N > 1) give the same rows.
        let (h, w) = (
            spec["input"]["height"].as_u64().unwrap(),
            spec["input"]["width"].as_u64().unwrap(),
        );
        let request = json!({"inputs": [{"name": "input", "shape": [cases.len(), 3, h, w], "datatype": "FP32", "data": batch}]});
        let body: Value = client
            .post(server.url(&format!("/v2/models/{task}/infer")))
            .json(&request)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data: Vec<f32> = serde_json::from_value(body["outputs"][0]["data"].clone()).unwrap();
        let classes = cases[0].logits.len();
        assert_eq!(data.len(), cases.len() * classes);
        for (row, case) in data.chunks(classes).zip(&cases) {
            let diff = max_abs_diff(row, &case.logits);
            assert!(
                diff <= golden.tolerance,
                "{task} {} batched OIP: max diff {diff}",
                case.file
            );
            oip_max = oip_max.max(diff);
        }
        // The versioned path answers the same for the expert's version.
        let version = body["model_version"].as_str().unwrap();
        let versioned: Value = client
            .post(server.url(&format!("/v2/models/{task}/versions/{version}/infer")))
            .json(&request)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let versioned: Vec<f32> =
            serde_json::from_value(versioned["outputs"][0]["data"].clone()).unwrap();
        assert!(max_abs_diff(&versioned, &data) <= golden.tolerance);
        report.push((task.clone(), native_max, oip_max));
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_logits_through_native_and_oip_apis() {
    let server = start(&["--execution", "merged", "--dedicated-sessions", "0"]).await;
    let report = check_golden(&server, &package_dir(), Some("shared")).await;
    println!(
        "parity on the shared session (max |logit - golden|, tolerance {}):",
        golden(&package_dir()).tolerance
    );
    for (task, native, oip) in &report {
        println!("  {task:<12} native {native:.3e}  oip {oip:.3e}");
    }
    server.stop().await.unwrap();
}

/// Server flags that promote every expert to its own session (weights baked in) after its first request.
const PROMOTE_AT_ONCE: [&str; 6] = [
    "--execution",
    "merged",
    "--promote-after",
    "1",
    "--dedicated-sessions",
    "64",
];

/// One golden image of every task of `package` through the native API, then waits until every expert has been
/// promoted to a dedicated session (a server started with [`PROMOTE_AT_ONCE`]).
async fn promote_every_expert(server: &TestServer, package: &std::path::Path) {
    let tasks = task_ids(package);
    let golden = golden(package);
    let client = reqwest::Client::new();
    for task in &tasks {
        let case = golden.cases.iter().find(|c| &c.task == task).unwrap();
        let png = std::fs::read(package.join(&case.file)).unwrap();
        let response = client
            .post(server.url(&format!("/v1/experts/{task}/predict")))
            .header("content-type", "image/png")
            .body(png)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    wait_for_metrics(server, |m| {
        metric(m, "lorkd_dedicated_sessions") == tasks.len() as f64
    })
    .await;
}

/// The same golden answers once every expert is promoted to its own session (weights baked in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_logits_on_dedicated_sessions() {
    let package = package_dir();
    let server = start(&PROMOTE_AT_ONCE).await;
    promote_every_expert(&server, &package).await;
    let report = check_golden(&server, &package, Some("dedicated")).await;
    println!(
        "parity on dedicated sessions (max |logit - golden|, tolerance {}):",
        golden(&package).tolerance
    );
    for (task, native, oip) in &report {
        println!("  {task:<12} native {native:.3e}  oip {oip:.3e}");
    }
    server.stop().await.unwrap();
}

/// The second shipped package (MobileNetV3-small students made by the toolkit's generic decomposition) is served
/// by the same code with golden parity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_package_golden_logits() {
    let package =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/medmnist-mbv3s-lorkd");
    for (execution, session) in [("merged", "shared"), ("mixed", "mixed")] {
        let server = start_with(config(
            &package,
            &["--execution", execution, "--dedicated-sessions", "0"],
        ))
        .await;
        let report = check_golden(&server, &package, Some(session)).await;
        assert_eq!(report.len(), 3);
        for (task, native, oip) in &report {
            println!("  mbv3s {execution:<6} {task:<12} native {native:.3e}  oip {oip:.3e}");
        }
        server.stop().await.unwrap();
    }
}

/// A synthetic folder-of-images dataset (`synthetic-data --size <size>`) trained by `lorkd-train train` with the
/// `--set` overrides and exported into `dir/pkg`. Needs the toolkit in `.venv` (scripts/setup.sh, run by
/// `make test`).
fn train_synthetic_package(dir: &std::path::Path, size: &str, set: &[&str]) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cli = root.join(".venv/bin/lorkd-train");
    assert!(
        cli.exists(),
        "{} missing: run scripts/setup.sh",
        cli.display()
    );
    let d = |p: &str| dir.join(p).to_string_lossy().into_owned();
    let cfg_path = d("data/config.json");
    let (data, run, pkg) = (d("data"), d("run"), d("pkg"));
    let synthetic = [
        "synthetic-data",
        "--out",
        &data,
        "--size",
        size,
        "--arch",
        "mobilenet_v3_small",
    ];
    let mut train = vec![
        "train",
        "--config",
        &cfg_path,
        "--out",
        &run,
        "--no-progress",
    ];
    if !set.is_empty() {
        train.push("--set");
        train.extend_from_slice(set);
    }
    let export = ["export", "--run", &run, "--out", &pkg];
    for args in [&synthetic[..], &train[..], &export[..]] {
        let out = std::process::Command::new(&cli)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lorkd-train {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir.join("pkg")
}

/// End to end at 64 px: a synthetic folder-of-images dataset -> `lorkd-train train` -> `export` -> this server,
/// every golden case within tolerance. The student is a MobileNetV3-small with its 576 -> 1024 Linear decomposed
/// too (served as a 1x1 conv layer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_64px_folder_dataset_trains_exports_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let package = train_synthetic_package(dir.path(), "64", &[]);
    let m = manifest(&package);
    assert_eq!(m["input"]["height"], 64);
    assert!(m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "classifier.0.weight"));
    let server = start_with(config(&package, &[])).await;
    let report = check_golden(&server, &package, None).await;
    assert_eq!(report.len(), 2);
    server.stop().await.unwrap();
}

/// One BatchNorm per task (`task_bn`): every expert's own scale and shift are `[1, C, 1, 1]` layers that the
/// ordinary merge rule carries (FORMAT.md section 1), so this server, which knows nothing of them, gives every
/// golden case on the shared session, on dedicated sessions (weights baked in) and through the mixed-task graph.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_task_batchnorm_package_serves_golden_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let package = train_synthetic_package(
        dir.path(),
        "28",
        &[
            "arch=",
            "task_bn=true",
            "width=tiny",
            "decompose_linear=false",
        ],
    );
    let m = manifest(&package);
    let roles: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["role"].as_str())
        .collect();
    assert!(roles.contains(&"bn_scale") && roles.contains(&"bn_shift"));
    for (execution, session) in [("merged", "shared"), ("mixed", "mixed")] {
        let server = start_with(config(
            &package,
            &["--execution", execution, "--dedicated-sessions", "0"],
        ))
        .await;
        assert_eq!(
            check_golden(&server, &package, Some(session)).await.len(),
            2
        );
        server.stop().await.unwrap();
    }
    let server = start_with(config(&package, &PROMOTE_AT_ONCE)).await;
    promote_every_expert(&server, &package).await;
    assert_eq!(
        check_golden(&server, &package, Some("dedicated"))
            .await
            .len(),
        2
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn multipart_upload_equals_raw_body() {
    let package = package_dir();
    let case = golden(&package).cases[0].clone();
    let png = std::fs::read(package.join(&case.file)).unwrap();
    let server = start(&[]).await;
    let form = reqwest::multipart::Form::new()
        .text("note", "ignored field")
        .part(
            "image",
            reqwest::multipart::Part::bytes(png)
                .file_name("x.png")
                .mime_str("image/png")
                .unwrap(),
        );
    let response = reqwest::Client::new()
        .post(server.url(&format!("/v1/experts/{}/predict", case.task)))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let logits: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
    assert!(max_abs_diff(&logits, &case.logits) <= golden(&package).tolerance);
    server.stop().await.unwrap();
}

/// Real clinical-size samples (a colour JPEG and a PNG, not 28x28) go through decode, channel conversion and resize
/// for every task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_samples_are_resized_and_classified_by_every_task() {
    let package = package_dir();
    let server = start(&[]).await;
    let client = reqwest::Client::new();
    for (file, mime) in [
        ("retina.jpg", "image/jpeg"),
        ("microaneurysms.png", "image/png"),
    ] {
        let bytes =
            std::fs::read(samples_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for task in task_ids(&package) {
            let response = client
                .post(server.url(&format!("/v1/experts/{task}/predict?top_k=2")))
                .header("content-type", mime)
                .body(bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{file} -> {task}");
            let body: Value = response.json().await.unwrap();
            let predictions = body["predictions"].as_array().unwrap();
            assert!(!predictions.is_empty() && predictions.len() <= 2);
            let p0 = predictions[0]["probability"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&p0));
            let logits: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
            assert!(logits.iter().all(|v| v.is_finite()));
            assert_eq!(
                predictions[0]["index"].as_u64().unwrap() as usize,
                argmax(&logits)
            );
        }
    }
    server.stop().await.unwrap();
}
