//! Image bytes (PNG, JPEG or DICOM) -> header size estimate -> decode -> task input: never a panic, never more
//! reserved than the limits allow, a finite input when it succeeds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorkd::{
    package::TaskInput,
    preprocess::{self, ImageLimits, PrepareOptions},
};

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 4_000_000,
    max_side: 4096,
};

/// libFuzzer's panic hook aborts on any panic. dicom-rs's decoders can panic on corrupt data (one was found in the
/// RLE decoder), and `dicom::decode` catches those with `catch_unwind` and answers 400; let exactly those unwind
/// to it, and keep aborting on every other panic.
fn let_dicom_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let inside_dicom_rs = info
                .location()
                .is_some_and(|l| l.file().contains("/dicom-"));
            if !inside_dicom_rs {
                eprintln!("{info}");
                std::process::abort();
            }
        }));
    });
}

fuzz_target!(|bytes: &[u8]| {
    let_dicom_panics_unwind();
    if let Ok(Some(needed)) = preprocess::decoded_bytes(bytes, LIMITS) {
        assert!(needed <= LIMITS.max_pixels * 11);
    }
    for channels in [1, 3] {
        let input = TaskInput {
            channels,
            height: 28,
            width: 28,
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let mut reserved = 0u64;
        let mut reserve = |n: u64| {
            reserved += n;
            Ok(())
        };
        let result = preprocess::prepare(
            bytes,
            &PrepareOptions::default(),
            LIMITS,
            &input,
            &mut reserve,
        );
        // Bounded by the limits whatever the bytes: a deflated set's worst case (8 bytes per pixel), then at most
        // 3 samples x (2 + 8) bytes per pixel and the 3-byte rendering.
        assert!(
            reserved <= LIMITS.max_pixels * 41 + (2 << 20),
            "reserved {reserved}"
        );
        if let Ok((x, _)) = result {
            assert_eq!(x.len(), 3 * 28 * 28);
            assert!(x.iter().all(|v| v.is_finite()));
        }
    }
});
