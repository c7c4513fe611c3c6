//! OIP inference-request JSON -> bounded f32 parse -> validation: never a panic, never more values kept than allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorkd::api::oip;

fuzz_target!(|bytes: &[u8]| {
    let limit = 3 * 28 * 28 * 4;
    if let Ok(mut request) = oip::parse_request(bytes, limit) {
        assert!(request.inputs.iter().all(|i| i.data.values.len() <= limit));
        let _ = oip::validate(&mut request, "input", "logits", 28, 28, 4);
    }
});
