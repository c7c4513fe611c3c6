//! Every error status of the API, in both wire forms, against the real server; the process keeps serving after each.

mod common;

use common::*;
use reqwest::{Client, Response};
use serde_json::{json, Value};

async fn native_error(response: Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

async fn oip_error(response: Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().await.unwrap();
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("OIP error form: {body}"))
        .to_string()
}

fn first_case() -> (String, Vec<u8>) {
    let package = package_dir();
    let case = golden(&package).cases[0].clone();
    (
        case.task.clone(),
        std::fs::read(package.join(&case.file)).unwrap(),
    )
}

fn oip_request(task_input: &Value, n: usize, data: Value) -> Value {
    let (h, w) = (
        task_input["height"].as_u64().unwrap() as usize,
        task_input["width"].as_u64().unwrap() as usize,
    );
    json!({"inputs": [{"name": "input", "shape": [n, 3, h, w], "datatype": "FP32", "data": data}]})
}

/// CRC-32 (IEEE) for hand-made PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    out
}

/// A 100000 x 100000 grey PNG header (10^10 pixels) with a token IDAT: a decompression bomb if decoded.
fn bomb_png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    png.extend(chunk(b"IHDR", &ihdr));
    // zlib stored block of 8 zero bytes
    let idat = [
        0x78, 0x01, 0x01, 0x08, 0x00, 0xf7, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x08, 0x00, 0x01,
    ];
    png.extend(chunk(b"IDAT", &idat));
    png.extend(chunk(b"IEND", &[]));
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors_and_the_server_keeps_serving() {
    let package = package_dir();
    let manifest = manifest(&package);
    let (task, png) = first_case();
    let task_input = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task.as_str())
        .unwrap()["input"]
        .clone();
    let server = start(&["--max-body-bytes", "64KiB"]).await;
    let client = Client::new();
    let predict = server.url(&format!("/v1/experts/{task}/predict"));
    let infer = server.url(&format!("/v2/models/{task}/infer"));

    // 400: not an image, truncated image, bad query
    native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body("definitely not a png")
            .send()
            .await
            .unwrap(),
        400,
        "bad_image",
    )
    .await;
    native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body(png[..png.len() * 3 / 5].to_vec())
            .send()
            .await
            .unwrap(),
        400,
        "bad_image",
    )
    .await;
    native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body(Vec::new())
            .send()
            .await
            .unwrap(),
        400,
        "bad_image",
    )
    .await;
    native_error(
        client
            .post(format!("{predict}?top_k=zero"))
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await
            .unwrap(),
        400,
        "bad_query",
    )
    .await;
    let form = reqwest::multipart::Form::new().text("picture", "no image field");
    native_error(
        client.post(&predict).multipart(form).send().await.unwrap(),
        400,
        "missing_image",
    )
    .await;

    // 400 (OIP form): bad JSON, wrong shape, wrong datatype, wrong name, non-finite values, wrong count
    let n = 3
        * task_input["height"].as_u64().unwrap() as usize
        * task_input["width"].as_u64().unwrap() as usize;
    oip_error(
        client
            .post(&infer)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    let mut wrong_shape = oip_request(&task_input, 1, json!(vec![0.0; n]));
    wrong_shape["inputs"][0]["shape"] = json!([1, 1, 28, 84]);
    assert!(oip_error(
        client.post(&infer).json(&wrong_shape).send().await.unwrap(),
        400
    )
    .await
    .contains("shape"));
    let mut wrong_type = oip_request(&task_input, 1, json!(vec![0; n]));
    wrong_type["inputs"][0]["datatype"] = json!("INT64");
    assert!(oip_error(
        client.post(&infer).json(&wrong_type).send().await.unwrap(),
        400
    )
    .await
    .contains("FP32"));
    let mut wrong_name = oip_request(&task_input, 1, json!(vec![0.0; n]));
    wrong_name["inputs"][0]["name"] = json!("pixels");
    oip_error(
        client.post(&infer).json(&wrong_name).send().await.unwrap(),
        400,
    )
    .await;
    let mut overflow = vec![json!(0.0); n];
    overflow[7] = json!(1e39); // beyond FP32: would become +inf
    assert!(oip_error(
        client
            .post(&infer)
            .json(&oip_request(&task_input, 1, json!(overflow)))
            .send()
            .await
            .unwrap(),
        400
    )
    .await
    .contains("infinite"));
    let mut nan = vec![json!(0.0); n];
    nan[3] = json!("NaN");
    oip_error(
        client
            .post(&infer)
            .json(&oip_request(&task_input, 1, json!(nan)))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    oip_error(
        client
            .post(&infer)
            .json(&oip_request(&task_input, 2, json!(vec![0.0; n])))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    let mut huge_batch = oip_request(&task_input, 1, json!(vec![0.0; n]));
    huge_batch["inputs"][0]["shape"][0] = json!(1_000_000_000_000i64);
    // over LORKD_MAX_CLIENT_BATCH_SIZE: 413 before anything is sized from the declared N
    let message = oip_error(
        client.post(&infer).json(&huge_batch).send().await.unwrap(),
        413,
    )
    .await;
    assert!(message.contains("at most 32"), "{message}");
    let mut bad_output = oip_request(&task_input, 1, json!(vec![0.0; n]));
    bad_output["outputs"] = json!([{"name": "features"}]);
    oip_error(
        client.post(&infer).json(&bad_output).send().await.unwrap(),
        400,
    )
    .await;

    // 404: unknown task (both forms), unknown route
    native_error(
        client
            .post(server.url("/v1/experts/no-such-task/predict"))
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    native_error(
        client
            .get(server.url("/v1/experts/no-such-task"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    oip_error(
        client
            .post(server.url("/v2/models/no-such-task/infer"))
            .json(&json!({"inputs": []}))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    oip_error(
        client
            .get(server.url("/v2/models/no-such-task"))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    native_error(
        client
            .get(server.url("/v1/nothing-here"))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    native_error(
        client.get(&predict).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;

    // 413: declared too large, and too large without a declared length (chunked)
    let big = vec![0u8; 100 * 1024];
    native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body(big.clone())
            .send()
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    oip_error(
        client
            .post(&infer)
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;
    let chunked = chunked_post(
        &server.addr(),
        &format!("/v1/experts/{task}/predict"),
        "image/png",
        &big,
    )
    .await;
    assert_eq!(status_of(&chunked), 413, "{chunked}");
    assert!(chunked.contains("payload_too_large"));

    // 415: unsupported or missing content type, and a real image in an unsupported format
    native_error(
        client
            .post(&predict)
            .header("content-type", "text/plain")
            .body(png.clone())
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    native_error(
        client
            .post(&predict)
            .body(png.clone())
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;
    let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;".to_vec();
    native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body(gif)
            .send()
            .await
            .unwrap(),
        415,
        "unsupported_media_type",
    )
    .await;

    // 422: a decompression bomb is rejected from its header, before decoding
    let body = native_error(
        client
            .post(&predict)
            .header("content-type", "image/png")
            .body(bomb_png())
            .send()
            .await
            .unwrap(),
        422,
        "image_too_large",
    )
    .await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100000x100000"),
        "{body}"
    );

    // Still alive and still correct.
    assert_eq!(
        client
            .get(server.url("/v2/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ok = client
        .post(&predict)
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = server.metrics().await;
    assert!(metric(&metrics, "lorkd_http_requests_total{method=\"POST\",route=\"/v1/experts/{task}/predict\",status=\"400\"}") >= 4.0, "{metrics}");
    server.stop().await.unwrap();
}

async fn chunked_post(addr: &str, path: &str, content_type: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(8192) {
        if stream
            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .is_err()
        {
            break; // the server may answer 413 and close before we finish
        }
        let _ = stream.write_all(piece).await;
        let _ = stream.write_all(b"\r\n").await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_dimension_limit_is_422() {
    let (task, png) = first_case();
    let server = start(&["--max-image-side", "16"]).await;
    let response = Client::new()
        .post(server.url(&format!("/v1/experts/{task}/predict")))
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    native_error(response, 422, "image_too_large").await;
    server.stop().await.unwrap();
}

/// Queue capacity 1: while one admitted request waits for its body, the next gets 429 + Retry-After at once,
/// in both forms; the first then completes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_with_retry_after_before_decoding() {
    let package = package_dir();
    let manifest = manifest(&package);
    let (task, png) = first_case();
    let task_input = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task.as_str())
        .unwrap()["input"]
        .clone();
    let server = start(&["--queue-capacity", "1"]).await;
    let path = format!("/v1/experts/{task}/predict");
    let client = Client::new();
    // A stalled upload holds no place in the queue (admission comes after the body is read) ...
    let stalled = StalledRequest::open(&server.addr(), &path, "image/png", &png, 16).await;
    let response = client
        .post(server.url(&path))
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a stalled upload must not fill a queue of one"
    );
    assert_eq!(metric(&server.metrics().await, "lorkd_queue_depth"), 0.0);

    // ... while an admitted request does: hold the one place as a request being served would.
    let held = server.state.admit().expect("the queue is empty");
    let response = client
        .post(server.url(&path))
        .header("content-type", "image/png")
        .body(png.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    native_error(response, 429, "overloaded").await;
    let n = 3
        * task_input["height"].as_u64().unwrap() as usize
        * task_input["width"].as_u64().unwrap() as usize;
    let response = client
        .post(server.url(&format!("/v2/models/{task}/infer")))
        .json(&oip_request(&task_input, 1, json!(vec![0.0; n])))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    oip_error(response, 429).await;
    assert_eq!(
        metric(
            &server.metrics().await,
            "lorkd_rejected_total{reason=\"queue_full\"}"
        ),
        2.0
    );
    drop(held);

    let raw = stalled.finish().await;
    assert_eq!(status_of(&raw), 200, "{raw}");
    wait_for_metrics(&server, |m| metric(m, "lorkd_queue_depth") == 0.0).await;
    server.stop().await.unwrap();
}

/// A request that cannot finish (its body never arrives) is answered 504 at the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_is_504() {
    let (task, png) = first_case();
    let server = start(&["--request-timeout-ms", "300"]).await;
    let stalled = StalledRequest::open(
        &server.addr(),
        &format!("/v1/experts/{task}/predict"),
        "image/png",
        &png,
        16,
    )
    .await;
    let raw = stalled.response_without_finishing().await;
    assert_eq!(status_of(&raw), 504, "{raw}");
    assert!(raw.contains("\"timeout\""), "{raw}");
    let response = Client::new()
        .get(server.url("/v2/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await.unwrap();
}
