//! The inference backend's health as the probes see it: repeated ONNX Runtime failures turn readiness off until a
//! run succeeds, a server that is gone takes its backend thread (and sessions) with it.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use lorkd::{expert::Expert, runtime::UNHEALTHY_AFTER_FAILURES};

/// An expert whose weights have the wrong shapes: ONNX Runtime itself refuses every run with it.
fn broken_expert(server: &TestServer) -> Arc<Expert> {
    let package = &server.state.package;
    let layers = package
        .layers
        .iter()
        .map(|l| (l.name.clone(), vec![1, 1, 1, 1], vec![0.0f32]))
        .collect();
    let features = package.manifest.model.feature_dim;
    Arc::new(
        Expert::new(
            "broken",
            "0000000000000000",
            layers,
            (vec![2, features], vec![0.0; 2 * features]),
            vec![0.0; 2],
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_runs_turn_readiness_off_until_one_succeeds() {
    let server = start(&[]).await;
    let (h, w) = (
        server.state.package.manifest.input.height,
        server.state.package.manifest.input.width,
    );
    assert_eq!(get_status(server.url("/v2/health/ready")).await, 200);
    let broken = broken_expert(&server);
    for _ in 0..UNHEALTHY_AFTER_FAILURES {
        let result = server
            .state
            .backend
            .infer(broken.clone(), vec![0.0; 3 * h * w], 1, h, w)
            .await;
        assert!(result.is_err(), "ONNX Runtime must refuse the wrong shapes");
    }
    assert_eq!(get_status(server.url("/v2/health/ready")).await, 503);
    assert_eq!(
        get_status(server.url("/v2/health/live")).await,
        200,
        "failing runs are not a dead process"
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, "lorkd_inference_failures_total"),
        f64::from(UNHEALTHY_AFTER_FAILURES)
    );
    assert_eq!(metric(&metrics, "lorkd_backend_up"), 1.0);

    // One good run and the backend is healthy again.
    let package = package_dir();
    let case = golden(&package).cases[0].clone();
    let png = std::fs::read(package.join(&case.file)).unwrap();
    // predict_png asserts the 200.
    predict_png(
        &reqwest::Client::new(),
        server.url(&format!("/v1/experts/{}/predict", case.task)),
        png,
    )
    .await;
    assert_eq!(get_status(server.url("/v2/health/ready")).await, 200);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_thread_ends_with_the_server() {
    let server = start(&[]).await;
    let health = server.state.backend.health.clone();
    assert!(health.running());
    server.stop().await.unwrap();
    for _ in 0..500 {
        if !health.running() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the backend thread outlived every handle to it");
}
