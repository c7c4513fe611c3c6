//! Admin API: add, replace and remove experts while serving, and reload the package folder (admin keys only).
//!
//! Every change is verified before it becomes visible (same rules as loading a package), persisted to the overlay
//! folder when one is configured, then swapped into the registry in one step. Requests admitted before the swap
//! keep the expert snapshot they started with and finish on that version; the cache drops the old assembly.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_multipart, multipart_of, native::expert_view, read_body};
use crate::{
    error::ApiError,
    package::{Package, TaskInput, TaskSpec},
    registry::Experts,
    state::AppState,
};

/// The `spec` part of an upload: a manifest task entry without `id` (the path's) and `file` (assigned).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadSpec {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub modality: String,
    pub labels: Vec<String>,
    pub num_classes: usize,
    pub input: TaskInput,
    #[serde(default)]
    pub metrics: Value,
}

impl UploadSpec {
    fn into_task(self, task: &str) -> TaskSpec {
        TaskSpec {
            id: task.to_string(),
            name: self.name,
            modality: self.modality,
            labels: self.labels,
            num_classes: self.num_classes,
            file: format!("experts/{task}.safetensors"),
            input: self.input,
            metrics: self.metrics,
        }
    }
}

/// The named parts of a multipart body (at most `limit` parts; part bodies are slices of `body` or copies).
async fn multipart_parts(
    request: Request,
    body: Bytes,
    limit: usize,
) -> Result<Vec<(String, Bytes)>, ApiError> {
    let mut multipart = multipart_of(request, body).await?;
    let bad = |e: axum::extract::multipart::MultipartError| bad_multipart(e.body_text());
    let mut out = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(bad)?;
        out.push((name, bytes));
        if out.len() > limit {
            return Err(ApiError::bad_request(
                "bad_multipart",
                format!("more than {limit} parts"),
            ));
        }
    }
    Ok(out)
}

fn part(parts: &[(String, Bytes)], name: &str) -> Result<Bytes, ApiError> {
    parts
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, b)| b.clone())
        .ok_or_else(|| {
            ApiError::bad_request(
                "missing_part",
                format!("multipart body has no part `{name}` (parts: `spec` JSON, `expert` safetensors)"),
            )
        })
}

fn publish_counts(state: &AppState) {
    let (available, disabled) = state.experts.counts();
    let gauge = &state.metrics.experts;
    gauge
        .with_label_values(&["available"])
        .set(available as i64);
    gauge.with_label_values(&["disabled"]).set(disabled as i64);
}

/// `PUT /v1/experts/{task}`: multipart `spec` (JSON) + `expert` (safetensors). 201 added, 200 replaced.
pub async fn put_expert(
    State(state): State<AppState>,
    Path(task): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    super::check_content_length(&request, state.config.max_body_bytes)?;
    let (parts, body) = request.into_parts();
    let (bytes, _memory) = read_body(body, &state).await?;
    let parts = multipart_parts(
        Request::from_parts(parts, axum::body::Body::empty()),
        bytes,
        4,
    )
    .await?;
    let upload: UploadSpec = serde_json::from_slice(&part(&parts, "spec")?).map_err(|e| {
        ApiError::bad_request("bad_spec", format!("part `spec` is not a task spec: {e}"))
    })?;
    let spec = upload.into_task(&task);
    let file = part(&parts, "expert")?;

    // One change at a time: verify, persist and swap without another admin call in between.
    let _change = state.experts.changes.lock().await;
    let worker = state.clone();
    let (entry, sha, file) = tokio::task::spawn_blocking(move || {
        worker
            .package
            .verify_expert(&spec, &file)
            .map(|(entry, sha)| (entry, sha, file))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::InvalidExpert)?;
    let persisted = state.overlay.is_some();
    if persisted {
        let worker = state.clone();
        let spec = entry.spec.clone();
        tokio::task::spawn_blocking(move || {
            let overlay = worker.overlay.as_ref().expect("checked above");
            overlay.put(&spec, &file, &sha)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            ApiError::internal(format!(
                "cannot persist expert `{task}` in the overlay: {e}"
            ))
        })?;
    }
    let version = entry.version.clone();
    let replaced = state.experts.upsert(entry);
    state.cache.forget(&task);
    let change = if replaced.is_some() { "replace" } else { "add" };
    state
        .metrics
        .expert_changes
        .with_label_values(&[change])
        .inc();
    publish_counts(&state);
    tracing::info!(task = %task, version = ?version, change, persisted, "expert changed");
    let current = state.experts.get(&task).expect("just inserted");
    let mut view = expert_view(&state, &current);
    view["persisted"] = json!(persisted);
    view["replaced_version"] = json!(replaced.and_then(|r| r.version.clone()));
    let status = if change == "add" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// `DELETE /v1/experts/{task}`: the expert stops being served; requests already running finish.
pub async fn delete_expert(
    State(state): State<AppState>,
    Path(task): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let _change = state.experts.changes.lock().await;
    let Some(removed) = state.experts.get(&task) else {
        return Err(ApiError::NotFound(format!("no expert for task `{task}`")));
    };
    let persisted = state.overlay.is_some();
    if persisted {
        let worker = state.clone();
        let id = task.clone();
        let in_package = state.package.experts.contains_key(&task);
        tokio::task::spawn_blocking(move || {
            let overlay = worker.overlay.as_ref().expect("checked above");
            overlay.remove(&id, in_package)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(format!("cannot persist the removal of `{task}`: {e}")))?;
    }
    state.experts.remove(&task);
    state.cache.forget(&task);
    state
        .metrics
        .expert_changes
        .with_label_values(&["remove"])
        .inc();
    publish_counts(&state);
    tracing::info!(task = %task, persisted, "expert removed");
    Ok(Json(json!({
        "removed": task,
        "version": removed.version,
        "persisted": persisted,
    })))
}

/// `POST /v1/admin/reload`: reads the package folder (and the overlay) again and swaps in what changed.
pub async fn reload(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let _change = state.experts.changes.lock().await;
    let root = state.package.root.clone();
    let package = tokio::task::spawn_blocking(move || Package::load(&root))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            tracing::warn!(error = %e, "reload: the package cannot be loaded");
            ApiError::Conflict(
                "the package folder cannot be loaded now (see the server log); nothing changed"
                    .into(),
            )
        })?;
    if package.model_sha256 != state.package.model_sha256 {
        return Err(ApiError::Conflict(
            "the package's shared student model changed: restart the server to serve it; nothing changed".into(),
        ));
    }
    let loaded: Experts = package
        .experts
        .iter()
        .map(|(id, e)| (id.clone(), Arc::new(e.clone())))
        .collect();
    let next = match &state.overlay {
        Some(overlay) => {
            overlay.reread(&package).map_err(|e| {
                tracing::warn!(error = %e, "reload: the overlay cannot be read");
                ApiError::Conflict(
                    "the overlay folder cannot be read now (see the server log); nothing changed"
                        .into(),
                )
            })?;
            overlay.apply(&package, loaded)
        }
        None => loaded,
    };
    let previous = state.experts.replace(next.clone());
    let mut added = Vec::new();
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for (task, entry) in &next {
        match previous.get(task) {
            None => added.push(task.clone()),
            Some(old) if old.version != entry.version || old.status != entry.status => {
                changed.push(task.clone())
            }
            Some(_) => {}
        }
    }
    for task in previous.keys() {
        if !next.contains_key(task) {
            removed.push(task.clone());
        }
    }
    for task in changed.iter().chain(&removed) {
        state.cache.forget(task);
    }
    state
        .metrics
        .expert_changes
        .with_label_values(&["reload"])
        .inc();
    publish_counts(&state);
    tracing::info!(
        added = added.len(),
        changed = changed.len(),
        removed = removed.len(),
        "package reloaded"
    );
    Ok(Json(json!({
        "experts": next.len(),
        "added": added,
        "changed": changed,
        "removed": removed,
    })))
}
