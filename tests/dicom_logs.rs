//! No patient tag in any log line: every DICOM sample (answered and refused, at TRACE level for every crate,
//! dicom-rs included) through the real server, with the log captured in the JSON format the service uses.

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn dicom_samples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = [samples_dir(), samples_dir().join("dicom")]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_tags_never_reach_the_log() {
    let capture = Capture::default();
    let writer = capture.clone();
    // Global (not per-thread): decoding runs on blocking threads.
    // Everything at TRACE but the test's own HTTP client.
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,hyper_util::client=off,reqwest=off",
        ))
        .with_writer(move || writer.clone())
        .init();

    let server = start(&[]).await;
    let client = reqwest::Client::new();
    let mut secrets = Vec::new();
    let mut canaries = Vec::new();
    let mut bodies = Vec::new();
    for (i, path) in dicom_samples().into_iter().enumerate() {
        let original = std::fs::read(&path).unwrap();
        if let Ok(mut obj) = dicom_object::OpenFileOptions::new().open_file(&path) {
            for tag in [tags::PATIENT_NAME, tags::PATIENT_ID] {
                if let Some(value) = obj
                    .element_opt(tag)
                    .ok()
                    .flatten()
                    .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
                    .filter(|s| s.len() >= 3)
                {
                    secrets.push(value);
                }
            }
            // The samples' own IDs are short (`204`, `1CT1`) and such strings turn up in any log by chance
            // (`flushed 204 bytes`, a latency of 204.3 ms): the same file with planted values that cannot.
            let (name, id) = (format!("Canary^Patient^N{i}"), format!("CANARY-ID-{i:04}"));
            obj.put(DataElement::new(
                tags::PATIENT_NAME,
                VR::PN,
                PrimitiveValue::from(name.as_str()),
            ));
            obj.put(DataElement::new(
                tags::PATIENT_ID,
                VR::LO,
                PrimitiveValue::from(id.as_str()),
            ));
            let mut planted = Vec::new();
            if obj.write_all(&mut planted).is_ok() {
                bodies.push(planted);
                canaries.extend([name.clone(), name.replace('^', " "), id]);
            }
        }
        bodies.push(original);
    }
    for bytes in bodies {
        for query in ["", "?window=40,400&frame=1", "?frame=99"] {
            let response = client
                .post(server.url(&format!("/v1/experts/pneumonia/predict{query}")))
                .header("content-type", "application/dicom")
                .body(bytes.clone())
                .send()
                .await
                .unwrap();
            assert!(response.status().as_u16() < 500);
        }
        // and as a part of a multipart body
        let form = reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(bytes).file_name("x.dcm"),
        );
        let response = client
            .post(server.url("/v1/experts/pneumonia/predict"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert!(response.status().as_u16() < 500);
    }
    server.stop().await.unwrap();

    let log = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    // The capture works (requests, rejections and warnings are in it) ...
    assert!(log.contains("\"status\":200"), "{log}");
    assert!(log.contains("not_an_image") && log.contains("bad_frame"));
    // ... and holds no PatientName / PatientID: neither the planted ones (anywhere, in any form) ...
    assert!(
        canaries.len() >= 3 * 12,
        "{} planted values",
        canaries.len()
    );
    for canary in &canaries {
        assert!(
            !log.contains(canary.as_str()),
            "log carries a planted patient tag"
        );
    }
    // ... nor the samples' own (CT_small: CompressedSamples^CT1 / 1CT1, ...): long ones anywhere, short ones
    // as whole tokens where they are not bare numbers (those are covered by the planted values above).
    assert!(secrets.len() >= 6, "{secrets:?}");
    assert!(secrets.iter().any(|s| s == "CompressedSamples^CT1"));
    let tokens: std::collections::HashSet<&str> = log
        .split(|c: char| !(c.is_alphanumeric() || "^-_".contains(c)))
        .collect();
    for secret in &secrets {
        let leak = if secret.len() >= 6 {
            log.contains(secret.as_str()) || log.contains(secret.replace('^', " ").as_str())
        } else {
            !secret.chars().all(|c| c.is_ascii_digit()) && tokens.contains(secret.as_str())
        };
        assert!(!leak, "log carries a patient tag");
    }
}
