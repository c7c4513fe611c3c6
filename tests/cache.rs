//! Expert cache against the real server (`LORKD_EXECUTION=merged`, which assembles on the request path): one assembly
//! per cold expert under concurrency, LRU eviction by bytes.

mod common;

use common::*;
use serde_json::Value;

async fn predict(client: &reqwest::Client, server: &TestServer, task: &str, png: &[u8]) -> Value {
    let response = client
        .post(server.url(&format!("/v1/experts/{task}/predict")))
        .header("content-type", "image/png")
        .body(png.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn golden_png(task: &str) -> (Vec<u8>, Vec<f32>, f32) {
    let package = package_dir();
    let golden = golden(&package);
    let case = golden.cases.iter().find(|c| c.task == task).unwrap();
    (
        std::fs::read(package.join(&case.file)).unwrap(),
        case.logits.clone(),
        golden.tolerance,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_cold_experts_assemble_each_once() {
    let tasks: Vec<String> = task_ids(&package_dir()).into_iter().take(3).collect();
    let server = start(&["--execution", "merged"]).await;
    let client = reqwest::Client::new();
    const PER_TASK: usize = 8;
    let mut requests = tokio::task::JoinSet::new();
    for task in &tasks {
        let (png, logits, tolerance) = golden_png(task);
        for _ in 0..PER_TASK {
            let (client, png, logits) = (client.clone(), png.clone(), logits.clone());
            let url = server.url(&format!("/v1/experts/{task}/predict"));
            requests.spawn(async move {
                let body = predict_png(&client, url, png).await;
                let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
                assert!(max_abs_diff(&got, &logits) <= tolerance);
            });
        }
    }
    let mut finished = 0;
    while let Some(result) = requests.join_next().await {
        result.unwrap();
        finished += 1;
    }
    assert_eq!(finished, tasks.len() * PER_TASK);

    let metrics = server.metrics().await;
    for task in &tasks {
        let assemblies = metric(
            &metrics,
            &format!("lorkd_expert_assemblies_total{{task=\"{task}\"}}"),
        );
        assert_eq!(
            assemblies, 1.0,
            "task {task} assembled {assemblies} times\n{metrics}"
        );
        let hits = metric(
            &metrics,
            &format!("lorkd_expert_cache_hits_total{{task=\"{task}\"}}"),
        );
        let misses = metric(
            &metrics,
            &format!("lorkd_expert_cache_misses_total{{task=\"{task}\"}}"),
        );
        assert_eq!(hits + misses, PER_TASK as f64);
        assert!(misses >= 1.0);
    }
    assert_eq!(
        metric(&metrics, "lorkd_expert_cache_resident_experts"),
        tasks.len() as f64
    );
    assert!(metric(&metrics, "lorkd_expert_assembly_seconds_count") >= tasks.len() as f64);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_byte_budget_evicts_least_recently_used() {
    let tasks = task_ids(&package_dir());
    assert!(tasks.len() >= 2, "eviction needs two tasks");
    let (a, b) = (&tasks[0], &tasks[1]);
    let (png_a, logits_a, tolerance) = golden_png(a);
    let (png_b, _, _) = golden_png(b);
    let client = reqwest::Client::new();

    // Measure one expert's resident size with an unbounded cache.
    let probe = start(&["--execution", "merged"]).await;
    predict(&client, &probe, a, &png_a).await;
    let one_expert = metric(&probe.metrics().await, "lorkd_expert_cache_resident_bytes") as u64;
    assert!(one_expert > 0);
    probe.stop().await.unwrap();

    // Room for one and a half experts.
    let budget = (one_expert * 3 / 2).to_string();
    let server = start(&["--execution", "merged", "--cache-bytes", &budget]).await;
    predict(&client, &server, a, &png_a).await;
    predict(&client, &server, b, &png_b).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            &format!("lorkd_expert_cache_evictions_total{{task=\"{a}\"}}")
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "lorkd_expert_cache_resident_experts"), 1.0);
    assert!(metric(&metrics, "lorkd_expert_cache_resident_bytes") <= (one_expert * 3 / 2) as f64);
    let experts: Value = get_json(server.url("/v1/experts")).await;
    let state = |task: &str| {
        experts["experts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == task)
            .unwrap()["cache"]["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state(a), "cold");
    assert_eq!(state(b), "resident");

    // Coming back to the evicted expert re-assembles it, with the same answer.
    let body = predict(&client, &server, a, &png_a).await;
    assert_eq!(body["cache"], "miss");
    let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
    assert!(max_abs_diff(&got, &logits_a) <= tolerance);
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            &format!("lorkd_expert_assemblies_total{{task=\"{a}\"}}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("lorkd_expert_cache_evictions_total{{task=\"{b}\"}}")
        ),
        1.0
    );
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_experts_are_preloaded_and_never_evicted() {
    let tasks = task_ids(&package_dir());
    let (a, b) = (&tasks[0], &tasks[1]);
    let client = reqwest::Client::new();
    // A budget of one byte: everything but the pinned expert is evicted as soon as it is used.
    let server = start(&["--execution", "merged", "--cache-bytes", "1", "--pin", a]).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            &format!("lorkd_expert_assemblies_total{{task=\"{a}\"}}")
        ),
        1.0,
        "pinned expert preloaded at start"
    );
    let (png_b, _, _) = golden_png(b);
    predict(&client, &server, b, &png_b).await;
    let (png_a, _, _) = golden_png(a);
    let body = predict(&client, &server, a, &png_a).await;
    assert_eq!(body["cache"], "hit");
    let expert: Value = get_json(server.url(&format!("/v1/experts/{a}"))).await;
    assert_eq!(expert["cache"]["pinned"], true);
    assert_eq!(expert["cache"]["state"], "resident");
    server.stop().await.unwrap();
}

/// Hybrid execution: after `--promote-after` requests an expert gets its own session (weights baked in as plain
/// initializers); it must give the golden answers there too, while other experts stay on the shared session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_expert_runs_on_a_dedicated_session_with_golden_parity() {
    let package = package_dir();
    let golden = golden(&package);
    let tasks = task_ids(&package);
    let (hot, cold) = (&tasks[0], &tasks[1]);
    let server = start(&[
        "--execution",
        "merged",
        "--dedicated-sessions",
        "1",
        "--promote-after",
        "2",
    ])
    .await;
    let client = reqwest::Client::new();
    let (png, _, _) = golden_png(hot);
    for _ in 0..2 {
        let body = predict(&client, &server, hot, &png).await;
        assert_eq!(body["session"], "shared");
    }
    wait_for_metrics(&server, |m| metric(m, "lorkd_dedicated_sessions") == 1.0).await;
    assert_eq!(
        metric(
            &server.metrics().await,
            &format!("lorkd_expert_promotions_total{{task=\"{hot}\"}}")
        ),
        1.0
    );

    for case in golden.cases.iter().filter(|c| &c.task == hot) {
        let png = std::fs::read(package.join(&case.file)).unwrap();
        let body = predict(&client, &server, hot, &png).await;
        assert_eq!(body["session"], "dedicated");
        let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
        let diff = max_abs_diff(&got, &case.logits);
        assert!(
            diff <= golden.tolerance,
            "dedicated {}: max diff {diff}",
            case.file
        );
        assert_eq!(argmax(&got), case.top1);
    }
    // Only one slot: the other expert stays on the shared session however often it is used.
    let (png, logits, tolerance) = golden_png(cold);
    for _ in 0..4 {
        let body = predict(&client, &server, cold, &png).await;
        assert_eq!(body["session"], "shared");
        let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
        assert!(max_abs_diff(&got, &logits) <= tolerance);
    }
    assert_eq!(
        metric(&server.metrics().await, "lorkd_dedicated_sessions"),
        1.0
    );
    server.stop().await.unwrap();
}

/// Recycled weight buffers: under a one-expert budget every switch evicts the previous expert and the next assembly
/// merges into its layer buffers in place. Old weights must never leak into the new expert: every golden case of
/// every task gives the golden logits, also when a task comes back (A -> B -> A -> C).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycled_buffers_give_golden_logits_when_cycling_tasks() {
    let package = package_dir();
    let golden = golden(&package);
    let tasks = task_ids(&package);
    assert!(tasks.len() >= 3, "the cycle needs three tasks");
    let (a, b, c) = (&tasks[0], &tasks[1], &tasks[2]);
    let server = start(&[
        "--execution",
        "merged",
        "--cache-bytes",
        "1",
        "--dedicated-sessions",
        "0",
    ])
    .await;
    let client = reqwest::Client::new();
    for (step, task) in [a, b, a, c].into_iter().enumerate() {
        let cases: Vec<_> = golden
            .cases
            .iter()
            .filter(|case| &case.task == task)
            .collect();
        assert!(!cases.is_empty(), "no golden case for {task}");
        for (i, case) in cases.iter().enumerate() {
            let png = std::fs::read(package.join(&case.file)).unwrap();
            let body = predict(&client, &server, task, &png).await;
            assert_eq!(
                body["cache"],
                if i == 0 { "miss" } else { "hit" },
                "step {step} {task}"
            );
            let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
            let diff = max_abs_diff(&got, &case.logits);
            assert!(
                diff <= golden.tolerance,
                "step {step} {task} {}: max diff {diff}",
                case.file
            );
            assert_eq!(argmax(&got), case.top1);
        }
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            &format!("lorkd_expert_assemblies_total{{task=\"{a}\"}}")
        ),
        2.0
    );
    // The last eviction (A, for C) left one expert in the pool (bounded to one), counted by the gauge.
    let pooled = metric(&metrics, "lorkd_expert_cache_pooled_bytes");
    let resident = metric(&metrics, "lorkd_expert_cache_resident_bytes");
    assert!(
        pooled > 0.0 && pooled < 2.0 * resident,
        "pooled {pooled} resident {resident}"
    );
    server.stop().await.unwrap();
}
