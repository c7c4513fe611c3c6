//! Property-based fuzzing of the request decoders (issue 9): image decode + preprocess, OIP JSON, multipart, and
//! the whole predict/infer handlers called as a function on the real app. Property: never a panic, never a 5xx,
//! every error a typed 4xx. Bounded here (`PROPTEST_CASES`, default 64 per property); longer by hand, e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz`.

mod common;

use std::sync::OnceLock;

use axum::{body::Body, http::Request};
use common::*;
use lorkd::{
    api::oip,
    preprocess::{self, ImageLimits},
};
use proptest::{prelude::*, test_runner::TestCaseError};
use tower::ServiceExt;

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 4_000_000,
    max_side: 4096,
};

fn golden_png() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| {
        let package = package_dir();
        std::fs::read(package.join(&golden(&package).cases[0].file)).unwrap()
    })
}

fn task_input() -> lorkd::package::TaskInput {
    lorkd::package::TaskInput {
        channels: 1,
        height: 28,
        width: 28,
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

/// Bytes that look like the real thing more often than not: a golden PNG with random bytes overwritten,
/// truncated or extended, or plain random bytes.
fn mutated_png() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16).prop_map(
            |edits| {
                let mut png = golden_png().to_vec();
                for (at, byte) in edits {
                    let i = at.index(png.len());
                    png[i] = byte;
                }
                png
            }
        ),
        any::<prop::sample::Index>().prop_map(|at| {
            let png = golden_png();
            png[..at.index(png.len())].to_vec()
        }),
        prop::collection::vec(any::<u8>(), 0..512),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn image_decoding_never_panics(bytes in mutated_png()) {
        if let Ok(Some(needed)) = preprocess::decoded_bytes(&bytes, LIMITS) {
            prop_assert!(needed <= LIMITS.max_pixels * 11);
        }
        prepare_property(&bytes)?;
    }

    #[test]
    fn dicom_decoding_never_panics(bytes in mutated_dicom()) {
        prepare_property(&bytes)?;
    }

    #[test]
    fn oip_json_parsing_never_panics(text in oip_like_json(), limit in 0usize..64) {
        if let Ok(mut request) = oip::parse_request(text.as_bytes(), limit) {
            prop_assert!(request.inputs.iter().all(|i| i.data.as_ref().is_none_or(|d| d.values.len() <= limit)));
            let io = oip::ModelIo { input_name: "input", output_name: "logits", height: 1, width: 2, max_images: 4 };
            let _ = oip::validate(&mut request, &[], &io);
        }
    }
}

/// `prepare` (PNG, JPEG or DICOM) never panics, never decodes more than it reserved up front beyond the body,
/// and gives a finite task input when it succeeds.
fn prepare_property(bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut reserved = 0u64;
    let mut reserve = |n: u64| {
        reserved += n;
        Ok(())
    };
    let result = preprocess::prepare(
        bytes,
        &preprocess::PrepareOptions::default(),
        LIMITS,
        &task_input(),
        &mut reserve,
    );
    prop_assert!(
        reserved <= LIMITS.max_pixels * 41 + (2 << 20),
        "reserved {reserved}"
    );
    if let Ok((input, _)) = result {
        prop_assert_eq!(input.len(), 3 * 28 * 28);
        prop_assert!(input.iter().all(|v| v.is_finite()));
    }
    Ok(())
}

/// Real DICOM sample files with random bytes overwritten or cut short.
fn mutated_dicom() -> impl Strategy<Value = Vec<u8>> {
    let samples: Vec<Vec<u8>> = [
        "CT_small.dcm",
        "MR_small.dcm",
        "dicom/MR_small_RLE.dcm",
        "dicom/SC_rgb_jpeg_dcmtk.dcm",
    ]
    .iter()
    .filter_map(|f| std::fs::read(samples_dir().join(f)).ok())
    .collect();
    assert!(
        !samples.is_empty(),
        "DICOM samples in ../shared/data/samples"
    );
    (
        prop::sample::select(samples),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(mut file, edits, cut, truncate)| {
            for (at, byte) in edits {
                let i = at.index(file.len());
                file[i] = byte;
            }
            if truncate {
                file.truncate(cut.index(file.len()));
            }
            file
        })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// JSON in the shape of an inference request, with random fields, types and numbers (and some plain noise).
fn oip_like_json() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<f64>().prop_map(|v| format!("{v:e}")),
        any::<i64>().prop_map(|v| v.to_string()),
        Just("1e400".to_string()),
        Just("\"NaN\"".to_string()),
        Just("null".to_string()),
        Just("[1,[2]]".to_string()),
        Just("{}".to_string()),
    ];
    let data = prop::collection::vec(number, 0..40).prop_map(|v| format!("[{}]", v.join(",")));
    let shape = prop::collection::vec(any::<i64>().prop_map(|v| v % 8), 0..6)
        .prop_map(|v| format!("{v:?}"));
    let datatype = prop_oneof![Just("FP32"), Just("INT8"), Just(""), Just("BYTES")];
    prop_oneof![
        (data, shape, datatype).prop_map(|(data, shape, datatype)| format!(
            r#"{{"id":"x","inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}"#
        )),
        "\\PC{0,200}",
    ]
}

/// The real app (real package, real ONNX Runtime) built once, its router called as a function.
fn app() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static APP: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    APP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let router = runtime.block_on(async {
            let app = lorkd::App::build(config(
                &package_dir(),
                &["--max-client-batch-size", "4", "--max-body-bytes", "1MiB"],
            ))
            .await
            .unwrap();
            app.warm_up().await.unwrap();
            app.router()
        });
        (runtime, router)
    })
}

fn status_of_call(request: Request<Body>) -> u16 {
    let (runtime, router) = app();
    runtime.block_on(async {
        router
            .clone()
            .oneshot(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

fn multipart(parts: &[(String, Vec<u8>)], boundary: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn predict_handler_answers_4xx_or_200_never_5xx(
        image in mutated_png(),
        field in prop_oneof![Just("image".to_string()), "[a-z]{0,6}"],
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        content_type in prop_oneof![Just("multipart"), Just("image/png"), Just("image/jpeg"), Just("text/plain")],
    ) {
        let task = &golden(&package_dir()).cases[0].task;
        let boundary = "XyZzY";
        let (body, content_type) = if content_type == "multipart" {
            let mut body = multipart(&[(field, image)], boundary);
            if truncate {
                body.truncate(cut.index(body.len().max(1)));
            }
            (body, format!("multipart/form-data; boundary={boundary}"))
        } else {
            (image, content_type.to_string())
        };
        let request = Request::post(format!("/v1/experts/{task}/predict"))
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        let status = status_of_call(request);
        prop_assert!(status == 200 || (400..500).contains(&status), "status {}", status);
    }

    #[test]
    fn infer_handler_answers_4xx_or_200_never_5xx(text in oip_like_json()) {
        let task = &golden(&package_dir()).cases[0].task;
        let request = Request::post(format!("/v2/models/{task}/infer"))
            .header("content-type", "application/json")
            .body(Body::from(text))
            .unwrap();
        let status = status_of_call(request);
        prop_assert!(status == 200 || (400..500).contains(&status), "status {}", status);
    }
}
