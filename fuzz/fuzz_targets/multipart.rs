//! A multipart body -> the native API's `image` parts: never a panic; at most the image cap, else a typed error.
#![no_main]

use axum::{body::Body, http::Request};
use libfuzzer_sys::fuzz_target;
use lorkd::api::native::images_from_multipart;

fuzz_target!(|bytes: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let request = Request::post("/v1/experts/x/predict")
        .header("content-type", "multipart/form-data; boundary=XyZzY")
        .body(Body::empty())
        .unwrap();
    let body = axum::body::Bytes::copy_from_slice(bytes);
    if let Ok(images) = runtime.block_on(images_from_multipart(request, body, 4)) {
        assert!(!images.is_empty() && images.len() <= 4);
    }
});
