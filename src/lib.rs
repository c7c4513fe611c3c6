//! lorkd: serves LoRKD task experts. Data flows one way: HTTP (`api`) -> decode/preprocess (`dicom`, `preprocess`) ->
//! expert registry and cache (`registry`, `cache`, `assembly`, `expert`, from the `package`) -> runtime (`runtime`:
//! ORT sessions, batching, the merged and mixed paths with their factor `bank`).

// serde_json::json! for the OpenAPI component schemas (src/api/openapi.rs) nests deeper than the default 128.
#![recursion_limit = "256"]

pub mod api;
pub mod assembly;
pub mod auth;
pub mod bank;
pub mod budget;
pub mod cache;
pub mod config;
pub mod dicom;
pub mod error;
pub mod expert;
pub mod metrics;
pub mod onnx;
pub mod overlay;
pub mod package;
pub mod preprocess;
pub mod registry;
pub mod runtime;
pub mod server;
pub mod state;

pub use config::Config;
pub use server::{serve, serve_with_ops, App, StartupError};
