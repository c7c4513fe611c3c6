//! ONNX Runtime's library and its one process-wide environment.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ort::environment::Environment;

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The ONNX Runtime release lorkd is built and tested against (`ort` 2.0.0-rc.15, `load-dynamic`).
pub const ORT_VERSION: &str = "1.31.1";

/// Where scripts/setup.sh unpacks the library from the PyPI wheel.
pub const SETUP_LIBRARY: &str = ".ort/lib/libonnxruntime.so.1.31.1";

/// Which library file to load: the explicit flag, else `ORT_DYLIB_PATH`, else the set-up script's copy when
/// present, else the system search path.
pub fn library_path(explicit: Option<&PathBuf>) -> PathBuf {
    explicit
        .cloned()
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .or_else(|| {
            Path::new(SETUP_LIBRARY)
                .exists()
                .then(|| PathBuf::from(SETUP_LIBRARY))
        })
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// Loads ONNX Runtime from `library` and creates the process's one environment (later calls reuse the first).
pub fn environment(library: &Path) -> Result<Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            if library.components().count() > 1 && !library.exists() {
                return Err(format!(
                    "ONNX Runtime library not found at {} (run scripts/setup.sh, or set LORKD_ORT_LIBRARY / ORT_DYLIB_PATH)",
                    library.display()
                ));
            }
            let builder = ort::init_from(library).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {}: {e} (run scripts/setup.sh, or point LORKD_ORT_LIBRARY / ORT_DYLIB_PATH at libonnxruntime.so.1.31.1)",
                    library.display()
                )
            })?;
            builder
                .with_name("lorkd")
                .build()
                .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
        })
        .clone()
}
