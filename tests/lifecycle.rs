//! Experts added, replaced and removed while serving (issue 11), against the real server: every change verified
//! before it is visible, golden parity for what was added, other tasks under concurrent load see no failure,
//! changes survive a restart through the overlay folder, and only admin keys may change anything.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use common::*;
use reqwest::{multipart, Client};
use serde_json::{json, Value};

const API_KEY: &str = "lifecycle-api-key-0123456789";
const ADMIN_KEY: &str = "lifecycle-admin-key-0123456789";

/// The `spec` part for `task`'s manifest entry (everything but id and file).
fn spec_of(task: &str) -> Value {
    let manifest = manifest(&package_dir());
    let entry = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task)
        .unwrap()
        .clone();
    json!({
        "name": entry["name"], "modality": entry["modality"], "labels": entry["labels"],
        "num_classes": entry["num_classes"], "input": entry["input"],
    })
}

fn expert_file_of(task: &str) -> Vec<u8> {
    let manifest = manifest(&package_dir());
    let file = manifest["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == task)
        .unwrap()["file"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::read(package_dir().join(file)).unwrap()
}

/// `file` (a safetensors expert) with its metadata's task id set to `task`: the same trained weights, prepared to
/// be served under another id (the server checks that the file names the task it is uploaded for).
fn retag(file: &[u8], task: &str) -> Vec<u8> {
    let length = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&file[8..8 + length]).unwrap();
    header["__metadata__"]["task"] = json!(task);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&file[8 + length..]);
    out
}

/// The upload of `source`'s trained expert under the id `as_task` (its spec and its file, re-tagged).
fn prepared(source: &str, as_task: &str) -> multipart::Form {
    upload(&spec_of(source), retag(&expert_file_of(source), as_task))
}

/// GET `path` with the API key, as JSON.
async fn get_keyed_json(client: &Client, server: &TestServer, path: &str) -> Value {
    client
        .get(server.url(path))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn upload(spec: &Value, file: Vec<u8>) -> multipart::Form {
    multipart::Form::new()
        .part(
            "spec",
            multipart::Part::text(spec.to_string())
                .mime_str("application/json")
                .unwrap(),
        )
        .part(
            "expert",
            multipart::Part::bytes(file).file_name("expert.safetensors"),
        )
}

async fn put(
    client: &Client,
    server: &TestServer,
    task: &str,
    form: multipart::Form,
    key: Option<&str>,
) -> (u16, Value) {
    let mut request = client
        .put(server.url(&format!("/v1/experts/{task}")))
        .multipart(form);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn predict_logits(
    client: &Client,
    server: &TestServer,
    task: &str,
    png: &[u8],
) -> (u16, Vec<f32>) {
    let response = client
        .post(server.url(&format!("/v1/experts/{task}/predict")))
        .bearer_auth(API_KEY)
        .header("content-type", "image/png")
        .body(png.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let logits = body["logits"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .unwrap_or_default();
    (status, logits)
}

/// Golden cases of `source`, predicted through expert `served_as`, must match their golden logits.
async fn assert_golden_through(
    client: &Client,
    server: &TestServer,
    source: &str,
    served_as: &str,
) {
    let package = package_dir();
    let golden = golden(&package);
    for case in golden.cases.iter().filter(|c| c.task == source) {
        let png = std::fs::read(package.join(&case.file)).unwrap();
        let (status, logits) = predict_logits(client, server, served_as, &png).await;
        assert_eq!(status, 200, "{} through {served_as}", case.file);
        let diff = max_abs_diff(&logits, &case.logits);
        assert!(
            diff <= golden.tolerance,
            "{} through {served_as}: max diff {diff}",
            case.file
        );
        assert_eq!(argmax(&logits), case.top1);
    }
}

/// Keeps `concurrency` clients predicting golden images of `tasks` until stopped; counts answers that are not 200.
fn background_load(
    server: &TestServer,
    tasks: Vec<String>,
    concurrency: usize,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let package = package_dir();
    let golden = golden(&package);
    let cases: Vec<(String, Vec<u8>)> = golden
        .cases
        .iter()
        .filter(|c| tasks.contains(&c.task))
        .map(|c| {
            (
                c.task.clone(),
                std::fs::read(package.join(&c.file)).unwrap(),
            )
        })
        .collect();
    let mut handles = Vec::new();
    for worker in 0..concurrency {
        let (stop, failures, served, cases) = (
            stop.clone(),
            failures.clone(),
            served.clone(),
            cases.clone(),
        );
        let url = server.base.clone();
        handles.push(tokio::spawn(async move {
            let client = Client::new();
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let (task, png) = &cases[i % cases.len()];
                i += 1;
                let response = client
                    .post(format!("{url}/v1/experts/{task}/predict"))
                    .bearer_auth(API_KEY)
                    .header("content-type", "image/png")
                    .body(png.clone())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 200 => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    (stop, failures, served, handles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_replace_remove_while_serving_and_survive_a_restart() {
    let overlay = tempfile::tempdir().unwrap();
    let overlay_dir = overlay.path().to_str().unwrap().to_string();
    let args = [
        "--api-keys",
        API_KEY,
        "--admin-keys",
        ADMIN_KEY,
        "--overlay-dir",
        overlay_dir.as_str(),
    ];
    let tasks = task_ids(&package_dir());
    let (first, second, third) = (tasks[0].clone(), tasks[1].clone(), tasks[2].clone());
    let server = start(&args).await;
    let client = Client::new();
    let (stop, failures, served, load) =
        background_load(&server, vec![second.clone(), third.clone()], 8);

    // Add: a new task id with the first task's expert file; its golden images answer as the first task's.
    let started = Instant::now();
    let (status, body) = put(
        &client,
        &server,
        "added",
        prepared(&first, "added"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["persisted"], true);
    let added_version = body["version"].as_str().unwrap().to_string();
    let package = package_dir();
    let first_png = std::fs::read(
        package.join(
            &golden(&package)
                .cases
                .iter()
                .find(|c| c.task == first)
                .unwrap()
                .file,
        ),
    )
    .unwrap();
    let (status, _) = predict_logits(&client, &server, "added", &first_png).await;
    assert_eq!(status, 200);
    eprintln!(
        "hot add to first prediction: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_golden_through(&client, &server, &first, "added").await;

    // Replace: the second task's expert under the same id; the version changes, answers follow the new weights.
    let (status, body) = put(
        &client,
        &server,
        "added",
        prepared(&second, "added"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replaced_version"], added_version.as_str());
    let replaced_version = body["version"].as_str().unwrap().to_string();
    assert_ne!(replaced_version, added_version);
    assert_golden_through(&client, &server, &second, "added").await;

    // Refused uploads change nothing.
    let retina_like = tasks
        .iter()
        .find(|t| spec_of(t)["num_classes"] != spec_of(&second)["num_classes"])
        .cloned();
    if let Some(other) = retina_like {
        let (status, body) = put(
            &client,
            &server,
            "added",
            upload(&spec_of(&second), retag(&expert_file_of(&other), "added")),
            Some(ADMIN_KEY),
        )
        .await;
        assert_eq!(status, 422, "a head of another class count: {body}");
    }
    let (status, body) = put(
        &client,
        &server,
        "added",
        upload(&spec_of(&second), b"not safetensors".to_vec()),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_expert");
    let (status, _) = put(
        &client,
        &server,
        "Bad_Id",
        prepared(&second, "Bad_Id"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 422, "task ids follow the format");
    let only_spec =
        multipart::Form::new().part("spec", multipart::Part::text(spec_of(&second).to_string()));
    let (status, _) = put(&client, &server, "added", only_spec, Some(ADMIN_KEY)).await;
    assert_eq!(status, 400);
    let (status, _) = put(
        &client,
        &server,
        "added",
        prepared(&first, "added"),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 403, "an API key has no admin scope");
    let (status, _) = put(&client, &server, "added", prepared(&first, "added"), None).await;
    assert_eq!(status, 401);
    let current: Value = get_keyed_json(&client, &server, "/v1/experts/added").await;
    assert_eq!(
        current["version"],
        replaced_version.as_str(),
        "refused uploads changed nothing"
    );

    // Remove a package task and the added one.
    for task in [first.as_str(), "added"] {
        let response = client
            .delete(server.url(&format!("/v1/experts/{task}")))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let (status, _) = predict_logits(&client, &server, task, &first_png).await;
        assert_eq!(status, 404, "{task} is gone");
    }
    // And add one that must survive the restart.
    let (status, body) = put(
        &client,
        &server,
        "kept",
        prepared(&third, "kept"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let kept_version = body["version"].as_str().unwrap().to_string();

    stop.store(true, Ordering::Relaxed);
    for handle in load {
        handle.await.unwrap();
    }
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "other tasks saw failures during the changes"
    );
    let metrics = scrape(server.url("/metrics"), Some(API_KEY)).await;
    assert_eq!(
        metric(&metrics, "lorkd_expert_changes_total{change=\"add\"}"),
        2.0
    );
    assert_eq!(
        metric(&metrics, "lorkd_expert_changes_total{change=\"replace\"}"),
        1.0
    );
    assert_eq!(
        metric(&metrics, "lorkd_expert_changes_total{change=\"remove\"}"),
        2.0
    );
    server.stop().await.unwrap();

    // Restart on the same overlay: the removals and the kept expert are still there.
    let server = start(&args).await;
    let listing: Value = get_keyed_json(&client, &server, "/v1/experts").await;
    let ids: Vec<&str> = listing["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&first.as_str()) && !ids.contains(&"added"),
        "{ids:?}"
    );
    assert!(ids.contains(&"kept"), "{ids:?}");
    let kept: Value = get_keyed_json(&client, &server, "/v2/models/kept").await;
    assert_eq!(kept["versions"][0], kept_version.as_str());
    assert_golden_through(&client, &server, &third, "kept").await;

    // Reload reads the same folders: nothing changes.
    let response = client
        .post(server.url("/v1/admin/reload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["added"], json!([]));
    assert_eq!(body["changed"], json!([]));
    assert_eq!(body["removed"], json!([]));
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_off_without_admin_keys() {
    let server = start(&[]).await;
    let client = Client::new();
    let task = task_ids(&package_dir())[0].clone();
    let (status, body) = put(
        &client,
        &server,
        "x",
        upload(&spec_of(&task), expert_file_of(&task)),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    let response = client
        .delete(server.url(&format!("/v1/experts/{task}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = client
        .post(server.url("/v1/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // nothing changed
    let listing: Value = get_json(server.url("/v1/experts")).await;
    assert!(listing["experts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["id"] == task.as_str()));
    server.stop().await.unwrap();
}
