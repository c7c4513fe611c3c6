//! The router called as a function (tower `oneshot`), the OpenAPI snapshot, readiness and graceful shutdown.

mod common;

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use common::*;
use http_body_util::BodyExt;
use lorkd::{api, App};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

async fn call(
    app: &App,
    method: &str,
    uri: &str,
    body: Body,
    content_type: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = app
        .router()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    assert!(
        response.headers().contains_key("x-request-id"),
        "every response carries a request id"
    );
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json)
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn router_as_a_function() {
    let package = package_dir();
    let app = App::build(config(&package, &[])).await.unwrap();

    // Live at once; ready only after warm-up.
    assert_eq!(
        call(&app, "GET", "/v2/health/live", Body::empty(), None)
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = call(&app, "GET", "/v2/health/ready", Body::empty(), None).await;
    assert_eq!(
        (status, body["ready"].as_bool()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(false))
    );
    app.warm_up().await.unwrap();
    assert_eq!(
        call(&app, "GET", "/v2/health/ready", Body::empty(), None)
            .await
            .0,
        StatusCode::OK
    );

    // Experts: every task listed, version = FORMAT.md hash of the two files.
    let manifest = manifest(&package);
    let model_sha = hex(&std::fs::read(package.join("student.onnx")).unwrap());
    let (status, list) = call(&app, "GET", "/v1/experts", Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
    let experts = list["experts"].as_array().unwrap();
    assert_eq!(experts.len(), manifest["tasks"].as_array().unwrap().len());
    for task in manifest["tasks"].as_array().unwrap() {
        let id = task["id"].as_str().unwrap();
        let expert = experts.iter().find(|e| e["id"] == id).unwrap();
        let expert_sha = hex(&std::fs::read(package.join(task["file"].as_str().unwrap())).unwrap());
        let version = &hex(format!("{model_sha}:{expert_sha}").as_bytes())[..16];
        assert_eq!(expert["version"], version);
        assert_eq!(expert["labels"], task["labels"]);
        assert_eq!(expert["status"], "available");
        assert_eq!(expert["rank"], manifest["lora"]["rank"]);
        assert!(expert["parameters"]["delta"].as_u64().unwrap() > 0);

        let (status, meta) = call(
            &app,
            "GET",
            &format!("/v2/models/{id}"),
            Body::empty(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(meta["versions"][0], version);
        assert_eq!(meta["inputs"][0]["datatype"], "FP32");
        assert_eq!(meta["inputs"][0]["shape"][1], 3);
        assert_eq!(meta["outputs"][0]["shape"][1], task["num_classes"]);
        let (status, ready) = call(
            &app,
            "GET",
            &format!("/v2/models/{id}/ready"),
            Body::empty(),
            None,
        )
        .await;
        assert_eq!(
            (status, ready["ready"].as_bool()),
            (StatusCode::OK, Some(true))
        );
        let (status, _) = call(
            &app,
            "GET",
            &format!("/v2/models/{id}/versions/{version}/ready"),
            Body::empty(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (status, meta) = call(
            &app,
            "GET",
            &format!("/v2/models/{id}/versions/{version}"),
            Body::empty(),
            None,
        )
        .await;
        assert_eq!((status, meta["name"].as_str()), (StatusCode::OK, Some(id)));
        let (status, body) = call(
            &app,
            "GET",
            &format!("/v2/models/{id}/versions/0000000000000000"),
            Body::empty(),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("version"));
    }

    // Info shows the provider actually chosen (auto falls back to CPU with the PyPI CPU library).
    let (status, info) = call(&app, "GET", "/v1/info", Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(["cpu", "cuda"].contains(&info["runtime"]["provider"].as_str().unwrap()));
    assert_eq!(info["config"]["provider"], "auto");
    assert_eq!(info["runtime"]["requested_provider"], "auto");
    assert_eq!(info["package"]["name"], manifest["name"]);

    // JSON errors from the fallbacks, too.
    let (status, body) = call(&app, "GET", "/nope", Body::empty(), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = call(&app, "DELETE", "/v1/experts", Body::empty(), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    let (status, body) = call(&app, "GET", "/v2/models/nope/ready", Body::empty(), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // Metrics carry route-level counters for what we just did.
    let response = app
        .router()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(
            "lorkd_http_requests_total{method=\"GET\",route=\"/v1/experts\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("lorkd_queue_depth 0"));
}

/// `/openapi.json` is generated from the route list; the committed snapshot shows every API change in review.
/// Regenerate with `UPDATE_SNAPSHOTS=1 cargo test --test router`.
#[tokio::test]
async fn openapi_document_matches_snapshot_and_covers_every_route() {
    let document = api::openapi::document();
    let rendered = serde_json::to_string_pretty(&document).unwrap() + "\n";
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/openapi.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &rendered).unwrap();
    }
    let snapshot = std::fs::read_to_string(&path)
        .expect("tests/snapshots/openapi.json (create with UPDATE_SNAPSHOTS=1)");
    assert_eq!(
        rendered, snapshot,
        "OpenAPI document changed; review and regenerate with UPDATE_SNAPSHOTS=1"
    );
    for route in api::ROUTES {
        assert!(
            document["paths"][route.path][route.method.to_ascii_lowercase()].is_object(),
            "{} {}",
            route.method,
            route.path
        );
    }
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(operations, api::ROUTES.len(), "one operation per route");
}

/// The served document equals the generated one and every documented route is mounted.
#[tokio::test]
async fn every_documented_route_is_mounted() {
    let app = App::build(config(&package_dir(), &[])).await.unwrap();
    let (status, served) = call(&app, "GET", "/openapi.json", Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, api::openapi::document());
    let task = task_ids(&package_dir())[0].clone();
    let (_, expert) = call(
        &app,
        "GET",
        &format!("/v1/experts/{task}"),
        Body::empty(),
        None,
    )
    .await;
    let version = expert["version"].as_str().unwrap().to_string();
    for route in api::ROUTES {
        let uri = route
            .path
            .replace("{task}", &task)
            .replace("{version}", &version);
        let (status, body) = call(&app, route.method, &uri, Body::empty(), None).await;
        let unmatched = status == StatusCode::NOT_FOUND
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no route"));
        assert!(
            !unmatched && status != StatusCode::METHOD_NOT_ALLOWED,
            "{} {uri} not mounted: {status}",
            route.method
        );
    }
}

/// SIGTERM/Ctrl-C path: an admitted request still finishes (200) after shutdown is requested; then the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let package = package_dir();
    let case = golden(&package).cases[0].clone();
    let png = std::fs::read(package.join(&case.file)).unwrap();
    let mut server = start(&[]).await;
    let stalled = StalledRequest::open(
        &server.addr(),
        &format!("/v1/experts/{}/predict", case.task),
        "image/png",
        &png,
        16,
    )
    .await;
    // In flight: its first body bytes are held in request memory (it takes a queue place only once read).
    wait_for_metrics(&server, |m| metric(m, "lorkd_request_memory_bytes") > 0.0).await;
    server.trigger_shutdown();
    let raw = stalled.finish().await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    server.handle.await.unwrap().unwrap();
}
