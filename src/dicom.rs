//! DICOM Part 10 bodies -> one frame's samples (greyscale levels or 8-bit RGB) via dicom-rs; no patient tag leaves it.
//!
//! Parsing and pixel-data decoding are dicom-rs's (`dicom-object`, `dicom-pixeldata`: native, deflate, RLE, JPEG
//! baseline/extended/lossless, JPEG 2000 through the pure-Rust `openjp2`). What this module adds is what the crate
//! leaves to the caller: which objects are images to classify, limits before parsing and decoding, stored bits,
//! Modality LUT (rescale), the file's first VOI LUT / window, and colour conversion (PALETTE COLOR, YBR) into the
//! [`Decoded`] form that `preprocess` windows.
//! Nothing read from the data set other than the imaging attributes below is kept or put in a message.

use std::io::Cursor;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{file::ReadPreamble, DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{PhotometricInterpretation, PixelDecoder, PlanarConfiguration};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use image::RgbImage;

use crate::preprocess::{
    check_dimensions, Decoded, GreyLevels, ImageLimits, Pixels, PreprocessError, Reserve,
    VoiFunction, VoiLut, Window,
};

/// What a DICOM answer reports about the object it used (never a patient or study attribute).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DicomInfo {
    pub transfer_syntax: String,
    pub photometric_interpretation: String,
    pub frame: u32,
    pub frames: u32,
    pub bits_stored: u16,
}

/// SOP classes that carry pixel data but are not pictures to classify (answered 422).
const NOT_IMAGES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT Dose"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.66.5", "Surface Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RT Structure Set"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RT Plan"),
    ("1.2.840.10008.5.1.4.1.1.104.1", "Encapsulated PDF"),
    (
        "1.2.840.10008.5.1.4.1.1.11.1",
        "Grayscale Softcopy Presentation State",
    ),
    ("1.2.840.10008.5.1.4.1.1.88.11", "Basic Text SR"),
    ("1.2.840.10008.5.1.4.1.1.88.22", "Enhanced SR"),
    ("1.2.840.10008.5.1.4.1.1.88.33", "Comprehensive SR"),
];

/// True when the bytes look like a DICOM Part 10 file (preamble + `DICM`, or `DICM` without the preamble).
pub fn looks_like_dicom(bytes: &[u8]) -> bool {
    bytes.get(128..132) == Some(b"DICM") || bytes.starts_with(b"DICM")
}

fn bad(message: impl Into<String>) -> PreprocessError {
    PreprocessError::Undecodable(message.into())
}

/// Parses a Part 10 body and decodes frame `frame` (0-based; `None` = the first) into greyscale levels or RGB.
/// Before it allocates for inflating or decoding, it asks `reserve` for those bytes.
pub fn decode(
    bytes: &[u8],
    frame: Option<u32>,
    limits: ImageLimits,
    reserve: Reserve<'_>,
) -> Result<(Decoded, DicomInfo), PreprocessError> {
    // dicom-rs reports malformed input as errors; a panic on hostile bytes must still be a 400, never a 5xx.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_inner(bytes, frame, limits, reserve)
    })) {
        Ok(result) => result,
        Err(_) => Err(bad(
            "cannot decode DICOM object (malformed or truncated data set)",
        )),
    }
}

fn open(
    bytes: &[u8],
    limits: ImageLimits,
    reserve: Reserve<'_>,
) -> Result<DefaultDicomObject, PreprocessError> {
    let (preamble, meta_start) = if bytes.get(128..132) == Some(b"DICM") {
        (ReadPreamble::Always, 128)
    } else if bytes.starts_with(b"DICM") {
        (ReadPreamble::Never, 0)
    } else {
        return Err(bad(
            "not a DICOM Part 10 file: no `DICM` file meta header (a bare data set without file meta is not accepted)",
        ));
    };
    check_declared_lengths(&bytes[meta_start..], limits, reserve)?;
    OpenFileOptions::new()
        .read_preamble(preamble)
        .from_reader(Cursor::new(bytes))
        .map_err(|e| {
            bad(format!(
                "cannot parse DICOM file (corrupt or truncated?): {e}"
            ))
        })
}

const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// The file meta group is read by dicom-object, which zero-fills each element's declared length before reading it:
/// one corrupt length in a 10 kB upload made it allocate and touch 3.7 GB (found by the fuzzer). Its elements are
/// always explicit VR little endian, so their headers are walked here first (values skipped) and a length past the
/// end of the body is refused. Starts at the `DICM` magic.
pub fn check_meta_lengths(file: &[u8]) -> Result<(), PreprocessError> {
    let corrupt = || {
        bad("cannot parse DICOM file (corrupt or truncated?): file meta element runs past the end")
    };
    let mut pos = 4; // "DICM"
                     // dicom-object reads the group length (0002,0000) first, then elements of any tag until it has read that many
                     // bytes (a corrupt tag does not end the group for it); without one it refuses the file.
    let mut group_length: Option<usize> = None;
    let mut read_after_length = 0usize;
    while pos + 8 <= file.len() {
        let group = u16::from_le_bytes([file[pos], file[pos + 1]]);
        let element = u16::from_le_bytes([file[pos + 2], file[pos + 3]]);
        match group_length {
            Some(length) if read_after_length >= length => break,
            None if group != 0x0002 => break,
            _ => {}
        }
        let vr = &file[pos + 4..pos + 6];
        // The VRs with a 2-byte length; every other one, unknown (corrupt) VRs included, is read by dicom-rs with
        // a 4-byte length, and so is checked as one.
        let short = matches!(
            vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FL"
                | b"FD"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        );
        let long = !short;
        let (header, length) = if long {
            let Some(bytes) = file.get(pos + 8..pos + 12) else {
                return Err(corrupt());
            };
            (
                12,
                u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize,
            )
        } else {
            (
                8,
                u16::from_le_bytes([file[pos + 6], file[pos + 7]]) as usize,
            )
        };
        let end = pos.checked_add(header).and_then(|p| p.checked_add(length));
        let end = match end {
            Some(end) if end <= file.len() => end,
            _ => return Err(corrupt()),
        };
        if group_length.is_none() && (group, element, length) == (0x0002, 0x0000, 4) {
            let value = &file[pos + header..end];
            group_length =
                Some(u32::from_le_bytes([value[0], value[1], value[2], value[3]]) as usize);
        } else {
            read_after_length += end - pos;
        }
        pos = end;
    }
    Ok(())
}

/// dicom-rs allocates and zero-fills each element's declared length before reading its value, so one corrupt
/// 4-byte length in a small body would cost gigabytes of memory and seconds of CPU. Before the real parse, the
/// element headers are walked with dicom-parser's lazy reader (values skipped, never read) and any declared length
/// past the end of the data is refused. A deflated data set is inflated first, at most to the image pixel limit
/// (x 8 bytes, + 1 MiB), so a deflate bomb is refused too.
fn check_declared_lengths(
    file: &[u8],
    limits: ImageLimits,
    reserve: Reserve<'_>,
) -> Result<(), PreprocessError> {
    use dicom_parser::dataset::{lazy_read::LazyDataSetReader, LazyDataToken};
    use dicom_parser::stateful::decode::StatefulDecode;
    use std::io::Read;

    let corrupt = |what: &str| {
        bad(format!(
            "cannot parse DICOM file (corrupt or truncated?): {what}"
        ))
    };
    check_meta_lengths(file)?;
    let mut cursor = Cursor::new(file);
    let meta = dicom_object::FileMetaTable::from_reader(&mut cursor)
        .map_err(|_| corrupt("invalid file meta group"))?;
    let Some(ts) = TransferSyntaxRegistry.get(meta.transfer_syntax()) else {
        return Err(unknown_transfer_syntax(meta.transfer_syntax()));
    };
    let start = cursor.position() as usize;
    let inflated;
    let (data, start, ts) = if meta.transfer_syntax() == DEFLATED {
        let cap = limits.max_pixels.saturating_mul(8).saturating_add(1 << 20);
        // How far a deflated set inflates is only known afterwards: reserve the most it may take.
        reserve(cap)?;
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&file[start..])
            .take(cap.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|_| corrupt("deflated data set does not inflate"))?;
        if out.len() as u64 > cap {
            return Err(PreprocessError::TooLarge(format!(
                "deflated DICOM data set inflates past {cap} bytes"
            )));
        }
        inflated = out;
        let explicit_le = TransferSyntaxRegistry
            .get("1.2.840.10008.1.2.1")
            .expect("explicit VR little endian is registered");
        (&inflated[..], 0, explicit_le)
    } else {
        (file, start, ts)
    };
    let end = data.len() as u64;
    let mut source = Cursor::new(data);
    source.set_position(start as u64);
    let mut reader =
        LazyDataSetReader::new_with_ts(source, ts).map_err(|_| corrupt("unreadable data set"))?;
    while let Some(token) = reader.advance() {
        let token = token.map_err(|_| corrupt("unreadable data set"))?;
        let past_end = match &token {
            LazyDataToken::LazyValue { header, decoder } => header
                .len
                .get()
                .is_none_or(|len| decoder.position() + u64::from(len) > end),
            LazyDataToken::LazyItemValue { len, decoder } => {
                decoder.position() + u64::from(*len) > end
            }
            _ => false,
        };
        if past_end {
            return Err(corrupt(
                "an element is longer than the data that follows it",
            ));
        }
        if let LazyDataToken::LazyValue { header, .. } = &token {
            if !length_fits_vr(header.vr, header.len.0) {
                return Err(corrupt(
                    "an element's length is not a whole number of its values",
                ));
            }
        }
        token.skip().map_err(|_| corrupt("unreadable data set"))?;
    }
    Ok(())
}

/// Whether a declared length is a whole number of values of a binary VR (any length fits the others).
/// dicom-parser reads `length / size` values of a binary VR but counts `length` bytes as read, so a remainder
/// leaves the stream behind its position and every later header is read from the wrong place: an `SL` of length 26
/// in an 8 kB upload made it read a text value as a 775 MB length and allocate that (found by the fuzzer).
fn length_fits_vr(vr: VR, length: u32) -> bool {
    let size = match vr {
        VR::SS | VR::US | VR::OW => 2,
        VR::AT | VR::SL | VR::UL | VR::FL | VR::OF | VR::OL => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => return true,
    };
    length == u32::MAX || length.is_multiple_of(size)
}

/// 415 naming an unknown transfer syntax; only a well-formed UID (digits and dots) is echoed.
fn unknown_transfer_syntax(uid: &str) -> PreprocessError {
    let uid = uid.trim_end_matches(['\0', ' ']);
    let shown = if !uid.is_empty()
        && uid.len() <= 64
        && uid.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        uid
    } else {
        "(not a valid UID)"
    };
    PreprocessError::UnsupportedFormat(format!(
        "DICOM transfer syntax {shown} is unknown to this server"
    ))
}

fn uint(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<Option<u32>, PreprocessError> {
    match obj.element_opt(tag) {
        Ok(Some(element)) => element
            .to_int::<u32>()
            .map(Some)
            .map_err(|_| bad(format!("DICOM attribute {name} is not a valid number"))),
        Ok(None) => Ok(None),
        Err(_) => Err(bad(format!("DICOM attribute {name} cannot be read"))),
    }
}

fn required(obj: &DefaultDicomObject, tag: Tag, name: &str) -> Result<u32, PreprocessError> {
    uint(obj, tag, name)?.ok_or_else(|| {
        PreprocessError::NotAnImage(format!(
            "DICOM object has no {name}: not an image to classify"
        ))
    })
}

fn floats(obj: &DefaultDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| !v.is_empty() && v.iter().all(|x| x.is_finite()))
}

fn text(obj: &DefaultDicomObject, tag: Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
}

fn decode_inner(
    bytes: &[u8],
    frame: Option<u32>,
    limits: ImageLimits,
    reserve: Reserve<'_>,
) -> Result<(Decoded, DicomInfo), PreprocessError> {
    let obj = open(bytes, limits, reserve)?;
    let ts_uid = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .ok_or_else(|| unknown_transfer_syntax(&ts_uid))?;
    let ts_name = format!("{} ({})", ts.name(), ts.uid());

    // Non-image objects first: they are refused however they are encoded.
    let sop_class = obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches(['\0', ' ']);
    let sop_class = text(&obj, tags::SOP_CLASS_UID).unwrap_or_else(|| sop_class.to_string());
    if let Some((_, name)) = NOT_IMAGES.iter().find(|(uid, _)| *uid == sop_class) {
        return Err(PreprocessError::NotAnImage(format!(
            "DICOM object is a {name} ({sop_class}), not an image to classify"
        )));
    }
    if obj.element_opt(tags::PIXEL_DATA).ok().flatten().is_none() {
        // Image attributes without pixels: the body was most likely cut before the Pixel Data element.
        if obj.element_opt(tags::ROWS).ok().flatten().is_some() {
            return Err(bad(
                "DICOM object has Rows/Columns but no Pixel Data (truncated?)",
            ));
        }
        return Err(PreprocessError::NotAnImage(
            "DICOM object has no Pixel Data: not an image to classify".into(),
        ));
    }
    let rows = required(&obj, tags::ROWS, "Rows")?;
    let columns = required(&obj, tags::COLUMNS, "Columns")?;
    let bits_allocated = required(&obj, tags::BITS_ALLOCATED, "Bits Allocated")?;
    let bits_stored = uint(&obj, tags::BITS_STORED, "Bits Stored")?.unwrap_or(bits_allocated);
    let samples = uint(&obj, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?.unwrap_or(1);
    let frames = uint(&obj, tags::NUMBER_OF_FRAMES, "Number of Frames")?
        .unwrap_or(1)
        .max(1);
    let signed = uint(&obj, tags::PIXEL_REPRESENTATION, "Pixel Representation")?.unwrap_or(0) == 1;
    let photometric = text(&obj, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();

    if bits_allocated != 8 && bits_allocated != 16 {
        return Err(PreprocessError::NotAnImage(format!(
            "DICOM pixel data has {bits_allocated}-bit samples (e.g. a 1-bit segmentation or a 32-bit dose grid): \
             only 8- and 16-bit images are classified"
        )));
    }
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(bad(format!(
            "DICOM Bits Stored {bits_stored} does not fit Bits Allocated {bits_allocated}"
        )));
    }
    if obj
        .element_opt(tags::FLOAT_PIXEL_DATA)
        .ok()
        .flatten()
        .is_some()
        || obj
            .element_opt(tags::DOUBLE_FLOAT_PIXEL_DATA)
            .ok()
            .flatten()
            .is_some()
    {
        return Err(PreprocessError::NotAnImage(
            "DICOM object holds floating-point pixel data: not an image to classify".into(),
        ));
    }
    // Limits before any decoding: every frame counts, since a decoder may expand all of them.
    let (width, height) = (columns, rows);
    check_dimensions(width, height, limits)?;
    let all = u64::from(width) * u64::from(height) * u64::from(frames);
    if all > limits.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "DICOM object is {frames} frames of {width}x{height} ({all} pixels in all); the limit is {} pixels",
            limits.max_pixels
        )));
    }
    // What decoding may hold: every frame's samples as decoded (a decoder may expand all of them; 8 or 16 bits
    // each), the chosen frame's samples widened to stored values (up to 8 bytes each on the way), and its 8-bit
    // RGB rendering.
    if !matches!(samples, 1 | 3) {
        return Err(bad(format!(
            "DICOM Samples per Pixel is {samples}; images have 1 (grey, palette) or 3 (colour)"
        )));
    }
    let spp = u64::from(samples);
    let frame_pixels = u64::from(width) * u64::from(height);
    reserve(
        all.saturating_mul(spp)
            .saturating_mul(u64::from(bits_allocated / 8))
            .saturating_add(frame_pixels * spp * 8)
            .saturating_add(frame_pixels * 3),
    )?;
    let frame = frame.unwrap_or(0);
    if frame >= frames {
        return Err(PreprocessError::BadFrame(format!(
            "frame {frame} does not exist: the object has {frames} frame(s), numbered from 0"
        )));
    }
    if !ts.can_decode_all() {
        return Err(PreprocessError::UnsupportedFormat(format!(
            "DICOM transfer syntax {ts_name} is not supported by this server; send uncompressed, deflated, RLE, \
             JPEG baseline/extended/lossless or JPEG 2000 DICOM"
        )));
    }
    if !matches!(samples, 1 | 3) {
        return Err(PreprocessError::UnsupportedFormat(format!(
            "DICOM images with {samples} samples per pixel are not supported"
        )));
    }

    let info = |pi: &str| DicomInfo {
        transfer_syntax: ts_name.clone(),
        photometric_interpretation: pi.to_string(),
        frame,
        frames,
        bits_stored: bits_stored as u16,
    };

    // YBR_FULL_422 stored natively keeps its subsampled layout (2 bytes per pixel), which the frame decoder
    // of dicom-pixeldata does not size; it is expanded here.
    let native = !ts.is_encapsulated_pixel_data();
    if native && photometric == "YBR_FULL_422" {
        if bits_allocated != 8 {
            return Err(PreprocessError::UnsupportedFormat(
                "YBR_FULL_422 with 16-bit samples is not supported".into(),
            ));
        }
        let data = obj
            .element(tags::PIXEL_DATA)
            .map_err(|_| bad("DICOM Pixel Data cannot be read"))?
            .to_bytes()
            .map_err(|_| bad("DICOM Pixel Data cannot be read"))?;
        let frame_len = (width as usize) * (height as usize) * 2;
        let start = frame_len * frame as usize;
        let chunk = data.get(start..start + frame_len).ok_or_else(|| {
            bad("DICOM Pixel Data is shorter than Rows x Columns x frames require (truncated?)")
        })?;
        let rgb = ybr_to_rgb(&expand_ybr422(chunk, width as usize, height as usize));
        let image = RgbImage::from_raw(width, height, rgb).expect("size");
        return Ok((Decoded::Pixels(Pixels::Rgb(image)), info("YBR_FULL_422")));
    }

    if !native {
        check_codestream_size(&obj, (&ts_uid, &ts_name), frame, frames, width, height)?;
    }
    let decoded = obj.decode_pixel_data_frame(frame).map_err(|e| {
        // The codec's own reason is at the bottom of the chain (e.g. jpeg-decoder's "unsupported ... precision").
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            reason = inner.to_string();
            source = inner.source();
        }
        if reason.to_ascii_lowercase().contains("unsupported") {
            PreprocessError::UnsupportedFormat(format!(
                "DICOM transfer syntax {ts_name}: this encoding variant is not supported by the decoder ({reason})"
            ))
        } else {
            bad(format!(
                "cannot decode DICOM pixel data ({ts_name}; corrupt or truncated?): {reason}"
            ))
        }
    })?;
    let data = decoded.data();
    let plane = (width as usize) * (height as usize);
    let bytes_per_sample = (bits_allocated / 8) as usize;
    let expected = plane * samples as usize * bytes_per_sample;
    if data.len() < expected {
        return Err(bad(format!(
            "DICOM pixel data holds {} bytes; a {width}x{height} frame needs {expected} (truncated?)",
            data.len()
        )));
    }
    let data = &data[..expected];
    let photometric_after = match decoded.photometric_interpretation() {
        PhotometricInterpretation::Rgb if photometric != "RGB" => "RGB".to_string(),
        _ => photometric.clone(),
    };

    match (samples, photometric_after.as_str()) {
        (1, "MONOCHROME1" | "MONOCHROME2") => {
            let stored = stored_values(data, bits_allocated, bits_stored, signed);
            let slope = floats(&obj, tags::RESCALE_SLOPE)
                .map(|v| v[0])
                .unwrap_or(1.0);
            let intercept = floats(&obj, tags::RESCALE_INTERCEPT)
                .map(|v| v[0])
                .unwrap_or(0.0);
            let slope = if slope == 0.0 { 1.0 } else { slope };
            let values: Vec<f32> = stored
                .iter()
                .map(|&v| modality_lut(v, slope, intercept) as f32)
                .collect();
            let (lo, hi) = stored_range(bits_stored, signed);
            let (a, b) = (
                modality_lut(lo, slope, intercept),
                modality_lut(hi, slope, intercept),
            );
            let window = file_window(&obj);
            let levels = GreyLevels {
                width,
                height,
                values,
                stored_range: (a.min(b), a.max(b)),
                bits_stored: bits_stored as u16,
                window,
                voi_lut: file_voi_lut(&obj)?,
                invert: photometric_after == "MONOCHROME1",
            };
            Ok((Decoded::Levels(levels), info(&photometric_after)))
        }
        (1, "PALETTE COLOR") => {
            let stored = stored_values(data, bits_allocated, bits_stored, false);
            let lut = palette(&obj)?;
            let rgb = apply_palette(&stored, &lut);
            let image = RgbImage::from_raw(width, height, rgb).expect("size");
            Ok((Decoded::Pixels(Pixels::Rgb(image)), info("PALETTE COLOR")))
        }
        (3, "RGB" | "YBR_FULL") => {
            if bits_allocated != 8 {
                return Err(PreprocessError::UnsupportedFormat(format!(
                    "{bits_allocated}-bit colour DICOM images are not supported"
                )));
            }
            let interleaved = match decoded.planar_configuration() {
                PlanarConfiguration::Standard => data.to_vec(),
                PlanarConfiguration::PixelFirst => interleave(data, plane),
            };
            let rgb = if photometric_after == "YBR_FULL" {
                ybr_to_rgb(&interleaved)
            } else {
                interleaved
            };
            let image = RgbImage::from_raw(width, height, rgb).expect("size");
            // The answer names the interpretation of the stored data (a JPEG's YBR_FULL is decoded to RGB by the codec).
            Ok((Decoded::Pixels(Pixels::Rgb(image)), info(&photometric)))
        }
        (_, other) => Err(PreprocessError::UnsupportedFormat(format!(
            "DICOM photometric interpretation `{other}` with {samples} sample(s) per pixel is not supported \
             (supported: MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_FULL, YBR_FULL_422)"
        ))),
    }
}

/// A compressed frame declares its own size, and its decoder allocates by that size, not by Rows/Columns (which the
/// limits were checked against): a JPEG or JPEG 2000 frame whose header disagrees with Rows x Columns is refused
/// before it is decoded. Headers are read by jpeg-decoder (JPEG) or from the JPEG 2000 SIZ marker / JP2 `ihdr` box.
/// Every RLE fragment's header is checked too ([`rle_header_ok`]).
fn check_codestream_size(
    obj: &DefaultDicomObject,
    (ts_uid, ts_name): (&str, &str),
    frame: u32,
    frames: u32,
    width: u32,
    height: u32,
) -> Result<(), PreprocessError> {
    let Some(fragments) = obj
        .element(tags::PIXEL_DATA)
        .ok()
        .and_then(|e| e.fragments())
    else {
        return Ok(());
    };
    if ts_uid == "1.2.840.10008.1.2.5" && !fragments.iter().all(|f| rle_header_ok(f)) {
        return Err(bad(
            "DICOM RLE fragment has a corrupt header (more than 15 segments, or shorter than 64 bytes)",
        ));
    }
    // One fragment per frame is the common case; otherwise the first fragment starts frame 0.
    let index = if fragments.len() == frames as usize {
        frame as usize
    } else {
        0
    };
    let Some(stream) = fragments.get(index) else {
        return Err(bad(
            "DICOM encapsulated Pixel Data has no fragment for this frame (truncated?)",
        ));
    };
    let declared = if ts_uid.starts_with("1.2.840.10008.1.2.4.5")
        || ts_uid.starts_with("1.2.840.10008.1.2.4.7")
    {
        let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(stream.as_slice()));
        decoder.read_info().map_err(|e| match e {
            jpeg_decoder::Error::Unsupported(_) => PreprocessError::UnsupportedFormat(format!(
                "DICOM transfer syntax {ts_name}: this encoding variant is not supported by the decoder ({e})"
            )),
            e => bad(format!("cannot read the JPEG frame header: {e}")),
        })?;
        decoder
            .info()
            .map(|info| (u32::from(info.width), u32::from(info.height)))
    } else if ts_uid.starts_with("1.2.840.10008.1.2.4.9") {
        Some(jpeg2000_size(stream).ok_or_else(|| {
            bad("cannot read the JPEG 2000 frame header (no SIZ marker or ihdr box)")
        })?)
    } else {
        None
    };
    match declared {
        Some((w, h)) if (w, h) != (width, height) => Err(bad(format!(
            "compressed frame is {w}x{h} but Rows x Columns say {height}x{width}"
        ))),
        _ => Ok(()),
    }
}

/// An RLE Lossless fragment starts with a 64-byte header: the number of segments (at most 15, PS3.5 G.3.1), then
/// their offsets. dicom-rs's RLE reader allocates 4 bytes per declared segment before it looks at the fragment's
/// length, so a corrupt count in an 8 kB upload asked for 4 GB (found by the fuzzer).
pub fn rle_header_ok(fragment: &[u8]) -> bool {
    match fragment.get(..4) {
        Some(count) if fragment.len() >= 64 => {
            u32::from_le_bytes([count[0], count[1], count[2], count[3]]) <= 15
        }
        _ => false,
    }
}

/// Width and height of a JPEG 2000 codestream (SIZ marker right after SOC) or JP2 file (`ihdr` box).
pub fn jpeg2000_size(stream: &[u8]) -> Option<(u32, u32)> {
    let be = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(stream.get(at..at + 4)?.try_into().ok()?))
    };
    if stream.starts_with(&[0xFF, 0x4F, 0xFF, 0x51]) {
        // SOC, SIZ: Lsiz(2) Rsiz(2) Xsiz(4) Ysiz(4) XOsiz(4) YOsiz(4)
        let (x, y, x0, y0) = (be(8)?, be(12)?, be(16)?, be(20)?);
        return Some((x.checked_sub(x0)?, y.checked_sub(y0)?));
    }
    let at = stream.windows(4).position(|w| w == b"ihdr")?;
    // ihdr: HEIGHT(4) WIDTH(4)
    Some((be(at + 8)?, be(at + 4)?))
}

/// Stored sample values: little-endian words masked to `bits_stored` and sign-extended when signed
/// (bits above Bits Stored may hold overlays or garbage and are ignored).
pub fn stored_values(data: &[u8], bits_allocated: u32, bits_stored: u32, signed: bool) -> Vec<i32> {
    let mask: u32 = if bits_stored >= 32 {
        u32::MAX
    } else {
        (1u32 << bits_stored) - 1
    };
    let extend = |raw: u32| -> i32 {
        let v = raw & mask;
        if signed && bits_stored < 32 && v & (1 << (bits_stored - 1)) != 0 {
            (v | !mask) as i32
        } else {
            v as i32
        }
    };
    if bits_allocated == 8 {
        data.iter().map(|&b| extend(u32::from(b))).collect()
    } else {
        data.chunks_exact(2)
            .map(|w| extend(u32::from(u16::from_le_bytes([w[0], w[1]]))))
            .collect()
    }
}

/// Lowest and highest value `bits_stored` bits can hold.
pub fn stored_range(bits_stored: u32, signed: bool) -> (i32, i32) {
    if signed {
        (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
    } else {
        (0, ((1u64 << bits_stored) - 1) as i32)
    }
}

/// Modality LUT by Rescale Slope/Intercept (PS3.3 C.11.1): output units (e.g. HU) from a stored value.
pub fn modality_lut(stored: i32, slope: f64, intercept: f64) -> f64 {
    f64::from(stored) * slope + intercept
}

/// The file's first Window Center/Width (and VOI LUT Function); none when absent or the width is unusable.
fn file_window(obj: &DefaultDicomObject) -> Option<Window> {
    let center = floats(obj, tags::WINDOW_CENTER)?[0];
    let width = floats(obj, tags::WINDOW_WIDTH)?[0];
    let function = match text(obj, tags::VOILUT_FUNCTION).as_deref() {
        Some("LINEAR_EXACT") => VoiFunction::LinearExact,
        Some("SIGMOID") => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    let window = Window {
        center,
        width,
        function,
    };
    window.is_valid().then_some(window)
}

/// The first item of the VOI LUT Sequence: LUT Descriptor (entries, first mapped value, bits 8 or 10-16) and data.
fn file_voi_lut(obj: &DefaultDicomObject) -> Result<Option<VoiLut>, PreprocessError> {
    let Some(sequence) = obj.element_opt(tags::VOILUT_SEQUENCE).ok().flatten() else {
        return Ok(None);
    };
    let Some(item) = sequence.items().and_then(|items| items.first()) else {
        return Ok(None);
    };
    let invalid = || bad("DICOM VOI LUT Sequence has no valid LUT Descriptor / LUT Data");
    let descriptor: Vec<i32> = item
        .element_opt(tags::LUT_DESCRIPTOR)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_int::<i32>().ok())
        .filter(|d| d.len() == 3)
        .ok_or_else(invalid)?;
    let entries = if descriptor[0] == 0 {
        65536
    } else {
        (descriptor[0] & 0xFFFF) as usize
    };
    let bits = descriptor[2];
    if !(bits == 8 || (10..=16).contains(&bits)) {
        return Err(PreprocessError::UnsupportedFormat(format!(
            "VOI LUT entries of {bits} bits are not supported"
        )));
    }
    let data: Vec<u16> = item
        .element_opt(tags::LUT_DATA)
        .ok()
        .flatten()
        .and_then(|e| e.to_bytes().ok().map(|b| b.into_owned()))
        .map(|b| {
            b.chunks_exact(2)
                .map(|w| u16::from_le_bytes([w[0], w[1]]))
                .collect()
        })
        .ok_or_else(invalid)?;
    if data.len() < entries || entries == 0 {
        return Err(invalid());
    }
    Ok(Some(VoiLut {
        first: descriptor[1],
        bits: bits as u16,
        data: data[..entries].to_vec(),
    }))
}

/// One palette: 8-bit entries for the red, green and blue channels, and the first stored value they map.
#[derive(Debug, Clone, PartialEq)]
pub struct Palette {
    pub first: i32,
    pub red: Vec<u8>,
    pub green: Vec<u8>,
    pub blue: Vec<u8>,
}

fn palette(obj: &DefaultDicomObject) -> Result<Palette, PreprocessError> {
    let unsupported =
        |what: &str| PreprocessError::UnsupportedFormat(format!("PALETTE COLOR: {what}"));
    if obj
        .element_opt(tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA)
        .ok()
        .flatten()
        .is_some()
    {
        return Err(unsupported("segmented palettes are not supported"));
    }
    let channel = |descriptor: Tag, data: Tag| -> Result<(i32, Vec<u8>), PreprocessError> {
        let descriptor: Vec<i32> = obj
            .element_opt(descriptor)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<i32>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(|| bad("PALETTE COLOR image without a valid lookup table descriptor"))?;
        let entries = if descriptor[0] == 0 {
            65536
        } else {
            descriptor[0] as usize & 0xFFFF
        };
        let bits = descriptor[2];
        let words: Vec<u16> = obj
            .element_opt(data)
            .ok()
            .flatten()
            .and_then(|e| e.to_bytes().ok().map(|b| b.into_owned()))
            .map(|b| {
                b.chunks_exact(2)
                    .map(|w| u16::from_le_bytes([w[0], w[1]]))
                    .collect()
            })
            .ok_or_else(|| bad("PALETTE COLOR image without lookup table data"))?;
        if words.len() < entries {
            return Err(bad(
                "PALETTE COLOR lookup table data is shorter than its descriptor",
            ));
        }
        let lut = words[..entries]
            .iter()
            .map(|&v| palette_entry_to_u8(v, bits))
            .collect::<Result<Vec<u8>, _>>()?;
        Ok((descriptor[1], lut))
    };
    let (first, red) = channel(
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (_, green) = channel(
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    let (_, blue) = channel(
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
        tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
    )?;
    Ok(Palette {
        first,
        red,
        green,
        blue,
    })
}

/// A palette entry of `bits` (8 or 16) as 8 bits: 16-bit entries are scaled by 255/65535, rounded.
pub fn palette_entry_to_u8(value: u16, bits: i32) -> Result<u8, PreprocessError> {
    match bits {
        8 => Ok(value.min(255) as u8),
        16 => Ok(((u32::from(value) * 255 + 32767) / 65535) as u8),
        other => Err(PreprocessError::UnsupportedFormat(format!(
            "PALETTE COLOR lookup tables of {other} bits are not supported"
        ))),
    }
}

/// Maps stored indices through a palette; indices below the first mapped value take the first entry,
/// above the table the last one (PS3.3 C.7.6.3.1.5).
pub fn apply_palette(indices: &[i32], palette: &Palette) -> Vec<u8> {
    let last = palette
        .red
        .len()
        .min(palette.green.len())
        .min(palette.blue.len())
        - 1;
    indices
        .iter()
        .flat_map(|&v| {
            let i = (i64::from(v) - i64::from(palette.first)).clamp(0, last as i64) as usize;
            [palette.red[i], palette.green[i], palette.blue[i]]
        })
        .collect()
}

/// Planar (`RRR..GGG..BBB..`) to interleaved (`RGBRGB..`).
pub fn interleave(planar: &[u8], plane: usize) -> Vec<u8> {
    (0..plane)
        .flat_map(|i| [planar[i], planar[plane + i], planar[2 * plane + i]])
        .collect()
}

/// YBR_FULL_422 (`Y1 Y2 Cb Cr` per pair of pixels on a row) to full YBR_FULL, chroma repeated.
pub fn expand_ybr422(data: &[u8], width: usize, height: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height * 3);
    let row_len = width.div_ceil(2) * 4;
    for row in 0..height {
        let line = &data[row * row_len..(row + 1) * row_len];
        for x in 0..width {
            let group = &line[(x / 2) * 4..(x / 2) * 4 + 4];
            out.extend_from_slice(&[group[x % 2], group[2], group[3]]);
        }
    }
    out
}

/// Full-range YCbCr (ITU-T T.871, DICOM YBR_FULL) to RGB, rounded and clamped, interleaved.
pub fn ybr_to_rgb(ybr: &[u8]) -> Vec<u8> {
    ybr.chunks_exact(3)
        .flat_map(|p| {
            let (y, cb, cr) = (
                f64::from(p[0]),
                f64::from(p[1]) - 128.0,
                f64::from(p[2]) - 128.0,
            );
            let clamp = |v: f64| v.round().clamp(0.0, 255.0) as u8;
            [
                clamp(y + 1.402 * cr),
                clamp(y - 0.344136 * cb - 0.714136 * cr),
                clamp(y + 1.772 * cb),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_meta_lengths_past_the_end_are_refused_before_allocating() {
        let mut meta = b"DICM".to_vec();
        // (0002,0001) OB, 2 reserved bytes, length 0xDC000000 (3.7 GB), then 2 bytes of value
        meta.extend_from_slice(&[
            0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 0x00, 0x00, 0x00, 0xDC, 0, 1,
        ]);
        assert!(matches!(
            check_meta_lengths(&meta),
            Err(PreprocessError::Undecodable(_))
        ));
        let mut fine = b"DICM".to_vec();
        fine.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1]);
        fine.extend_from_slice(&[
            0x02, 0x00, 0x10, 0x00, b'U', b'I', 4, 0, b'1', b'.', b'2', 0,
        ]);
        fine.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]);
        assert!(check_meta_lengths(&fine).is_ok());
        let sample = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/samples/CT_small.dcm"),
        )
        .unwrap();
        assert!(
            check_meta_lengths(&sample[128..]).is_ok(),
            "a real file passes"
        );
        // a corrupt VR is read with a 4-byte length: 0x8d8d8d8d (2.4 GB) must be refused too
        let mut odd = b"DICM".to_vec();
        odd.extend_from_slice(&[
            0x02, 0x00, 0x02, 0x00, 0x8d, 0x8d, 0x8d, 0x8d, 0x8d, 0x8d, 0, 0,
        ]);
        assert!(check_meta_lengths(&odd).is_err());
        // Found by the fuzzer: within the group length, an element with a corrupt group number does not end the
        // group for dicom-object, which went on to read a later element's 4 GB length (an unknown VR `U1`).
        let mut corrupt_group = b"DICM".to_vec();
        corrupt_group.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0, 36, 0, 0, 0]);
        corrupt_group.extend_from_slice(&[
            0x00, 0x03, 0x00, 0x02, b'U', b'I', 4, 0, b'1', b'.', b'2', 0,
        ]);
        corrupt_group.extend_from_slice(&[
            0x02, 0x00, 0x12, 0x00, b'U', b'1', 1, 7, 0x01, 0x04, 0x01, 0xf4,
        ]);
        corrupt_group.extend_from_slice(&[0u8; 64]);
        assert!(check_meta_lengths(&corrupt_group).is_err());
        let artifact = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz/dicom_meta_corrupt_group.dcm");
        let bytes = std::fs::read(&artifact).unwrap();
        assert!(check_meta_lengths(&bytes[128..]).is_err());
    }

    #[test]
    fn binary_values_with_a_partial_last_value_are_refused_before_parsing() {
        assert!(
            length_fits_vr(VR::SL, 24) && length_fits_vr(VR::US, 2) && length_fits_vr(VR::FD, 16)
        );
        assert!(
            !length_fits_vr(VR::SL, 26)
                && !length_fits_vr(VR::OW, 3)
                && !length_fits_vr(VR::FD, 12)
        );
        assert!(
            length_fits_vr(VR::UI, 27)
                && length_fits_vr(VR::OB, 3)
                && length_fits_vr(VR::OW, u32::MAX)
        );
        // Found by the fuzzer: (0008,0016) with VR `SL` and length 26 in an RLE file; dicom-parser then read a
        // text value as a 775 MB length and allocated it.
        assert_artifact_is_a_400("dicom_numeric_length_misaligned.dcm", "whole number");
    }

    /// A fuzzer artifact under tests/data/fuzz decodes to a 400 (`Undecodable`) naming `reason`.
    fn assert_artifact_is_a_400(name: &str, reason: &str) {
        let artifact = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/fuzz")
            .join(name);
        let bytes = std::fs::read(&artifact).unwrap();
        match decode(&bytes, None, FUZZ_LIMITS, &mut |_| Ok(())) {
            Err(PreprocessError::Undecodable(message)) => {
                assert!(message.contains(reason), "{message}")
            }
            Ok(_) => panic!("a corrupt object decoded"),
            Err(other) => panic!("expected a 400, got {other:?}"),
        }
    }

    /// The fuzz target's limits (fuzz/fuzz_targets/decode_image.rs).
    const FUZZ_LIMITS: ImageLimits = ImageLimits {
        max_pixels: 4_000_000,
        max_side: 4096,
    };

    #[test]
    fn rle_fragments_with_a_corrupt_segment_count_are_refused_before_decoding() {
        let mut header = vec![0u8; 64];
        header[0] = 3;
        assert!(rle_header_ok(&header));
        header[0] = 16;
        assert!(!rle_header_ok(&header));
        assert!(!rle_header_ok(&[1, 0, 0, 0]), "shorter than its header");
        let sample = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/samples/dicom/MR_small_RLE.dcm"),
        )
        .unwrap();
        assert!(
            decode(&sample, None, FUZZ_LIMITS, &mut |_| Ok(())).is_ok(),
            "a real RLE file decodes"
        );
        // Found by the fuzzer: an RLE fragment declaring 2^30 segments made dicom-rs allocate 4 GB.
        assert_artifact_is_a_400("dicom_rle_segment_count.dcm", "RLE fragment");
    }

    #[test]
    fn stored_values_mask_to_bits_stored_and_sign_extend() {
        // 12 bits stored in 16: the top nibble (e.g. an overlay bit) is ignored.
        let data = [0xFF, 0xFF, 0x00, 0x08, 0x01, 0x00];
        assert_eq!(stored_values(&data, 16, 12, false), [4095, 2048, 1]);
        assert_eq!(stored_values(&data, 16, 12, true), [-1, -2048, 1]);
        assert_eq!(stored_values(&[0x80, 0x7F], 8, 8, true), [-128, 127]);
        assert_eq!(stored_values(&[0x80, 0x7F], 8, 8, false), [128, 127]);
    }

    #[test]
    fn ranges_and_modality_lut() {
        assert_eq!(stored_range(12, false), (0, 4095));
        assert_eq!(stored_range(16, true), (-32768, 32767));
        assert_eq!(stored_range(8, false), (0, 255));
        assert_eq!(modality_lut(1000, 1.0, -1024.0), -24.0);
        assert_eq!(modality_lut(10, 0.5, 1.0), 6.0);
    }

    #[test]
    fn ybr_full_to_rgb_follows_t871() {
        assert_eq!(ybr_to_rgb(&[128, 128, 128]), [128, 128, 128]);
        assert_eq!(ybr_to_rgb(&[255, 128, 128]), [255, 255, 255]);
        // pure red in full-range YCbCr: Y 76, Cb 85, Cr 255
        assert_eq!(ybr_to_rgb(&[76, 85, 255]), [254, 0, 0]);
    }

    #[test]
    fn ybr422_repeats_chroma_for_each_pixel_pair() {
        let data = [10, 20, 100, 200, 30, 40, 101, 201];
        assert_eq!(
            expand_ybr422(&data, 4, 1),
            [10, 100, 200, 20, 100, 200, 30, 101, 201, 40, 101, 201]
        );
    }

    #[test]
    fn palettes_map_indices_and_scale_sixteen_bit_entries() {
        assert_eq!(palette_entry_to_u8(65535, 16).unwrap(), 255);
        assert_eq!(palette_entry_to_u8(0x8000, 16).unwrap(), 128);
        assert_eq!(palette_entry_to_u8(200, 8).unwrap(), 200);
        assert!(palette_entry_to_u8(1, 12).is_err());
        let palette = Palette {
            first: 10,
            red: vec![1, 2],
            green: vec![3, 4],
            blue: vec![5, 6],
        };
        assert_eq!(
            apply_palette(&[10, 11, 0, 99], &palette),
            [1, 3, 5, 2, 4, 6, 1, 3, 5, 2, 4, 6]
        );
    }

    #[test]
    fn jpeg2000_headers_give_the_frame_size() {
        let mut siz = vec![0xFF, 0x4F, 0xFF, 0x51, 0, 41, 0, 0];
        for v in [520u32, 300, 8, 0] {
            siz.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(jpeg2000_size(&siz), Some((512, 300)));
        let mut jp2 = b"\0\0\0\x16jp2hihdr".to_vec();
        jp2.extend_from_slice(&64u32.to_be_bytes());
        jp2.extend_from_slice(&32u32.to_be_bytes());
        assert_eq!(jpeg2000_size(&jp2), Some((32, 64)));
        assert_eq!(jpeg2000_size(b"garbage"), None);
    }

    #[test]
    fn planar_colour_is_interleaved() {
        assert_eq!(interleave(&[1, 2, 3, 4, 5, 6], 2), [1, 3, 5, 2, 4, 6]);
    }

    #[test]
    fn non_dicom_and_bare_data_sets_are_refused() {
        let limits = ImageLimits {
            max_pixels: 1 << 20,
            max_side: 4096,
        };
        assert!(!looks_like_dicom(b"\x89PNG"));
        assert!(matches!(
            decode(b"hello", None, limits, &mut crate::preprocess::unlimited),
            Err(PreprocessError::Undecodable(_))
        ));
        let mut truncated = vec![0u8; 128];
        truncated.extend_from_slice(b"DICM\x02\x00");
        assert!(matches!(
            decode(&truncated, None, limits, &mut crate::preprocess::unlimited),
            Err(PreprocessError::Undecodable(_))
        ));
    }
}
