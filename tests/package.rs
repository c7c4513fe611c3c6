//! Package verification against the real server and binary: a bad expert disables only itself, a tampered shared
//! model or a missing ONNX Runtime refuses to start with a clear message (no panic).

mod common;

use std::process::Command;

use common::*;
use lorkd::App;
use serde_json::Value;

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expert_file_disables_only_that_expert() {
    let source = package_dir();
    let tasks = task_ids(&source);
    let dir = tempfile::tempdir().unwrap();
    copy_package(&source, dir.path());
    let manifest = manifest(dir.path());
    let file_of = |task: &str| {
        manifest["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == task)
            .unwrap()["file"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let corrupted = tasks[0].clone();
    flip_byte(&dir.path().join(file_of(&corrupted)));
    let removed = (tasks.len() >= 3).then(|| tasks[2].clone());
    if let Some(task) = &removed {
        std::fs::remove_file(dir.path().join(file_of(task))).unwrap();
    }

    let server = start_with(config(dir.path(), &[])).await;
    let client = reqwest::Client::new();
    let expert: Value = get_json(server.url(&format!("/v1/experts/{corrupted}"))).await;
    assert_eq!(expert["status"], "disabled");
    assert!(
        expert["disabled_reason"]
            .as_str()
            .unwrap()
            .contains("sha256"),
        "{expert}"
    );
    let (healthy, png, logits, tolerance) = {
        let golden = golden(dir.path());
        let case = golden
            .cases
            .iter()
            .find(|c| c.task == tasks[1])
            .unwrap()
            .clone();
        (
            case.task.clone(),
            std::fs::read(dir.path().join(&case.file)).unwrap(),
            case.logits,
            golden.tolerance,
        )
    };
    let response = client
        .post(server.url(&format!("/v1/experts/{corrupted}/predict")))
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        get_status(server.url(&format!("/v2/models/{corrupted}/ready"))).await,
        503
    );
    if let Some(task) = &removed {
        let expert: Value = get_json(server.url(&format!("/v1/experts/{task}"))).await;
        assert_eq!(expert["status"], "disabled");
        assert!(
            expert["disabled_reason"]
                .as_str()
                .unwrap()
                .contains("cannot read"),
            "{expert}"
        );
    }

    // The others still serve the golden answers.
    let body = predict_png(
        &client,
        server.url(&format!("/v1/experts/{healthy}/predict")),
        png,
    )
    .await;
    let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
    assert!(max_abs_diff(&got, &logits) <= tolerance);
    assert_eq!(
        get_status(server.url(&format!("/v2/models/{healthy}/ready"))).await,
        200
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "lorkd_experts{status=\"disabled\"}"),
        (1 + removed.iter().count()) as f64
    );
    assert_eq!(
        metric(&metrics, "lorkd_experts{status=\"available\"}"),
        (tasks.len() - 1 - removed.iter().count()) as f64
    );
    let info: Value = get_json(server.url("/v1/info")).await;
    assert_eq!(
        info["package"]["experts"]["disabled"],
        1 + removed.iter().count()
    );
    server.stop().await.unwrap();
}

/// A task whose manifest input size the graph cannot take is disabled at load, with a reason that names the sizes
/// (and no filesystem path); the other tasks are unaffected.
#[test]
fn task_input_size_the_graph_cannot_take_disables_that_task() {
    let source = package_dir();
    let tasks = task_ids(&source);
    let dir = tempfile::tempdir().unwrap();
    copy_package(&source, dir.path());
    let mut manifest = manifest(dir.path());
    let graph = (
        manifest["input"]["height"].as_u64().unwrap(),
        manifest["input"]["width"].as_u64().unwrap(),
    );
    let wrong = (graph.0 * 2 + 8, graph.1 * 2 + 8);
    manifest["tasks"][0]["input"]["height"] = wrong.0.into();
    manifest["tasks"][0]["input"]["width"] = wrong.1.into();
    std::fs::write(
        dir.path().join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();

    let package = lorkd::package::Package::load(dir.path()).expect("package still loads");
    let bad = package.expert(&tasks[0]).unwrap();
    let lorkd::package::ExpertStatus::Disabled { reason } = &bad.status else {
        panic!("task {} should be disabled: {:?}", tasks[0], bad.status);
    };
    assert!(
        reason.contains(&format!("{}x{}", wrong.0, wrong.1))
            && reason.contains(&format!("{}x{}", graph.0, graph.1)),
        "{reason}"
    );
    let path = dir.path().to_string_lossy();
    assert!(
        !reason.contains(path.as_ref()) && !reason.contains('/'),
        "{reason}"
    );
    for task in &tasks[1..] {
        assert_eq!(
            package.expert(task).unwrap().status,
            lorkd::package::ExpertStatus::Available,
            "{task}"
        );
    }
}

#[tokio::test]
async fn tampered_shared_model_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    copy_package(&package_dir(), dir.path());
    flip_byte(&dir.path().join("student.onnx"));
    let error = App::build(config(dir.path(), &[]))
        .await
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(
        error.contains("student.onnx") && error.contains("sha256"),
        "{error}"
    );
}

#[tokio::test]
async fn missing_or_malformed_manifest_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let error = App::build(config(dir.path(), &[]))
        .await
        .err()
        .expect("no manifest")
        .to_string();
    assert!(error.contains("manifest.json"), "{error}");
    std::fs::write(
        dir.path().join("manifest.json"),
        "{\"format\": \"lorkd-package\"}",
    )
    .unwrap();
    let error = App::build(config(dir.path(), &[]))
        .await
        .err()
        .expect("bad manifest")
        .to_string();
    assert!(error.contains("manifest.json"), "{error}");
}

#[tokio::test]
async fn unknown_preload_task_refuses_to_start() {
    let error = App::build(config(&package_dir(), &["--preload", "no-such-task"]))
        .await
        .err()
        .expect("bad preload")
        .to_string();
    assert!(error.contains("no-such-task"), "{error}");
}

fn lorkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorkd"))
}

#[test]
fn binary_without_onnx_runtime_fails_with_one_clear_message() {
    let output = lorkd()
        .args([
            "--package",
            package_dir().to_str().unwrap(),
            "--port",
            "0",
            "--ort-library",
            "/nonexistent/libonnxruntime.so.1.31.1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ONNX Runtime library not found"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn binary_with_tampered_model_fails_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    copy_package(&package_dir(), dir.path());
    flip_byte(&dir.path().join("student.onnx"));
    let output = lorkd()
        .args(["--package", dir.path().to_str().unwrap(), "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve a modified model"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn print_env_vars_lists_every_setting() {
    let output = lorkd().arg("--print-env-vars").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    for expected in [
        "LORKD_HOST",
        "LORKD_PORT",
        "LORKD_PACKAGE",
        "LORKD_PROVIDER",
        "LORKD_CACHE_BYTES",
        "LORKD_PRELOAD",
        "LORKD_PIN",
        "LORKD_MAX_BATCH_SIZE",
        "LORKD_MAX_BATCH_WAIT_MS",
        "LORKD_QUEUE_CAPACITY",
        "LORKD_MAX_BODY_BYTES",
        "LORKD_MAX_IMAGE_PIXELS",
        "LORKD_MAX_IMAGE_SIDE",
        "LORKD_MAX_CLIENT_BATCH_SIZE",
        "LORKD_REQUEST_TIMEOUT_MS",
        "LORKD_SHUTDOWN_TIMEOUT_MS",
        "LORKD_LOG_FORMAT",
        "LORKD_INTRA_OP_THREADS",
    ] {
        assert!(names.contains(&expected), "{expected} missing:\n{text}");
    }
    assert!(names.iter().all(|n| n.starts_with("LORKD_")));
    // Environment variables really configure the binary: a bad value is rejected by name.
    let output = lorkd()
        .env("LORKD_PROVIDER", "tpu")
        .arg("--port=0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("tpu"));
}
