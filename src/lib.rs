//! lorkd: serves LoRKD task experts. Data flows one way: HTTP (`api`) -> decode/preprocess (`dicom`, `preprocess`) ->
//! expert cache and assembly (`cache`, `assembly`, from the `package`) -> runtime (`runtime`: ORT session, batching).

// serde_json::json! for the OpenAPI component schemas (src/api/openapi.rs) nests deeper than the default 128.
#![recursion_limit = "256"]

pub mod api;
pub mod assembly;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod config;
pub mod dicom;
pub mod error;
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
