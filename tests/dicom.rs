//! DICOM and high-bit-depth input through the real server: every shipped DICOM sample answered or refused as
//! docs/api.md says, windowing and frames, several images per request, no patient tag in any answer.
//! (Pixel agreement with an independent reader, pydicom, is checked in tests/python/test_dicom_reference.py.)

mod common;

use std::path::{Path, PathBuf};

use base64::Engine;
use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use reqwest::Client;
use serde_json::Value;

fn sample(name: &str) -> PathBuf {
    samples_dir().join(name)
}

/// PatientName and PatientID of a sample, read with dicom-object (to check they never come back).
fn patient_tags(path: &Path) -> Vec<String> {
    let Ok(obj) = dicom_object::OpenFileOptions::new().open_file(path) else {
        return Vec::new();
    };
    [tags::PATIENT_NAME, tags::PATIENT_ID]
        .into_iter()
        .filter_map(|tag| obj.element_opt(tag).ok().flatten())
        .filter_map(|e| e.to_str().ok().map(|s| s.trim().to_string()))
        .filter(|s| s.len() >= 3)
        .collect()
}

/// Whether an answer carries a patient tag value. Every string in the JSON (keys and values) is searched, but not
/// the base64 PNG of `return_pixels` (random text, where a 3-character ID such as `204` or a name such as `PLA` turns
/// up by chance) and not inside numbers (`204` occurs in a latency such as `3.2045`): a number counts only when it
/// is the tag. An answer that is not JSON is searched whole.
fn echoes_patient_tag(body: &Value, text: &str, tag: &str) -> bool {
    fn walk(value: &Value, tag: &str) -> bool {
        match value {
            Value::String(s) => s.contains(tag),
            Value::Number(n) => n.to_string() == tag,
            Value::Array(items) => items.iter().any(|v| walk(v, tag)),
            Value::Object(map) => map
                .iter()
                .any(|(k, v)| k.contains(tag) || (k != "pixels_png" && walk(v, tag))),
            Value::Bool(_) | Value::Null => false,
        }
    }
    if body.is_null() {
        text.contains(tag)
    } else {
        walk(body, tag)
    }
}

#[test]
fn the_echo_check_finds_a_tag_in_any_string_but_not_in_pixels_or_digits() {
    let body = serde_json::json!({
        "latency_ms": 3.2045,
        "input": {"pixels_png": "xxPLAxx204", "format": "dicom"},
        "logits": [0.5, -1.25],
    });
    assert!(!echoes_patient_tag(&body, "", "PLA"));
    assert!(!echoes_patient_tag(&body, "", "204"));
    let leaked = serde_json::json!({"error": {"message": "bad frame for patient PLA"}});
    assert!(echoes_patient_tag(&leaked, "", "PLA"));
    assert!(echoes_patient_tag(
        &serde_json::json!({"id": 204}),
        "",
        "204"
    ));
    assert!(echoes_patient_tag(
        &serde_json::json!([{"PLA": 1}]),
        "",
        "PLA"
    ));
    assert!(echoes_patient_tag(&Value::Null, "not json PLA", "PLA"));
}

async fn post_dicom(client: &Client, url: &str, bytes: Vec<u8>) -> (u16, Value, String) {
    let response = client
        .post(url)
        .header("content-type", "application/dicom")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body, text)
}

/// The answer without the (long) base64 image, for assertion messages.
fn short(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(input) = body.get_mut("input").and_then(Value::as_object_mut) {
        input.remove("pixels_png");
    }
    body
}

fn pixels(body: &Value) -> image::DynamicImage {
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["input"]["pixels_png"].as_str().expect("pixels_png"))
        .unwrap();
    image::load_from_memory(&png).unwrap()
}

/// (file, expected status, expected code or photometric interpretation answered)
const SAMPLES: &[(&str, u16, &str)] = &[
    ("CT_small.dcm", 200, "MONOCHROME2"),
    ("MR_small.dcm", 200, "MONOCHROME2"),
    ("emri_small.dcm", 200, "MONOCHROME2"),
    ("US1_UNCR.dcm", 200, "RGB"),
    ("dicom/MR_small_RLE.dcm", 200, "MONOCHROME2"),
    ("dicom/MR_small_bigendian.dcm", 200, "MONOCHROME2"),
    ("dicom/MR_small_implicit.dcm", 200, "MONOCHROME2"),
    ("dicom/SC_rgb_jpeg_dcmtk.dcm", 200, "YBR_FULL"),
    ("dicom/SC_rgb_rle_2frame.dcm", 200, "RGB"),
    (
        "dicom/SC_ybr_full_422_uncompressed.dcm",
        200,
        "YBR_FULL_422",
    ),
    ("dicom/examples_palette.dcm", 200, "PALETTE COLOR"),
    ("dicom/examples_ybr_color.dcm", 200, "YBR_FULL_422"),
    ("dicom/image_dfl.dcm", 200, "MONOCHROME2"),
    ("dicom/693_J2KI.dcm", 200, "MONOCHROME2"),
    ("dicom/MR_small_jp2klossless.dcm", 200, "MONOCHROME2"),
    (
        "dicom/MR_small_jpeg_ls_lossless.dcm",
        415,
        "unsupported_media_type",
    ),
    ("dicom/JPEG-lossy.dcm", 415, "unsupported_media_type"),
    ("dicom/MR_truncated.dcm", 400, "bad_image"),
    ("dicom/no_meta.dcm", 400, "bad_image"),
    ("dicom/rtdose.dcm", 422, "not_an_image"),
    ("dicom/liver_1frame.dcm", 422, "not_an_image"),
];

#[tokio::test]
async fn every_dicom_sample_is_answered_or_refused_as_documented() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict?return_pixels=true");
    let mut listed: Vec<String> = std::fs::read_dir(samples_dir().join("dicom"))
        .unwrap()
        .map(|e| format!("dicom/{}", e.unwrap().file_name().to_string_lossy()))
        .chain(
            std::fs::read_dir(samples_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".dcm")),
        )
        .collect();
    listed.sort();
    let mut documented: Vec<String> = SAMPLES.iter().map(|s| s.0.to_string()).collect();
    documented.sort();
    assert_eq!(listed, documented, "every sample has a documented outcome");

    for (name, status, expected) in SAMPLES {
        let path = sample(name);
        let (got, body, text) = post_dicom(&client, &url, std::fs::read(&path).unwrap()).await;
        assert_eq!(got, *status, "{name}: {}", short(&body));
        for tag in patient_tags(&path) {
            assert!(
                !echoes_patient_tag(&body, &text, &tag),
                "{name}: answer echoes a patient tag"
            );
        }
        if *status == 200 {
            let input = &body["input"];
            assert_eq!(input["format"], "dicom", "{name}");
            assert_eq!(input["photometric_interpretation"], *expected, "{name}");
            assert!(input["transfer_syntax"]
                .as_str()
                .unwrap()
                .contains("1.2.840.10008.1.2"));
            let image = pixels(&body);
            assert_eq!(
                (image.width(), image.height()),
                (
                    input["columns"].as_u64().unwrap() as u32,
                    input["rows"].as_u64().unwrap() as u32
                ),
                "{name}"
            );
            assert_eq!(body["logits"].as_array().unwrap().len(), 2);
            assert!(body["logits"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v.as_f64().unwrap().is_finite()));
        } else {
            assert_eq!(body["error"]["code"], *expected, "{name}: {body}");
        }
        if *status == 415 {
            // names the transfer syntax (its UID)
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("1.2.840.10008.1.2.4."), "{message}");
        }
    }
    // The server is still healthy after all of them.
    let ready = client
        .get(server.url("/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn encodings_of_one_image_give_one_input_and_windows_frames_apply() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = |q: &str| {
        server.url(&format!(
            "/v1/experts/pneumonia/predict?return_pixels=true{q}"
        ))
    };
    let read = |name: &str| std::fs::read(sample(name)).unwrap();

    // MR_small in five encodings: identical pixels and logits (lossless)
    let (_, reference, _) = post_dicom(&client, &url(""), read("MR_small.dcm")).await;
    assert_eq!(reference["input"]["window"]["source"], "file");
    assert_eq!(reference["input"]["window"]["center"], 600.0);
    assert_eq!(reference["input"]["window"]["width"], 1600.0);
    for other in [
        "dicom/MR_small_RLE.dcm",
        "dicom/MR_small_bigendian.dcm",
        "dicom/MR_small_implicit.dcm",
        "dicom/MR_small_jp2klossless.dcm",
    ] {
        let (status, body, _) = post_dicom(&client, &url(""), read(other)).await;
        assert_eq!(status, 200);
        assert_eq!(pixels(&body), pixels(&reference), "{other}");
        assert_eq!(body["logits"], reference["logits"], "{other}");
    }

    // a query window overrides the file's and changes the input
    let (_, narrow, _) = post_dicom(&client, &url("&window=200,100"), read("MR_small.dcm")).await;
    assert_eq!(narrow["input"]["window"]["source"], "query");
    assert_ne!(pixels(&narrow), pixels(&reference));

    // CT without a window: min-max of the frame (in HU, after Rescale Intercept -1024)
    let (_, ct, _) = post_dicom(&client, &url(""), read("CT_small.dcm")).await;
    assert_eq!(ct["input"]["window"]["source"], "min-max");
    let grey = pixels(&ct).to_luma8();
    assert_eq!(grey.pixels().map(|p| p.0[0]).min(), Some(0));
    assert_eq!(grey.pixels().map(|p| p.0[0]).max(), Some(255));
    let (_, ct_window, _) = post_dicom(&client, &url("&window=40,400"), read("CT_small.dcm")).await;
    assert_eq!(ct_window["input"]["window"]["center"], 40.0);
    assert_ne!(pixels(&ct_window), pixels(&ct));

    // frames: default 0, any frame by index, past the end is 400 bad_frame
    let (_, first, _) = post_dicom(&client, &url(""), read("emri_small.dcm")).await;
    assert_eq!(
        (
            first["input"]["frame"].as_u64(),
            first["input"]["frames"].as_u64()
        ),
        (Some(0), Some(10))
    );
    let (status, last, _) = post_dicom(&client, &url("&frame=9"), read("emri_small.dcm")).await;
    assert_eq!(status, 200);
    assert_eq!(last["input"]["frame"], 9);
    assert_ne!(pixels(&last), pixels(&first));
    let (status, body, _) = post_dicom(&client, &url("&frame=10"), read("emri_small.dcm")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_frame"))
    );
    let (status, rle1, _) = post_dicom(
        &client,
        &url("&frame=1"),
        read("dicom/SC_rgb_rle_2frame.dcm"),
    )
    .await;
    assert_eq!(status, 200);
    let (_, rle0, _) = post_dicom(&client, &url(""), read("dicom/SC_rgb_rle_2frame.dcm")).await;
    assert_ne!(pixels(&rle1), pixels(&rle0));
    server.stop().await.unwrap();
}

/// MR_small rewritten with another photometric interpretation / rescale: the real file, edited with dicom-object.
fn edited_mr(edit: impl FnOnce(&mut dicom_object::DefaultDicomObject)) -> Vec<u8> {
    let mut obj = dicom_object::OpenFileOptions::new()
        .open_file(sample("MR_small.dcm"))
        .unwrap();
    edit(&mut obj);
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

#[tokio::test]
async fn monochrome1_is_inverted_and_the_modality_lut_is_applied() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict?return_pixels=true");
    let (_, plain, _) = post_dicom(&client, &url, edited_mr(|_| {})).await;
    let mono1 = edited_mr(|obj| {
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from("MONOCHROME1"),
        ));
    });
    let (status, inverted, _) = post_dicom(&client, &url, mono1).await;
    assert_eq!(status, 200, "{inverted}");
    assert_eq!(
        inverted["input"]["photometric_interpretation"],
        "MONOCHROME1"
    );
    let (a, b) = (pixels(&plain).to_luma8(), pixels(&inverted).to_luma8());
    assert!(a
        .pixels()
        .zip(b.pixels())
        .all(|(x, y)| x.0[0] == 255 - y.0[0]));
    // Rescale slope 2 / intercept -600 with the window moved the same way: the same picture
    let rescaled = edited_mr(|obj| {
        obj.put(DataElement::new(
            tags::RESCALE_SLOPE,
            VR::DS,
            PrimitiveValue::from("2"),
        ));
        obj.put(DataElement::new(
            tags::RESCALE_INTERCEPT,
            VR::DS,
            PrimitiveValue::from("-600"),
        ));
        obj.put(DataElement::new(
            tags::WINDOW_CENTER,
            VR::DS,
            PrimitiveValue::from("600"),
        ));
        obj.put(DataElement::new(
            tags::WINDOW_WIDTH,
            VR::DS,
            PrimitiveValue::from("3199"),
        ));
    });
    let (status, body, _) = post_dicom(&client, &url, rescaled).await;
    assert_eq!(status, 200, "{body}");
    // stored v -> 2v - 600; window (600, 3199) in those units is window (600, 1600) in stored units
    let (x, y) = (pixels(&plain).to_luma8(), pixels(&body).to_luma8());
    let max_diff = x
        .pixels()
        .zip(y.pixels())
        .map(|(p, q)| (i32::from(p.0[0]) - i32::from(q.0[0])).abs())
        .max()
        .unwrap();
    assert!(max_diff <= 1, "max diff {max_diff}");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn dicom_limits_count_every_frame_before_decoding() {
    // 30 frames of 240x320 = 2.3 M pixels; one frame (76,800) is under the limit, all of them are not
    let server = start(&["--max-image-pixels", "100000"]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/retina/predict");
    let bytes = std::fs::read(sample("dicom/examples_ybr_color.dcm")).unwrap();
    let (status, body, _) = post_dicom(&client, &url, bytes).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("image_too_large"))
    );
    let bytes = std::fs::read(sample("MR_small.dcm")).unwrap();
    assert_eq!(post_dicom(&client, &url, bytes).await.0, 200);
    server.stop().await.unwrap();
}

fn png16(width: u32, values: Vec<u16>) -> Vec<u8> {
    let height = values.len() as u32 / width;
    let image = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(width, height, values).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma16(image)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test]
async fn sixteen_bit_png_is_windowed_not_cut_to_its_top_byte() {
    let server = start(&[]).await;
    let client = Client::new();
    // a 12-bit radiograph (0..4095) in a 16-bit PNG, 28x28 (the task size: no resize)
    let values: Vec<u16> = (0..28 * 28)
        .map(|i| (i * 4095 / (28 * 28 - 1)) as u16)
        .collect();
    let body = predict_png(
        &client,
        server.url("/v1/experts/pneumonia/predict?return_pixels=true"),
        png16(28, values.clone()),
    )
    .await;
    assert_eq!(body["input"]["bits_stored"], 16);
    assert_eq!(body["input"]["window"]["source"], "min-max");
    // golden: min-max over 0..4095 is v * 255 / 4095, rounded (v >> 8 would give 0..15: almost black)
    let expected: Vec<u8> = values
        .iter()
        .map(|&v| (f64::from(v) * 255.0 / 4095.0).round() as u8)
        .collect();
    let got = pixels(&body).to_luma8().into_raw();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "max diff {worst}");
    assert!(got.iter().map(|&v| f64::from(v)).sum::<f64>() / got.len() as f64 > 120.0);
    // the same window as a query gives the same input
    let windowed = predict_png(
        &client,
        server.url("/v1/experts/pneumonia/predict?return_pixels=true&window=2048,4096"),
        png16(28, values),
    )
    .await;
    assert_eq!(windowed["input"]["window"]["source"], "query");
    let again = pixels(&windowed).to_luma8().into_raw();
    assert!(again
        .iter()
        .zip(&got)
        .all(|(a, b)| (i32::from(*a) - i32::from(*b)).abs() <= 1));
    server.stop().await.unwrap();
}

fn multipart(parts: &[(&str, Vec<u8>, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, bytes, mime) in parts {
        form = form.part(
            name.to_string(),
            reqwest::multipart::Part::bytes(bytes.clone())
                .file_name("x")
                .mime_str(mime)
                .unwrap(),
        );
    }
    form
}

#[tokio::test]
async fn several_images_in_one_request_are_answered_in_order_and_capped() {
    let server = start(&["--max-client-batch-size", "3"]).await;
    let client = Client::new();
    let package = package_dir();
    let cases: Vec<GoldenCase> = golden(&package)
        .cases
        .into_iter()
        .filter(|c| c.task == "pneumonia")
        .take(2)
        .collect();
    assert_eq!(cases.len(), 2);
    let png = |c: &GoldenCase| std::fs::read(package.join(&c.file)).unwrap();
    let dicom = std::fs::read(sample("MR_small.dcm")).unwrap();
    let url = server.url("/v1/experts/pneumonia/predict?top_k=1");
    let form = multipart(&[
        ("image", png(&cases[0]), "image/png"),
        ("note", b"ignored".to_vec(), "text/plain"),
        ("image", dicom.clone(), "application/dicom"),
        ("image", png(&cases[1]), "image/png"),
    ]);
    let response = client.post(&url).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let results = body["results"]
        .as_array()
        .expect("results for several images");
    assert_eq!(results.len(), 3);
    assert!(body.get("logits").is_none());
    // in order: each equals the single-image answer (golden logits for the PNGs)
    for (result, case) in [(&results[0], &cases[0]), (&results[2], &cases[1])] {
        let logits: Vec<f32> = serde_json::from_value(result["logits"].clone()).unwrap();
        assert!(max_abs_diff(&logits, &case.logits) < 1e-4, "{}", case.file);
        assert_eq!(result["input"]["format"], "png");
    }
    let (_, single, _) = post_dicom(&client, &url, dicom.clone()).await;
    let a: Vec<f32> = serde_json::from_value(results[1]["logits"].clone()).unwrap();
    let b: Vec<f32> = serde_json::from_value(single["logits"].clone()).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4);
    assert_eq!(results[1]["input"]["format"], "dicom");
    assert_eq!(results[1]["predictions"].as_array().unwrap().len(), 1);

    // one over the cap: 413 too_many_images
    let form = multipart(&[
        ("image", png(&cases[0]), "image/png"),
        ("image", png(&cases[0]), "image/png"),
        ("image", png(&cases[0]), "image/png"),
        ("image", png(&cases[0]), "image/png"),
    ]);
    let response = client.post(&url).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_images");
    // one bad part fails the request with that part's error
    let form = multipart(&[
        ("image", png(&cases[0]), "image/png"),
        (
            "image",
            std::fs::read(sample("dicom/rtdose.dcm")).unwrap(),
            "application/dicom",
        ),
    ]);
    let response = client.post(&url).multipart(form).send().await.unwrap();
    assert_eq!(response.status(), 422);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn hostile_dicom_bytes_get_a_4xx_never_a_5xx() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict");
    for name in [
        "CT_small.dcm",
        "emri_small.dcm",
        "dicom/MR_small_RLE.dcm",
        "dicom/SC_rgb_jpeg_dcmtk.dcm",
        "dicom/examples_palette.dcm",
        "dicom/image_dfl.dcm",
        "dicom/693_J2KI.dcm",
        "dicom/examples_ybr_color.dcm",
    ] {
        let bytes = std::fs::read(sample(name)).unwrap();
        let mut variants: Vec<Vec<u8>> = [140, 400, bytes.len() / 2, bytes.len() - 7]
            .iter()
            .map(|&cut| bytes[..cut].to_vec())
            .collect();
        // flipped bytes in the data set (lengths, VRs, pixel data)
        for at in [150, 300, bytes.len() / 3, bytes.len() - 100] {
            let mut flipped = bytes.clone();
            for b in &mut flipped[at..at + 8] {
                *b ^= 0xA5;
            }
            variants.push(flipped);
        }
        for body in variants {
            let started = std::time::Instant::now();
            let (status, response, _) = post_dicom(&client, &url, body).await;
            // a corrupt length must not make the parser allocate (and zero-fill) gigabytes first
            assert!(
                started.elapsed().as_secs() < 10,
                "{name}: {:?}",
                started.elapsed()
            );
            assert!(
                status == 200 || (400..500).contains(&status),
                "{name}: {status} {response}"
            );
            if status != 200 {
                assert!(response["error"]["code"].is_string(), "{name}: {response}");
            }
        }
    }
    let ready = client
        .get(server.url("/v2/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oip_binary_tensor_extension_over_raw_http() {
    let server = start(&[]).await;
    let client = Client::new();
    let package = package_dir();
    let case = golden(&package)
        .cases
        .into_iter()
        .find(|c| c.task == "pneumonia")
        .unwrap();
    let task = manifest(&package)["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "pneumonia")
        .unwrap()
        .clone();
    let x = preprocess_in_test(&std::fs::read(package.join(&case.file)).unwrap(), &task);
    let tensor: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = serde_json::json!({
        "inputs": [{"name": "input", "shape": [1, 3, 28, 28], "datatype": "FP32",
                    "parameters": {"binary_data_size": tensor.len()}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}}]
    })
    .to_string();
    let post = |header: String, tensor: Vec<u8>, declared: usize| {
        let mut body = header.into_bytes();
        body.extend_from_slice(&tensor);
        client
            .post(server.url("/v2/models/pneumonia/infer"))
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", declared.to_string())
            .body(body)
            .send()
    };
    let response = post(header.clone(), tensor.clone(), header.len())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let json_length: usize = response.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
    assert!(head["outputs"][0].get("data").is_none());
    let logits: Vec<f32> = bytes[json_length..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(max_abs_diff(&logits, &case.logits) < 1e-4);
    // a header length past the body, a short tensor: 400 in the OIP form
    for (tensor, declared) in [
        (tensor.clone(), header.len() + tensor.len() + 1),
        (tensor[..tensor.len() - 4].to_vec(), header.len()),
    ] {
        let response = post(header.clone(), tensor, declared).await.unwrap();
        assert_eq!(response.status(), 400);
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_deflate_bomb_is_refused_before_it_inflates() {
    use std::io::Write;
    // image_dfl.dcm's preamble and file meta (transfer syntax: deflated), then 64 MiB of zeros deflated to ~64 KiB
    let original = std::fs::read(sample("dicom/image_dfl.dcm")).unwrap();
    let mut cursor = std::io::Cursor::new(&original[128..]);
    dicom_object::FileMetaTable::from_reader(&mut cursor).unwrap();
    let meta_end = 128 + cursor.position() as usize;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        encoder.write_all(&zeros).unwrap();
    }
    let mut bomb = original[..meta_end].to_vec();
    bomb.extend(encoder.finish().unwrap());
    assert!(bomb.len() < 1 << 20);
    let server = start(&["--max-image-pixels", "1000000"]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict");
    let (status, body, _) = post_dicom(&client, &url, bomb).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("image_too_large")),
        "{body}"
    );
    // the real deflated sample still works under the same limits
    let (status, _, _) = post_dicom(&client, &url, original).await;
    assert_eq!(status, 200);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_compressed_frame_larger_than_rows_x_columns_is_refused_before_decoding() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict");
    // Rows/Columns shrunk under the real codestreams (JPEG 100x100, JPEG 2000 512x512): the limits were checked
    // against Rows x Columns, so the decoder must not be trusted with the codestream's own, larger size.
    for name in ["dicom/SC_rgb_jpeg_dcmtk.dcm", "dicom/693_J2KI.dcm"] {
        let mut obj = dicom_object::OpenFileOptions::new()
            .open_file(sample(name))
            .unwrap();
        obj.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(8u16),
        ));
        obj.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(8u16),
        ));
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).unwrap();
        let (status, body, _) = post_dicom(&client, &url, bytes).await;
        assert_eq!(status, 400, "{name}: {}", short(&body));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("compressed frame is"), "{message}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_unknown_transfer_syntax_is_415_by_uid_and_nothing_else_is_echoed() {
    let server = start(&[]).await;
    let client = Client::new();
    let url = server.url("/v1/experts/pneumonia/predict");
    let original = std::fs::read(sample("MR_small.dcm")).unwrap();
    // the file meta's Transfer Syntax UID (explicit VR little endian), replaced in place by a value of equal length
    let ts = b"1.2.840.10008.1.2.1\0";
    let at = original[..400]
        .windows(ts.len())
        .position(|w| w == ts)
        .expect("transfer syntax UID in the file meta");
    // a well-formed but unknown UID: 415 naming it; not a UID at all (text in its place): 400, nothing echoed
    for (replacement, status, shown) in [
        (&b"1.2.3.4.5.999.88888\0"[..], 415, "1.2.3.4.5.999.88888"),
        (&b"Doe^John^Secret^Name"[..], 400, "invalid file meta"),
    ] {
        let mut bytes = original.clone();
        bytes[at..at + ts.len()].copy_from_slice(replacement);
        let (got, body, text) = post_dicom(&client, &url, bytes).await;
        assert_eq!(got, status, "{}", short(&body));
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(shown), "{message}");
        assert!(!text.contains("Doe^John"));
    }
    server.stop().await.unwrap();
}
