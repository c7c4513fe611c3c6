//! Test helpers: start the real server (real ORT, real package) on an ephemeral port, read golden data, parse metrics.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use lorkd::{serve, state::AppState, App, Config};
use serde::Deserialize;
use tokio::{sync::oneshot, task::JoinHandle};

/// The package under test: `LORKD_TEST_PACKAGE` or the shipped default `models/medmnist-lorkd`.
pub fn package_dir() -> PathBuf {
    std::env::var_os("LORKD_TEST_PACKAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/medmnist-lorkd"))
}

/// Real sample images shipped beside the repository (`../shared/data/samples`).
pub fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/samples")
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub tolerance: f32,
    pub cases: Vec<GoldenCase>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct GoldenCase {
    pub task: String,
    pub file: String,
    pub logits: Vec<f32>,
    pub top1: usize,
}

pub fn golden(package: &Path) -> Golden {
    let text =
        std::fs::read_to_string(package.join("golden/golden.json")).expect("golden/golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

pub fn manifest(package: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(package.join("manifest.json")).unwrap()).unwrap()
}

pub fn task_ids(package: &Path) -> Vec<String> {
    manifest(package)["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length differs");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, x)| if *x > v[best] { i } else { best })
}

pub fn config(package: &Path, extra: &[&str]) -> Config {
    let package = package.to_str().unwrap().to_string();
    let mut args = vec![
        "--package",
        package.as_str(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--intra-op-threads",
        "1",
    ];
    args.extend_from_slice(extra);
    Config::from_args(args).expect("valid test config")
}

pub struct TestServer {
    pub base: String,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// Asks for a graceful shutdown and waits for the server to stop.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle.await.expect("server task")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn metrics(&self) -> String {
        scrape(self.url("/metrics"), None).await
    }
}

/// Status of an unauthenticated GET of `url` (probes, ops port, refusals).
pub async fn get_status(url: impl reqwest::IntoUrl) -> reqwest::StatusCode {
    reqwest::get(url).await.unwrap().status()
}

/// JSON body of an unauthenticated GET of `url` (listings, `/v1/info`).
pub async fn get_json(url: impl reqwest::IntoUrl) -> serde_json::Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The Prometheus text at `url` (`.../metrics`), with a bearer key when the server wants one.
pub async fn scrape(url: String, key: Option<&str>) -> String {
    let mut request = reqwest::Client::new().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap().text().await.unwrap()
}

/// Builds, warms up and serves an app with the given config on 127.0.0.1:<ephemeral>.
pub async fn start_with(config: Config) -> TestServer {
    let app = App::build(config).await.expect("server starts");
    app.warm_up().await.expect("warm-up");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let state = app.state.clone();
    let handle = tokio::spawn(async move {
        serve(&app, listener, async move {
            let _ = rx.await;
        })
        .await
    });
    TestServer {
        base,
        state,
        shutdown: Some(tx),
        handle,
    }
}

pub async fn start(extra: &[&str]) -> TestServer {
    start_with(config(&package_dir(), extra)).await
}

/// Value of one sample line, e.g. `metric(&text, "lorkd_expert_assemblies_total{task=\"breast\"}")`; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Polls `condition` on the metrics until it holds (no sleeps that tests depend on: only a generous cap).
pub async fn wait_for_metrics(server: &TestServer, condition: impl Fn(&str) -> bool) {
    for _ in 0..2000 {
        if condition(&server.metrics().await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("metrics condition never held:\n{}", server.metrics().await);
}

/// FORMAT.md section 4 written independently of the server (golden images are stored at the task's size).
pub fn preprocess_in_test(png: &[u8], task: &serde_json::Value) -> Vec<f32> {
    let image = image::load_from_memory(png).expect("golden png decodes");
    let input = &task["input"];
    let (h, w) = (
        input["height"].as_u64().unwrap() as u32,
        input["width"].as_u64().unwrap() as u32,
    );
    assert_eq!(
        (image.width(), image.height()),
        (w, h),
        "golden images need no resize"
    );
    let mean: Vec<f32> = input["mean"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let std: Vec<f32> = input["std"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let grey_task = input["channels"].as_u64().unwrap() == 1;
    let rgb: Vec<[u8; 3]> = if grey_task || image.color().channel_count() < 3 {
        let luma = match image.color().channel_count() {
            1 | 2 => image.to_luma8().into_raw(),
            _ => image
                .to_rgb8()
                .pixels()
                .map(|p| {
                    ((p.0[0] as f32 * 0.299 + p.0[1] as f32 * 0.587 + p.0[2] as f32 * 0.114)
                        .round()) as u8
                })
                .collect(),
        };
        luma.into_iter().map(|v| [v, v, v]).collect()
    } else {
        image.to_rgb8().pixels().map(|p| p.0).collect()
    };
    let plane = (h * w) as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, px) in rgb.iter().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

/// Copies a package folder (for tests that damage it).
pub fn copy_package(from: &Path, to: &Path) {
    for entry in walk(from) {
        let relative = entry.strip_prefix(from).unwrap();
        let target = to.join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A request whose body is only partly sent: the server has admitted it and waits for the rest.
pub struct StalledRequest {
    pub stream: tokio::net::TcpStream,
    pub rest: Vec<u8>,
}

impl StalledRequest {
    pub async fn open(
        addr: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        sent: usize,
    ) -> StalledRequest {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..sent]).await.unwrap();
        stream.flush().await.unwrap();
        StalledRequest {
            stream,
            rest: body[sent..].to_vec(),
        }
    }

    /// Sends the rest of the body and returns the raw response (status line, headers, body).
    pub async fn finish(mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(&self.rest).await.unwrap();
        self.stream.flush().await.unwrap();
        let mut response = Vec::new();
        self.stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Reads whatever the server answers without sending the rest of the body.
    pub async fn response_without_finishing(mut self) -> String {
        use tokio::io::AsyncReadExt;
        let mut response = Vec::new();
        let _ = self.stream.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).into_owned()
    }
}

pub fn status_of(raw_response: &str) -> u16 {
    raw_response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// POSTs `png` as a raw `image/png` body to a native predict URL, asserts 200 and returns the JSON answer.
pub async fn predict_png(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    png: impl Into<reqwest::Body>,
) -> serde_json::Value {
    let response = client
        .post(url)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The real `lorkd` binary as a child process (for what only a separate process shows: its resident memory).
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl ServerProcess {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// Resident set size in bytes (`VmRSS` of /proc/<pid>/status).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The highest resident set size so far (`VmHWM`): catches a spike that was freed again.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect(field);
        kib * 1024
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `target/.../lorkd` on 127.0.0.1:<ephemeral> with the test package and `extra` flags, waits until ready.
pub async fn spawn_binary(extra: &[&str]) -> ServerProcess {
    use std::io::BufRead;
    let package = package_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lorkd"))
        .args(["--package", package.to_str().unwrap()])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--intra-op-threads",
            "1",
        ])
        .args(["--log-format", "json"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lorkd binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                    if event["message"] == "listening" {
                        let _ = tx.send(event["address"].as_str().unwrap_or_default().to_string());
                        sent = true;
                    }
                }
            }
        }
    });
    let address = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("lorkd logs its address");
    let server = ServerProcess {
        child,
        base: format!("http://{address}"),
    };
    for _ in 0..3000 {
        if let Ok(r) = reqwest::get(server.url("/v2/health/ready")).await {
            if r.status() == 200 {
                return server;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("lorkd never became ready");
}

/// Builds, warms up and serves an app with a separate ops listener (`--ops-port` must be set in `config`).
pub async fn start_with_ops(config: Config) -> (TestServer, String) {
    let app = App::build(config).await.expect("server starts");
    app.warm_up().await.expect("warm-up");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let ops_base = format!("http://{}", ops.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    let state = app.state.clone();
    let handle = tokio::spawn(async move {
        lorkd::serve_with_ops(&app, listener, Some(ops), async move {
            let _ = rx.await;
        })
        .await
    });
    (
        TestServer {
            base,
            state,
            shutdown: Some(tx),
            handle,
        },
        ops_base,
    )
}
