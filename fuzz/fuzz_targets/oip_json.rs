//! OIP inference-request JSON -> bounded f32 parse -> validation: never a panic, never more values kept than allowed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorkd::api::oip;

fuzz_target!(|bytes: &[u8]| {
    let limit = 3 * 28 * 28 * 4;
    if let Ok(mut request) = oip::parse_request(bytes, limit) {
        assert!(request
            .inputs
            .iter()
            .all(|i| i.data.as_ref().is_none_or(|d| d.values.len() <= limit)));
        let io = oip::ModelIo {
            input_name: "input",
            output_name: "logits",
            height: 28,
            width: 28,
            max_images: 4,
        };
        let _ = oip::validate(&mut request, &[], &io);
    }
});
