//! Hostile clients against the real server (issue 9): memory bounded by configuration, no lock-out by slow or
//! stalled clients, API keys, an ops port, nothing private in answers. Small limits keep these fast.

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Client;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn first_case() -> (GoldenCase, Vec<u8>) {
    let package = package_dir();
    let case = golden(&package).cases[0].clone();
    let png = std::fs::read(package.join(&case.file)).unwrap();
    (case, png)
}

fn task_input(task: &str) -> Value {
    manifest(&package_dir())["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task)
        .unwrap()["input"]
        .clone()
}

/// An OIP request body of `n` zero images as JSON text (built as text: a `Value` tree would cost the test ~1 GB).
fn oip_zeros(task: &str, n: usize) -> String {
    let input = task_input(task);
    let (h, w) = (
        input["height"].as_u64().unwrap(),
        input["width"].as_u64().unwrap(),
    );
    let values = n * 3 * (h * w) as usize;
    let mut body = format!(
        r#"{{"inputs":[{{"name":"input","shape":[{n},3,{h},{w}],"datatype":"FP32","data":["#
    );
    body.reserve(values * 7);
    for i in 0..values {
        // Written the way clients write floats (and as long): "-0.424," is 7 bytes per value.
        body.push_str(if i == 0 { "-0.424" } else { ",-0.424" });
    }
    body.push_str("]}]}");
    body
}

async fn predict_ok(client: &Client, url: &str, png: &[u8], key: Option<&str>) -> (u16, Duration) {
    let started = Instant::now();
    let mut request = client
        .post(url)
        .header("content-type", "image/png")
        .body(png.to_vec());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    (status, started.elapsed())
}

/// One OIP request with 1,900 images (a 31 MB body under the 32 MiB limit) used to leave the server at ~1 GB RSS.
/// Now N above the per-request cap is 413 before any tensor is kept, an allowed N larger than the batch size runs in
/// batch-size pieces (ONNX Runtime's arena never sees more), and RSS stays within the configured memory plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_huge_request_cannot_grow_memory() {
    let (case, png) = first_case();
    let server = spawn_binary(&[
        "--cache-bytes",
        "32MiB",
        "--request-memory-bytes",
        "48MiB",
        "--max-connections",
        "256",
        "--max-client-batch-size",
        "64",
        "--max-batch-size",
        "8",
    ])
    .await;
    let client = Client::new();
    let info: Value = get_json(server.url("/v1/info")).await;
    let plan = info["memory_plan"]["total"].as_u64().unwrap();
    let infer = server.url(&format!("/v2/models/{}/infer", case.task));

    let huge = oip_zeros(&case.task, 1900);
    assert!(huge.len() > 30_000_000);
    for _ in 0..3 {
        let response = client
            .post(&infer)
            .header("content-type", "application/json")
            .body(huge.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("at most 64"),
            "{body}"
        );
    }
    // The largest allowed request runs (in pieces of 8) and answers every image.
    let response = client
        .post(&infer)
        .header("content-type", "application/json")
        .body(oip_zeros(&case.task, 64))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["outputs"][0]["shape"][0], 64);
    let first = &body["outputs"][0]["data"].as_array().unwrap()[..2];
    let last = &body["outputs"][0]["data"].as_array().unwrap()[126..];
    assert_eq!(
        first, last,
        "identical images, identical logits in every piece"
    );

    let (status, _) = predict_ok(
        &client,
        &server.url(&format!("/v1/experts/{}/predict", case.task)),
        &png,
        None,
    )
    .await;
    assert_eq!(status, 200);
    // The peak (VmHWM), not just what is left: a spike freed again would still have killed the pod.
    let rss = server.peak_rss_bytes();
    eprintln!(
        "peak RSS during the attack: {} MiB; memory plan {} MiB",
        rss >> 20,
        plan >> 20
    );
    assert!(
        rss < plan,
        "peak RSS {} MiB is over the memory plan of {} MiB",
        rss >> 20,
        plan >> 20
    );
}

/// Clients that upload large bodies slowly can spend the request-memory budget, but never past it: then new work
/// gets 503 + Retry-After at once (nothing waits, nothing grows), and once their body timeout ends them, the
/// budget is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_memory_budget_is_503_and_comes_back() {
    let (case, png) = first_case();
    let server = spawn_binary(&[
        "--request-memory-bytes",
        "8MiB",
        "--max-body-bytes",
        "5MiB",
        "--body-timeout-ms",
        "1500",
    ])
    .await;
    let predict = format!("/v1/experts/{}/predict", case.task);
    let client = Client::new();
    let big = vec![0u8; 3 << 20];
    // Two uploads of 2.5 MiB each, 2 MiB sent, then stalled: together they hold the 4 MiB budget.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        hogs.push(
            StalledRequest::open(
                &server.addr(),
                &predict,
                "image/png",
                &big[..5 << 19],
                2 << 20,
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut busy = None;
    for _ in 0..100 {
        let response = client
            .post(server.url(&predict))
            .header("content-type", "image/png")
            .body(big[..(1 << 20)].to_vec())
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            busy = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = busy.expect("a spent budget answers 503");
    assert_eq!(busy.headers()["retry-after"], "1");
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "memory_busy");

    // The hogs are cut off by the body timeout (408) and their memory returns: legitimate requests pass again.
    for hog in hogs {
        let raw = hog.response_without_finishing().await;
        assert!(
            raw.is_empty() || [408, 503].contains(&status_of(&raw)),
            "{raw}"
        );
    }
    let (status, _) = predict_ok(&client, &server.url(&predict), &png, None).await;
    assert_eq!(status, 200);
    let metrics = scrape(server.url("/metrics"), None).await;
    assert!(metric(&metrics, "lorkd_rejected_total{reason=\"memory\"}") >= 1.0);
    assert!(metric(&metrics, "lorkd_rejected_total{reason=\"body_timeout\"}") >= 2.0);
}

/// 300 connections that send the headers and 4 bytes of a 100 kB body and stall used to take every queue place
/// and lock everyone out with 429. Now they hold no queue place, only the 4 bytes they sent, and are cut off by
/// the body timeout; meanwhile legitimate requests keep answering 200 within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_lock_nobody_out() {
    let (case, png) = first_case();
    let server = spawn_binary(&["--body-timeout-ms", "3000", "--queue-capacity", "16"]).await;
    let predict = format!("/v1/experts/{}/predict", case.task);
    let mut body = png.clone();
    body.resize(100_000, 0);
    let mut stalled = Vec::new();
    for _ in 0..300 {
        stalled.push(StalledRequest::open(&server.addr(), &predict, "image/png", &body, 4).await);
    }
    let client = Client::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let (status, took) = predict_ok(&client, &server.url(&predict), &png, None).await;
        assert_eq!(
            status, 200,
            "a legitimate request failed while 300 uploads stall"
        );
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest legitimate request took {slowest:?}"
    );
    let metrics = scrape(server.url("/metrics"), None).await;
    assert_eq!(
        metric(&metrics, "lorkd_rejected_total{reason=\"queue_full\"}"),
        0.0
    );
    assert!(metric(&metrics, "lorkd_connections") >= 300.0);
    // Every stalled upload is answered 408 and closed at the body timeout.
    let mut timed_out = 0;
    for request in stalled {
        let raw = request.response_without_finishing().await;
        if status_of(&raw) == 408 {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 300);
}

/// Idle connections beyond LORKD_MAX_CONNECTIONS wait in the backlog instead of being served; connections that
/// never send a request are closed at the header timeout, so the cap cannot be held for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_and_idle_connections_are_closed() {
    let (case, png) = first_case();
    let server = spawn_binary(&["--max-connections", "20", "--header-timeout-ms", "800"]).await;
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(tokio::net::TcpStream::connect(server.addr()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = Client::new();
    // Served once the idle ones are closed at the header timeout.
    let (status, _) = predict_ok(
        &client,
        &server.url(&format!("/v1/experts/{}/predict", case.task)),
        &png,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let metrics = scrape(server.url("/metrics"), None).await;
    assert!(metric(&metrics, "lorkd_connections") <= 20.0);
    // The idle connections were closed by the server (read returns EOF, not a hang).
    let mut closed = 0;
    for mut stream in idle {
        let mut buf = [0u8; 64];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 30);
}

/// Partial headers sent slowly (slowloris) are cut off at the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let server = spawn_binary(&["--header-timeout-ms", "500"]).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    stream
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10 s");
    assert!(started.elapsed() >= Duration::from_millis(400));
}

const KEY_A: &str = "first-key-0123456789abcdef";
const KEY_B: &str = "rotated-key-0123456789abcdef";

/// API keys: 401 in the API's own error form without or with a wrong key, both rotation keys accepted, probes
/// and the API description open; keys read from a file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_everything_but_probes() {
    let (case, png) = first_case();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, format!("# rotated\n{KEY_B}\n")).unwrap();
    let server = start(&[
        "--api-keys",
        KEY_A,
        "--api-keys-file",
        key_file.to_str().unwrap(),
    ])
    .await;
    let client = Client::new();
    let predict = server.url(&format!("/v1/experts/{}/predict", case.task));
    for key in [
        None,
        Some("wrong-key-0123456789abcdef"),
        Some(&KEY_A[..KEY_A.len() - 1]),
    ] {
        let (status, _) = predict_ok(&client, &predict, &png, key).await;
        assert_eq!(status, 401, "{key:?}");
    }
    let response = client
        .post(&predict)
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Answered before the body was read: the connection is not reused (the client opens a new one).
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"lorkd\""
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    for key in [KEY_A, KEY_B] {
        let (status, _) = predict_ok(&client, &predict, &png, Some(key)).await;
        assert_eq!(status, 200);
    }
    let read = client
        .post(&predict)
        .bearer_auth(KEY_A)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert!(
        read.headers().get("connection").is_none(),
        "a request whose body was read keeps its connection"
    );
    // OIP routes answer 401 in the OIP error form.
    let oip = client
        .get(server.url(&format!("/v2/models/{}", case.task)))
        .send()
        .await
        .unwrap();
    assert_eq!(oip.status(), 401);
    assert!(oip.json::<Value>().await.unwrap()["error"].is_string());
    for path in ["/v1/experts", "/v1/info", "/metrics", "/v2"] {
        let status = client.get(server.url(path)).send().await.unwrap().status();
        assert_eq!(status, 401, "{path}");
        let status = client
            .get(server.url(path))
            .bearer_auth(KEY_B)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    for path in ["/v2/health/live", "/v2/health/ready", "/openapi.json"] {
        let status = client.get(server.url(path)).send().await.unwrap().status();
        assert_eq!(status, 200, "{path} must stay open");
    }
    let metrics = scrape(server.url("/metrics"), Some(KEY_A)).await;
    assert!(metric(&metrics, "lorkd_rejected_total{reason=\"unauthorized\"}") >= 9.0);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_or_missing_key_files_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# nothing yet\n").unwrap();
    for args in [
        vec!["--api-keys-file".to_string(), empty.display().to_string()],
        vec![
            "--api-keys-file".to_string(),
            dir.path().join("missing").display().to_string(),
        ],
        vec!["--api-keys".to_string(), "short".to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let error = lorkd::App::build(config(&package_dir(), &args)).await.err();
        assert!(error.is_some(), "{args:?} must refuse to start");
    }
}

/// With an ops port, the public port answers only the API (metrics and info are 404 there) and the ops port
/// serves metrics, info and probes without a key. Nothing sent to clients carries filesystem paths or OS errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_port_and_no_private_details() {
    let dir = tempfile::tempdir().unwrap();
    let package = dir.path().join("package");
    copy_package(&package_dir(), &package);
    // Damage one expert so that its disabled reason is shown.
    let tasks = task_ids(&package);
    let damaged = manifest(&package)["tasks"][0]["file"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(package.join(&damaged)).unwrap();
    let (server, ops) =
        start_with_ops(config(&package, &["--ops-port", "1", "--api-keys", KEY_A])).await;
    let client = Client::new();
    for path in ["/metrics", "/v1/info"] {
        let status = client
            .get(server.url(path))
            .bearer_auth(KEY_A)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{path} on the public port");
        let status = get_status(format!("{ops}{path}")).await;
        assert_eq!(status, 200, "{path} on the ops port");
    }
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let status = get_status(format!("{ops}{path}")).await;
        assert_eq!(status, 200, "{path} on the ops port");
    }
    let status = get_status(format!("{ops}/v1/experts")).await;
    assert_eq!(status, 404, "the API is not on the ops port");

    let info = client
        .get(format!("{ops}/v1/info"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let experts = client
        .get(server.url("/v1/experts"))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let disabled = client
        .post(server.url(&format!("/v1/experts/{}/predict", tasks[0])))
        .bearer_auth(KEY_A)
        .header("content-type", "image/png")
        .body(vec![0u8; 8])
        .send()
        .await
        .unwrap();
    assert_eq!(disabled.status(), 503);
    let disabled = disabled.text().await.unwrap();
    let root = dir.path().display().to_string();
    for text in [&info, &experts, &disabled] {
        assert!(
            !text.contains(&root),
            "a filesystem path reached a client: {text}"
        );
        assert!(
            !text.contains(".ort/"),
            "the library path reached a client: {text}"
        );
        assert!(
            !text.contains("os error"),
            "OS error text reached a client: {text}"
        );
        assert!(!text.contains(KEY_A), "a key reached a client");
    }
    assert!(experts.contains("cannot read expert file"), "{experts}");
    server.stop().await.unwrap();
}

/// Posts a hostile DICOM body to a fresh server: it must answer 400 without its peak RSS growing by 64 MiB, and
/// stay ready. Returns the error body.
async fn dicom_upload_is_a_400_in_bounded_memory(file: Vec<u8>) -> Value {
    let (case, _) = first_case();
    let server = spawn_binary(&[]).await;
    let before = server.peak_rss_bytes();
    let response = Client::new()
        .post(server.url(&format!("/v1/experts/{}/predict", case.task)))
        .header("content-type", "application/dicom")
        .body(file)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    let grown = server.peak_rss_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "peak RSS grew by {} MiB", grown >> 20);
    let ready = reqwest::get(server.url("/v2/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    body
}

/// Found by `scripts/test-fuzz.sh`: an 8 kB DICOM upload with an `SL` element of length 26 (not a whole number of
/// 4-byte values) put dicom-rs's reader out of step, so that it read text as a 775 MB length and allocated it.
/// Now it is a 400 and the server's memory does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_misaligned_binary_value_is_a_400() {
    let file = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz/dicom_numeric_length_misaligned.dcm"),
    )
    .unwrap();
    let body = dicom_upload_is_a_400_in_bounded_memory(file).await;
    assert!(
        body.to_string().contains("whole number of its values"),
        "{body}"
    );
}

/// Found by `scripts/test-fuzz.sh`: a 10 kB DICOM upload whose file meta group declares a 2.4 GB element made
/// dicom-rs allocate and zero-fill that much. Now it is a 400 and the server's memory does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_meta_length_bomb_is_a_400() {
    let mut file = vec![0u8; 128];
    file.extend_from_slice(b"DICM");
    file.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0, 0xbe, 0, 0, 0]);
    file.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
    // (0002,0002) with a corrupt VR: read with a 4-byte length of 0x8d8d8d8d
    file.extend_from_slice(&[0x02, 0x00, 0x02, 0x00]);
    file.extend(std::iter::repeat_n(0x8du8, 10_000));
    dicom_upload_is_a_400_in_bounded_memory(file).await;
}
