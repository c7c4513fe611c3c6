//! Image bytes -> normalised NCHW float input (FORMAT.md section 4), with size limits checked from the header first.
//!
//! Greyscale samples wider than 8 bits (16-bit PNG, every greyscale DICOM) are windowed into 8 bits here by small
//! pure functions ([`voi`], [`choose_window`], [`render`]); DICOM parsing itself lives in `crate::dicom`.

use std::io::Cursor;

use image::{imageops::FilterType, DynamicImage, GrayImage, ImageFormat, ImageReader, RgbImage};

use crate::package::TaskInput;

/// Limits applied before (header) and during decoding.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_side: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PreprocessError {
    /// Not an image we can read, or truncated/corrupt.
    #[error("{0}")]
    Undecodable(String),
    /// A real image, but not PNG or JPEG.
    #[error("{0}")]
    UnsupportedFormat(String),
    /// Dimensions over the configured limits (rejected from the header, before decoding).
    #[error("{0}")]
    TooLarge(String),
    /// A well-formed object that is not a picture to classify (DICOM RT dose, segmentation, no pixel data).
    #[error("{0}")]
    NotAnImage(String),
    /// The requested frame of a multi-frame object does not exist.
    #[error("{0}")]
    BadFrame(String),
    /// The request-memory budget cannot cover decoding this image right now (the caller answers 503).
    #[error("the server's request memory is in use")]
    MemoryBusy,
}

/// Called with the bytes a decode is about to hold, before it allocates them; `Err(MemoryBusy)` stops it.
pub type Reserve<'a> = &'a mut dyn FnMut(u64) -> Result<(), PreprocessError>;

/// A [`Reserve`] that never refuses (tests, tools).
pub fn unlimited(_: u64) -> Result<(), PreprocessError> {
    Ok(())
}

/// Decoded 8-bit pixels: one grey plane or interleaved RGB.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    Grey(GrayImage),
    Rgb(RgbImage),
}

impl Pixels {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Pixels::Grey(img) => img.dimensions(),
            Pixels::Rgb(img) => img.dimensions(),
        }
    }
}

/// Bytes that decoding `bytes` holds at most, from the header alone: the decoded image in its own sample type
/// plus its 8-bit grey/RGB conversion (the resized task input is small). Dimensions over `limits` are an error
/// here already (nothing is reserved for a bomb). None when no header can be read; then decoding fails before
/// it allocates anything.
pub fn decoded_bytes(bytes: &[u8], limits: ImageLimits) -> Result<Option<u64>, PreprocessError> {
    use image::ImageDecoder;
    let Some(decoder) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|reader| reader.into_decoder().ok())
    else {
        return Ok(None);
    };
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let pixels = u64::from(width) * u64::from(height);
    Ok(Some(pixels.saturating_mul(
        u64::from(decoder.color_type().bytes_per_pixel()) + 3,
    )))
}

/// Decodes PNG or JPEG bytes to 8-bit grey or RGB (16-bit greyscale windowed by the default rules of [`render`]).
pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<Pixels, PreprocessError> {
    Ok(render(decode_image(bytes, limits)?, None).0)
}

/// Decodes PNG or JPEG bytes. Dimensions are read from the header and checked against `limits` before any pixel
/// data is decoded (decompression bombs never allocate). 8-bit images come back as [`Decoded::Pixels`], 16-bit
/// greyscale as [`Decoded::Levels`] (windowed later, never `>> 8`).
pub fn decode_image(bytes: &[u8], limits: ImageLimits) -> Result<Decoded, PreprocessError> {
    decode_with_format(bytes, limits).map(|(decoded, _)| decoded)
}

fn decode_with_format(
    bytes: &[u8],
    limits: ImageLimits,
) -> Result<(Decoded, &'static str), PreprocessError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Undecodable(format!("cannot read image: {e}")))?;
    let format = match reader.format() {
        Some(ImageFormat::Png) => "png",
        Some(ImageFormat::Jpeg) => "jpeg",
        Some(other) => {
            return Err(PreprocessError::UnsupportedFormat(format!(
                "image format {other:?} is not supported; send PNG, JPEG or DICOM"
            )));
        }
        None => {
            return Err(PreprocessError::Undecodable(
                "body is not a PNG, JPEG or DICOM image".into(),
            ))
        }
    };
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| PreprocessError::Undecodable(format!("cannot read image header: {e}")))?;
    check_dimensions(width, height, limits)?;

    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Undecodable(format!("cannot read image: {e}")))?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    // 16-bit RGBA is the widest PNG/JPEG decodes to: 8 bytes per pixel, plus decoder scratch.
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(decode_limits);
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => {
            PreprocessError::TooLarge(format!("image exceeds limits: {e}"))
        }
        e => PreprocessError::Undecodable(format!(
            "cannot decode image (corrupt or truncated?): {e}"
        )),
    })?;
    Ok((to_decoded(image), format))
}

/// Per-request choices that shape preprocessing (native API query: `frame`, `window`, `return_pixels`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PrepareOptions {
    /// 0-based frame of a multi-frame DICOM object; `None` = the first (0).
    pub frame: Option<u32>,
    /// Window for greyscale levels (LINEAR), overriding the file's.
    pub window: Option<Window>,
    /// Return the 8-bit image that went into channel conversion, as a base64 PNG.
    pub return_pixels: bool,
}

/// What one answer reports about the image it classified (never a DICOM patient or study attribute).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InputInfo {
    /// `png`, `jpeg` or `dicom`
    pub format: &'static str,
    pub rows: u32,
    pub columns: u32,
    /// Bits per sample actually stored (DICOM Bits Stored; 8 or 16 for PNG/JPEG).
    pub bits_stored: u16,
    /// DICOM: the file's; PNG/JPEG: `MONOCHROME2` or `RGB` as decoded.
    pub photometric_interpretation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_syntax: Option<String>,
    /// 0-based frame used and frames in the object (DICOM; 0 and 1 otherwise).
    pub frame: u32,
    pub frames: u32,
    /// The window that turned greyscale levels into 8 bits; `null` for 8-bit and colour images (used as they are).
    pub window: Option<AppliedWindow>,
    /// With `return_pixels=true`: the 8-bit image (native size, after windowing and colour conversion, before
    /// channel conversion, resize and normalisation) as a base64 PNG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pixels_png: Option<String>,
}

/// One image body (PNG, JPEG or DICOM, recognised by its bytes) -> the task input and what was used.
pub fn prepare(
    bytes: &[u8],
    options: &PrepareOptions,
    limits: ImageLimits,
    input: &TaskInput,
    reserve: Reserve<'_>,
) -> Result<(Vec<f32>, InputInfo), PreprocessError> {
    let (decoded, mut info) = if crate::dicom::looks_like_dicom(bytes) {
        let (decoded, dicom) = crate::dicom::decode(bytes, options.frame, limits, reserve)?;
        let (columns, rows) = decoded.dimensions();
        let info = InputInfo {
            format: "dicom",
            rows,
            columns,
            bits_stored: dicom.bits_stored,
            photometric_interpretation: dicom.photometric_interpretation,
            transfer_syntax: Some(dicom.transfer_syntax),
            frame: dicom.frame,
            frames: dicom.frames,
            window: None,
            pixels_png: None,
        };
        (decoded, info)
    } else {
        if let Some(frame @ 1..) = options.frame {
            return Err(PreprocessError::BadFrame(format!(
                "frame {frame} does not exist: a PNG/JPEG image has one frame (0)"
            )));
        }
        if let Some(needed) = decoded_bytes(bytes, limits)? {
            reserve(needed)?;
        }
        let (decoded, format) = decode_with_format(bytes, limits)?;
        let (columns, rows) = decoded.dimensions();
        let (bits_stored, photometric) = match &decoded {
            Decoded::Levels(levels) => (levels.bits_stored, "MONOCHROME2"),
            Decoded::Pixels(Pixels::Grey(_)) => (8, "MONOCHROME2"),
            Decoded::Pixels(Pixels::Rgb(_)) => (8, "RGB"),
        };
        let info = InputInfo {
            format,
            rows,
            columns,
            bits_stored,
            photometric_interpretation: photometric.into(),
            transfer_syntax: None,
            frame: 0,
            frames: 1,
            window: None,
            pixels_png: None,
        };
        (decoded, info)
    };
    let (pixels, window) = render(decoded, options.window);
    info.window = window;
    if options.return_pixels {
        info.pixels_png = Some(pixels_png(&pixels));
    }
    Ok((to_task_input(&pixels, input), info))
}

fn pixels_png(pixels: &Pixels) -> String {
    use base64::Engine;
    let image = match pixels {
        Pixels::Grey(img) => DynamicImage::ImageLuma8(img.clone()),
        Pixels::Rgb(img) => DynamicImage::ImageRgb8(img.clone()),
    };
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .expect("PNG encoding into memory");
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

pub fn check_dimensions(
    width: u32,
    height: u32,
    limits: ImageLimits,
) -> Result<(), PreprocessError> {
    if width == 0 || height == 0 {
        return Err(PreprocessError::Undecodable(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if width > limits.max_side || height > limits.max_side || pixels > limits.max_pixels {
        return Err(PreprocessError::TooLarge(format!(
            "image is {width}x{height} ({pixels} pixels); limits are {} pixels per side and {} pixels",
            limits.max_side, limits.max_pixels
        )));
    }
    Ok(())
}

/// 8-bit grey or RGB as is; 16-bit greyscale as levels to window; 16-bit colour scaled by 255/65535 (rounded);
/// alpha is dropped.
fn to_decoded(image: DynamicImage) -> Decoded {
    fn scale(v: &[u16]) -> Vec<u8> {
        v.iter().map(|&x| sixteen_to_eight(x)).collect()
    }
    let (w, h) = (image.width(), image.height());
    let levels = |values: Vec<f32>| {
        Decoded::Levels(GreyLevels {
            width: w,
            height: h,
            values,
            stored_range: (0.0, 65535.0),
            bits_stored: 16,
            window: None,
            voi_lut: None,
            invert: false,
        })
    };
    match image {
        DynamicImage::ImageLuma8(img) => Decoded::Pixels(Pixels::Grey(img)),
        DynamicImage::ImageLumaA8(img) => Decoded::Pixels(Pixels::Grey(
            GrayImage::from_raw(w, h, img.pixels().map(|p| p.0[0]).collect()).expect("size"),
        )),
        DynamicImage::ImageRgb8(img) => Decoded::Pixels(Pixels::Rgb(img)),
        DynamicImage::ImageRgba8(img) => Decoded::Pixels(Pixels::Rgb(
            RgbImage::from_raw(
                w,
                h,
                img.pixels()
                    .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
                    .collect(),
            )
            .expect("size"),
        )),
        DynamicImage::ImageLuma16(img) => {
            levels(img.as_raw().iter().map(|&v| f32::from(v)).collect())
        }
        DynamicImage::ImageLumaA16(img) => {
            levels(img.pixels().map(|p| f32::from(p.0[0])).collect())
        }
        DynamicImage::ImageRgb16(img) => Decoded::Pixels(Pixels::Rgb(
            RgbImage::from_raw(w, h, scale(img.as_raw())).expect("size"),
        )),
        DynamicImage::ImageRgba16(img) => Decoded::Pixels(Pixels::Rgb(
            RgbImage::from_raw(
                w,
                h,
                img.pixels()
                    .flat_map(|p| {
                        [
                            sixteen_to_eight(p.0[0]),
                            sixteen_to_eight(p.0[1]),
                            sixteen_to_eight(p.0[2]),
                        ]
                    })
                    .collect(),
            )
            .expect("size"),
        )),
        other => Decoded::Pixels(Pixels::Rgb(other.to_rgb8())),
    }
}

/// A 16-bit colour sample as 8 bits: `round(v * 255 / 65535)`.
pub fn sixteen_to_eight(v: u16) -> u8 {
    ((u32::from(v) * 255 + 32767) / 65535) as u8
}

/// What a decoder hands to windowing: 8-bit pixels used as they are, or greyscale levels to window.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Pixels(Pixels),
    Levels(GreyLevels),
}

impl Decoded {
    pub fn dimensions(&self) -> (u32, u32) {
        match self {
            Decoded::Pixels(pixels) => pixels.dimensions(),
            Decoded::Levels(levels) => (levels.width, levels.height),
        }
    }
}

/// Greyscale samples in output units (after the DICOM Modality LUT; raw values for 16-bit PNG), to be windowed.
#[derive(Debug, Clone, PartialEq)]
pub struct GreyLevels {
    pub width: u32,
    pub height: u32,
    /// Row-major, one value per pixel.
    pub values: Vec<f32>,
    /// The lowest and highest value the stored bits can hold, in output units.
    pub stored_range: (f64, f64),
    pub bits_stored: u16,
    /// The file's first window (DICOM Window Center/Width), if any.
    pub window: Option<Window>,
    /// The file's first VOI LUT (DICOM VOI LUT Sequence), if any; preferred to its window.
    pub voi_lut: Option<VoiLut>,
    /// MONOCHROME1: the lowest value is white; inverted after windowing.
    pub invert: bool,
}

/// DICOM VOI LUT Function (PS3.3 C.11.2.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VoiFunction {
    Linear,
    LinearExact,
    Sigmoid,
}

/// A VOI window: center, width and function.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: VoiFunction,
}

impl Window {
    /// LINEAR needs a width of at least 1, the others a positive width (PS3.3 C.11.2.1.2).
    pub fn is_valid(&self) -> bool {
        self.center.is_finite()
            && self.width.is_finite()
            && match self.function {
                VoiFunction::Linear => self.width >= 1.0,
                _ => self.width > 0.0,
            }
    }
}

/// A DICOM VOI LUT (PS3.3 C.11.2.1.1): `data[x - first]`, clamped to the table, entries `bits` deep.
#[derive(Debug, Clone, PartialEq)]
pub struct VoiLut {
    pub first: i32,
    pub bits: u16,
    pub data: Vec<u16>,
}

impl VoiLut {
    /// One value (output units, truncated to an integer index) through the table, into `[0, 255]`.
    pub fn apply(&self, x: f64) -> f64 {
        let last = self.data.len().saturating_sub(1) as f64;
        let index = (x - f64::from(self.first)).trunc().clamp(0.0, last) as usize;
        let top = ((1u32 << self.bits) - 1) as f64;
        (f64::from(self.data[index]) * 255.0 / top).clamp(0.0, 255.0)
    }
}

/// Where the window used came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowSource {
    /// `?window=center,width`
    Query,
    /// the file's first Window Center/Width
    File,
    /// the file's first VOI LUT Sequence item (no center/width)
    FileLut,
    /// no window given, more than 8 bits stored: the frame's lowest to highest value
    MinMax,
    /// no window given, at most 8 bits stored (or a constant frame): the full range of the stored bits
    StoredRange,
}

/// The window applied to one image, as the answer reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AppliedWindow {
    /// `None` when a VOI LUT table was applied.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    pub source: WindowSource,
}

/// VOI LUT (PS3.3 C.11.2.1.2) of one value `x` into `[0, 255]`.
pub fn voi(x: f64, window: &Window) -> f64 {
    let (c, w) = (window.center, window.width);
    let y = match window.function {
        VoiFunction::Linear => {
            if x <= c - 0.5 - (w - 1.0) / 2.0 {
                0.0
            } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                1.0
            } else {
                (x - (c - 0.5)) / (w - 1.0) + 0.5
            }
        }
        VoiFunction::LinearExact => (x - c) / w + 0.5,
        VoiFunction::Sigmoid => 1.0 / (1.0 + (-4.0 * (x - c) / w).exp()),
    };
    (y * 255.0).clamp(0.0, 255.0)
}

/// The window for one image: the query's, else the file's first VOI LUT, else its first window, else (more than 8
/// bits stored) the frame's min-max, else the full stored range, the last two as LINEAR_EXACT (an exact linear map
/// of `[lo, hi]`).
pub fn choose_window(levels: &GreyLevels, query: Option<Window>) -> AppliedWindow {
    if let Some(window) = query {
        return AppliedWindow {
            window: Some(window),
            source: WindowSource::Query,
        };
    }
    if levels.voi_lut.is_some() {
        return AppliedWindow {
            window: None,
            source: WindowSource::FileLut,
        };
    }
    if let Some(window) = levels.window {
        return AppliedWindow {
            window: Some(window),
            source: WindowSource::File,
        };
    }
    let exact = |lo: f64, hi: f64| {
        Some(Window {
            center: (lo + hi) / 2.0,
            width: hi - lo,
            function: VoiFunction::LinearExact,
        })
    };
    if levels.bits_stored > 8 {
        let (lo, hi) = levels
            .values
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if lo < hi {
            return AppliedWindow {
                window: exact(f64::from(lo), f64::from(hi)),
                source: WindowSource::MinMax,
            };
        }
    }
    let (lo, hi) = levels.stored_range;
    AppliedWindow {
        window: exact(lo, hi),
        source: WindowSource::StoredRange,
    }
}

/// Greyscale levels to 8 bits through the chosen window or VOI LUT (rounded), inverted for MONOCHROME1.
pub fn apply_window(levels: &GreyLevels, applied: &AppliedWindow) -> GrayImage {
    let map = |v: f64| match (&applied.window, &levels.voi_lut) {
        (Some(window), _) => voi(v, window),
        (None, Some(lut)) => lut.apply(v),
        (None, None) => 0.0,
    };
    let data = levels
        .values
        .iter()
        .map(|&v| {
            let y = map(f64::from(v)).round() as u8;
            if levels.invert {
                255 - y
            } else {
                y
            }
        })
        .collect();
    GrayImage::from_raw(levels.width, levels.height, data).expect("size")
}

/// 8-bit pixels for [`to_task_input`]: 8-bit images as they are, greyscale levels windowed (see [`choose_window`]).
pub fn render(decoded: Decoded, query: Option<Window>) -> (Pixels, Option<AppliedWindow>) {
    match decoded {
        Decoded::Pixels(pixels) => (pixels, None),
        Decoded::Levels(levels) => {
            let applied = choose_window(&levels, query);
            (Pixels::Grey(apply_window(&levels, &applied)), Some(applied))
        }
    }
}

/// ITU-R BT.601 luma `0.299 R + 0.587 G + 0.114 B`, rounded, in the fixed-point form Pillow's `convert("L")` uses.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

pub fn rgb_to_grey(img: &RgbImage) -> GrayImage {
    let (w, h) = img.dimensions();
    GrayImage::from_raw(
        w,
        h,
        img.pixels().map(|p| luma(p.0[0], p.0[1], p.0[2])).collect(),
    )
    .expect("size")
}

pub fn grey_to_rgb(img: &GrayImage) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_raw(w, h, img.as_raw().iter().flat_map(|&v| [v, v, v]).collect()).expect("size")
}

/// Channel conversion, resize and normalisation for one task: returns `3 * H * W` floats, CHW order.
pub fn to_task_input(pixels: &Pixels, input: &TaskInput) -> Vec<f32> {
    let (width, height) = (input.width as u32, input.height as u32);
    let rgb: RgbImage = match (input.channels, pixels) {
        (1, Pixels::Grey(img)) => grey_to_rgb(&resize_grey(img, width, height)),
        (1, Pixels::Rgb(img)) => grey_to_rgb(&resize_grey(&rgb_to_grey(img), width, height)),
        (_, Pixels::Grey(img)) => grey_to_rgb(&resize_grey(img, width, height)),
        (_, Pixels::Rgb(img)) => resize_rgb(img, width, height),
    };
    normalise(&rgb, &input.mean, &input.std)
}

fn resize_grey(img: &GrayImage, width: u32, height: u32) -> GrayImage {
    if img.dimensions() == (width, height) {
        img.clone()
    } else {
        image::imageops::resize(img, width, height, FilterType::Triangle)
    }
}

fn resize_rgb(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        img.clone()
    } else {
        image::imageops::resize(img, width, height, FilterType::Triangle)
    }
}

/// `x = (v / 255 - mean[c]) / std[c]`, interleaved HWC bytes to planar CHW floats.
pub fn normalise(rgb: &RgbImage, mean: &[f32; 3], std: &[f32; 3]) -> Vec<f32> {
    let plane = rgb.width() as usize * rgb.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, pixel) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(pixel.0[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ImageLimits = ImageLimits {
        max_pixels: 1_000_000,
        max_side: 4096,
    };

    fn task(channels: usize, size: usize) -> TaskInput {
        TaskInput {
            channels,
            height: size,
            width: size,
            mean: [0.5; 3],
            std: [0.5; 3],
        }
    }

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn luma_follows_bt601_rounded() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76); // 76.245
        assert_eq!(luma(0, 255, 0), 150); // 149.685
        assert_eq!(luma(0, 0, 255), 29); // 29.07
        assert_eq!(
            luma(10, 200, 30),
            (0.299f32 * 10.0 + 0.587 * 200.0 + 0.114 * 30.0).round() as u8
        );
    }

    #[test]
    fn grey_task_replicates_luma_into_three_channels() {
        let rgb = RgbImage::from_raw(2, 1, vec![255, 0, 0, 0, 0, 255]).unwrap();
        let x = to_task_input(&Pixels::Rgb(rgb), &task(1, 2).clone_with(2, 1));
        let expect = |v: u8| (f32::from(v) / 255.0 - 0.5) / 0.5;
        assert_eq!(
            x,
            [
                expect(76),
                expect(29),
                expect(76),
                expect(29),
                expect(76),
                expect(29)
            ]
        );
    }

    #[test]
    fn rgb_task_keeps_channels_planar() {
        let rgb = RgbImage::from_raw(1, 2, vec![255, 0, 51, 0, 255, 102]).unwrap();
        let input = TaskInput {
            channels: 3,
            height: 2,
            width: 1,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let x = to_task_input(&Pixels::Rgb(rgb), &input);
        assert_eq!(x, [1.0, 0.0, 0.0, 1.0, 0.2, 0.4]);
        // grey into an RGB task is repeated
        let grey = GrayImage::from_raw(1, 2, vec![255, 0]).unwrap();
        assert_eq!(
            to_task_input(&Pixels::Grey(grey), &input),
            [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn resizes_to_the_task_size() {
        let grey = GrayImage::from_pixel(56, 56, image::Luma([255]));
        let x = to_task_input(&Pixels::Grey(grey), &task(1, 28));
        assert_eq!(x.len(), 3 * 28 * 28);
        assert!(x.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn decodes_png_and_jpeg_and_sixteen_bit_shifts() {
        let png = encode(
            DynamicImage::ImageLuma8(GrayImage::from_pixel(3, 2, image::Luma([7]))),
            ImageFormat::Png,
        );
        assert_eq!(
            decode(&png, LIMITS).unwrap(),
            Pixels::Grey(GrayImage::from_pixel(3, 2, image::Luma([7])))
        );
        let jpeg = encode(
            DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]))),
            ImageFormat::Jpeg,
        );
        assert!(
            matches!(decode(&jpeg, LIMITS).unwrap(), Pixels::Rgb(img) if img.dimensions() == (8, 8))
        );
        // a 12-bit radiograph in a 16-bit PNG: windowed over what is stored, not cut to its top 8 bits
        let sixteen =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(3, 1, vec![0, 2048, 4095]).unwrap();
        let png16 = encode(DynamicImage::ImageLuma16(sixteen), ImageFormat::Png);
        assert_eq!(
            decode(&png16, LIMITS).unwrap(),
            Pixels::Grey(GrayImage::from_raw(3, 1, vec![0, 128, 255]).unwrap())
        );
        let rgb16 =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![65535, 0x8000, 0])
                .unwrap();
        let png16 = encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png);
        assert_eq!(
            decode(&png16, LIMITS).unwrap(),
            Pixels::Rgb(RgbImage::from_raw(1, 1, vec![255, 128, 0]).unwrap())
        );
        let rgba = encode(
            DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
                1,
                1,
                image::Rgba([1, 2, 3, 4]),
            )),
            ImageFormat::Png,
        );
        assert_eq!(
            decode(&rgba, LIMITS).unwrap(),
            Pixels::Rgb(RgbImage::from_pixel(1, 1, image::Rgb([1, 2, 3])))
        );
    }

    #[test]
    fn decoded_size_is_read_from_the_header() {
        let png = encode(
            DynamicImage::ImageRgb8(RgbImage::from_pixel(10, 4, image::Rgb([1, 2, 3]))),
            ImageFormat::Png,
        );
        assert_eq!(decoded_bytes(&png, LIMITS), Ok(Some(40 * (3 + 3))));
        let sixteen = encode(
            DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(5, 5, image::Luma([9u16]))),
            ImageFormat::Png,
        );
        assert_eq!(decoded_bytes(&sixteen, LIMITS), Ok(Some(25 * (2 + 3))));
        assert_eq!(decoded_bytes(b"not an image", LIMITS), Ok(None));
        let wide = encode(
            DynamicImage::ImageLuma8(GrayImage::new(5000, 1)),
            ImageFormat::Png,
        );
        assert!(matches!(
            decoded_bytes(&wide, LIMITS),
            Err(PreprocessError::TooLarge(_))
        ));
    }

    #[test]
    fn bad_bytes_truncation_and_bombs_are_typed_errors() {
        assert!(matches!(
            decode(b"hello", LIMITS),
            Err(PreprocessError::Undecodable(_))
        ));
        let png = encode(
            DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9]))),
            ImageFormat::Png,
        );
        assert!(matches!(
            decode(&png[..png.len() / 2], LIMITS),
            Err(PreprocessError::Undecodable(_))
        ));
        let wide = encode(
            DynamicImage::ImageLuma8(GrayImage::new(5000, 1)),
            ImageFormat::Png,
        );
        assert!(matches!(
            decode(&wide, LIMITS),
            Err(PreprocessError::TooLarge(_))
        ));
        let many = ImageLimits {
            max_pixels: 100,
            max_side: 4096,
        };
        assert!(matches!(
            decode(&png, many),
            Err(PreprocessError::TooLarge(_))
        ));
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(matches!(
            decode(gif, LIMITS),
            Err(PreprocessError::UnsupportedFormat(_))
        ));
    }

    fn levels(values: Vec<f32>, bits_stored: u16, stored_range: (f64, f64)) -> GreyLevels {
        GreyLevels {
            width: values.len() as u32,
            height: 1,
            values,
            stored_range,
            bits_stored,
            window: None,
            voi_lut: None,
            invert: false,
        }
    }

    fn linear(center: f64, width: f64) -> Window {
        Window {
            center,
            width,
            function: VoiFunction::Linear,
        }
    }

    #[test]
    fn linear_voi_follows_the_dicom_formula() {
        // PS3.3 C.11.2.1.2.1 with c = 40, w = 400 (a CT soft-tissue window): edges at -159.5 and 239.5
        let w = linear(40.0, 400.0);
        assert_eq!(voi(-160.0, &w), 0.0);
        assert_eq!(voi(240.0, &w), 255.0);
        assert!((voi(39.5, &w) - 127.5).abs() < 1e-9);
        assert!((voi(100.0, &w) - ((100.0 - 39.5) / 399.0 + 0.5) * 255.0).abs() < 1e-9);
        let exact = Window {
            center: 50.0,
            width: 100.0,
            function: VoiFunction::LinearExact,
        };
        assert_eq!(voi(0.0, &exact), 0.0);
        assert_eq!(voi(100.0, &exact), 255.0);
        assert_eq!(voi(75.0, &exact), 191.25);
        let sigmoid = Window {
            function: VoiFunction::Sigmoid,
            ..exact
        };
        assert!((voi(50.0, &sigmoid) - 127.5).abs() < 1e-9);
        assert!(!linear(0.0, 0.5).is_valid() && exact.is_valid());
    }

    #[test]
    fn window_choice_query_then_file_then_min_max_then_stored_range() {
        let mut twelve = levels(vec![100.0, 300.0, 1100.0], 12, (0.0, 4095.0));
        let chosen = choose_window(&twelve, None);
        assert_eq!(chosen.source, WindowSource::MinMax);
        let window = chosen.window.unwrap();
        assert_eq!((window.center, window.width), (600.0, 1000.0));
        assert_eq!(apply_window(&twelve, &chosen).into_raw(), [0, 51, 255]);
        twelve.window = Some(linear(600.0, 1600.0));
        assert_eq!(choose_window(&twelve, None).source, WindowSource::File);
        let query = choose_window(&twelve, Some(linear(0.0, 10.0)));
        assert_eq!(query.source, WindowSource::Query);
        assert_eq!(apply_window(&twelve, &query).into_raw(), [255, 255, 255]);
        // 8 bits stored and no window: the stored range, i.e. the values as they are
        let eight = levels(vec![0.0, 7.0, 255.0], 8, (0.0, 255.0));
        let chosen = choose_window(&eight, None);
        assert_eq!(chosen.source, WindowSource::StoredRange);
        assert_eq!(apply_window(&eight, &chosen).into_raw(), [0, 7, 255]);
        // a VOI LUT (preferred to the file's window, not to the query's): x - first, clamped, 12-bit entries
        twelve.voi_lut = Some(VoiLut {
            first: 299,
            bits: 12,
            data: vec![0, 4095, 2048],
        });
        let lut = choose_window(&twelve, None);
        assert_eq!((lut.source, lut.window), (WindowSource::FileLut, None));
        assert_eq!(apply_window(&twelve, &lut).into_raw(), [0, 255, 128]);
        assert_eq!(
            choose_window(&twelve, Some(linear(0.0, 10.0))).source,
            WindowSource::Query
        );
        // a constant high-bit frame has no min-max window
        let flat = levels(vec![5.0, 5.0], 16, (-32768.0, 32767.0));
        assert_eq!(choose_window(&flat, None).source, WindowSource::StoredRange);
    }

    #[test]
    fn monochrome1_is_inverted_after_windowing() {
        let mut grey = levels(vec![0.0, 255.0, 64.0], 8, (0.0, 255.0));
        grey.invert = true;
        let (pixels, window) = render(Decoded::Levels(grey), None);
        assert_eq!(window.unwrap().source, WindowSource::StoredRange);
        assert_eq!(
            pixels,
            Pixels::Grey(GrayImage::from_raw(3, 1, vec![255, 0, 191]).unwrap())
        );
    }

    impl TaskInput {
        fn clone_with(&self, width: usize, height: usize) -> TaskInput {
            TaskInput {
                width,
                height,
                ..self.clone()
            }
        }
    }
}
