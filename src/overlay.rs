//! Experts added, replaced or removed through the admin API, persisted in `LORKD_OVERLAY_DIR` beside the package.
//!
//! The package folder stays read-only (it is often a read-only volume or baked into the image). The overlay folder
//! holds `overlay.json` (format below) and `experts/<task>.safetensors`; at start-up and on reload the server loads
//! the package, then applies the overlay: removed tasks go, overlay tasks are added or replace the package's. Every
//! file is written to a temporary name and renamed, so a crash leaves the old or the new state, never half of one.
//!
//! ```json
//! {"format": "lorkd-overlay", "format_version": 1, "model_sha256": "<sha256 of student.onnx>",
//!  "tasks": [<task spec as in manifest.json, file = "experts/<id>.safetensors">],
//!  "files": {"experts/<id>.safetensors": "<sha256>"}, "removed": ["<task id>"]}
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    package::{sha256_hex, ExpertEntry, ExpertStatus, Package, TaskSpec},
    registry::Experts,
};

pub const FORMAT: &str = "lorkd-overlay";
const DOC: &str = "overlay.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OverlayDoc {
    pub format: String,
    pub format_version: u32,
    /// The student the overlay's experts were verified against; an overlay for another student is not applied.
    pub model_sha256: String,
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub removed: Vec<String>,
}

/// The overlay folder and its current document.
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    doc: std::sync::Mutex<OverlayDoc>,
}

fn expert_file(task: &str) -> String {
    format!("experts/{task}.safetensors")
}

/// Writes `bytes` to `path` through a temporary file and a rename (atomic on one filesystem).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Overlay {
    /// Opens (creating the folder if needed) the overlay in `dir` for `package`. An existing document written
    /// for another student model is an error: its experts were verified against other shared weights.
    pub fn open(dir: &Path, package: &Package) -> Result<Overlay, String> {
        std::fs::create_dir_all(dir.join("experts"))
            .map_err(|e| format!("cannot create overlay folder {}: {e}", dir.display()))?;
        let path = dir.join(DOC);
        let doc = match std::fs::read(&path) {
            Ok(bytes) => {
                let doc: OverlayDoc = serde_json::from_slice(&bytes).map_err(|e| {
                    format!("{} does not follow the overlay format: {e}", path.display())
                })?;
                if doc.format != FORMAT || doc.format_version != 1 {
                    return Err(format!(
                        "{} is not a `{FORMAT}` version 1 document",
                        path.display()
                    ));
                }
                if !doc.model_sha256.eq_ignore_ascii_case(&package.model_sha256) {
                    return Err(format!(
                        "{} was written for another student model (sha256 {}, the package's is {}): move it away or point LORKD_OVERLAY_DIR elsewhere",
                        path.display(),
                        doc.model_sha256,
                        package.model_sha256
                    ));
                }
                doc
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OverlayDoc {
                format: FORMAT.into(),
                format_version: 1,
                model_sha256: package.model_sha256.clone(),
                ..OverlayDoc::default()
            },
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Overlay {
            dir: dir.to_path_buf(),
            doc: std::sync::Mutex::new(doc),
        })
    }

    /// Reads the document from disk again (`POST /v1/admin/reload`: an operator may have edited the folder).
    pub fn reread(&self, package: &Package) -> Result<(), String> {
        let fresh = Overlay::open(&self.dir, package)?;
        *self.doc() = fresh.doc.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(())
    }

    fn doc(&self) -> std::sync::MutexGuard<'_, OverlayDoc> {
        self.doc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The package's experts with the overlay applied (an overlay expert that fails verification is disabled,
    /// with the reason; the log has the detail).
    pub fn apply(&self, package: &Package, mut experts: Experts) -> Experts {
        let doc = self.doc().clone();
        for task in &doc.removed {
            experts.remove(task);
        }
        for spec in &doc.tasks {
            let entry = self.load_task(package, &doc, spec);
            experts.insert(spec.id.clone(), Arc::new(entry));
        }
        experts
    }

    fn load_task(&self, package: &Package, doc: &OverlayDoc, spec: &TaskSpec) -> ExpertEntry {
        let disabled = |reason: String| {
            tracing::warn!(task = %spec.id, %reason, "overlay expert disabled");
            ExpertEntry {
                spec: spec.clone(),
                status: ExpertStatus::Disabled { reason },
                version: None,
                deltas: None,
            }
        };
        if spec.file != expert_file(&spec.id) {
            return disabled(format!(
                "overlay file of `{}` is not `{}`",
                spec.id,
                expert_file(&spec.id)
            ));
        }
        let bytes = match std::fs::read(self.dir.join(&spec.file)) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(task = %spec.id, error = %e, "cannot read overlay expert file");
                return disabled(format!("cannot read overlay expert file `{}`", spec.file));
            }
        };
        let sha = sha256_hex(&bytes);
        if doc
            .files
            .get(&spec.file)
            .is_none_or(|listed| !listed.eq_ignore_ascii_case(&sha))
        {
            return disabled(format!(
                "overlay expert file `{}` does not match its sha256",
                spec.file
            ));
        }
        match package.verify_expert(spec, &bytes) {
            Ok((entry, _)) => entry,
            Err(reason) => disabled(reason),
        }
    }

    /// Persists an added or replaced expert (its file, then the document).
    pub fn put(&self, spec: &TaskSpec, bytes: &[u8], sha: &str) -> std::io::Result<TaskSpec> {
        let mut spec = spec.clone();
        spec.file = expert_file(&spec.id);
        write_atomically(&self.dir.join(&spec.file), bytes)?;
        let mut doc = self.doc();
        let mut next = doc.clone();
        next.removed.retain(|t| t != &spec.id);
        next.tasks.retain(|t| t.id != spec.id);
        next.tasks.push(spec.clone());
        next.files.insert(spec.file.clone(), sha.to_string());
        self.save(&next)?;
        *doc = next;
        Ok(spec)
    }

    /// Persists a removal: the overlay's own file goes, and a task of the package is listed as removed.
    pub fn remove(&self, task: &str, in_package: bool) -> std::io::Result<()> {
        let mut doc = self.doc();
        let mut next = doc.clone();
        next.tasks.retain(|t| t.id != task);
        let file = expert_file(task);
        next.files.remove(&file);
        if in_package && !next.removed.iter().any(|t| t == task) {
            next.removed.push(task.to_string());
        }
        self.save(&next)?;
        *doc = next;
        match std::fs::remove_file(self.dir.join(&file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn save(&self, doc: &OverlayDoc) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(doc).expect("overlay document serialises");
        write_atomically(&self.dir.join(DOC), &text)
    }
}
