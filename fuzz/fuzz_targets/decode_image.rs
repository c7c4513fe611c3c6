//! Image bytes -> header size estimate -> decode -> task input: never a panic, never more than the limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorkd::{
    package::TaskInput,
    preprocess::{self, ImageLimits},
};

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 4_000_000,
    max_side: 4096,
};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(Some(needed)) = preprocess::decoded_bytes(bytes, LIMITS) {
        assert!(needed <= LIMITS.max_pixels * 11);
    }
    if let Ok(pixels) = preprocess::decode(bytes, LIMITS) {
        for channels in [1, 3] {
            let input = TaskInput {
                channels,
                height: 28,
                width: 28,
                mean: [0.5; 3],
                std: [0.5; 3],
            };
            let x = preprocess::to_task_input(&pixels, &input);
            assert_eq!(x.len(), 3 * 28 * 28);
            assert!(x.iter().all(|v| v.is_finite()));
        }
    }
});
