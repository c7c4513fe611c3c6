//! Image bytes -> normalised NCHW float input (FORMAT.md section 4), with size limits checked from the header first.

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

/// Decodes PNG or JPEG bytes to 8-bit grey or RGB. Dimensions are read from the header and checked
/// against `limits` before any pixel data is decoded (decompression bombs never allocate).
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

pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<Pixels, PreprocessError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Undecodable(format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(PreprocessError::UnsupportedFormat(format!(
                "image format {other:?} is not supported; send PNG or JPEG"
            )));
        }
        None => {
            return Err(PreprocessError::Undecodable(
                "body is not a PNG or JPEG image".into(),
            ))
        }
    }
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
    Ok(to_pixels(image))
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

/// 8-bit grey or RGB; 16-bit samples become `v >> 8`, alpha is dropped.
fn to_pixels(image: DynamicImage) -> Pixels {
    fn shift(v: &[u16]) -> Vec<u8> {
        v.iter().map(|&x| (x >> 8) as u8).collect()
    }
    let (w, h) = (image.width(), image.height());
    match image {
        DynamicImage::ImageLuma8(img) => Pixels::Grey(img),
        DynamicImage::ImageLumaA8(img) => Pixels::Grey(
            GrayImage::from_raw(w, h, img.pixels().map(|p| p.0[0]).collect()).expect("size"),
        ),
        DynamicImage::ImageRgb8(img) => Pixels::Rgb(img),
        DynamicImage::ImageRgba8(img) => Pixels::Rgb(
            RgbImage::from_raw(
                w,
                h,
                img.pixels()
                    .flat_map(|p| [p.0[0], p.0[1], p.0[2]])
                    .collect(),
            )
            .expect("size"),
        ),
        DynamicImage::ImageLuma16(img) => {
            Pixels::Grey(GrayImage::from_raw(w, h, shift(img.as_raw())).expect("size"))
        }
        DynamicImage::ImageLumaA16(img) => Pixels::Grey(
            GrayImage::from_raw(w, h, img.pixels().map(|p| (p.0[0] >> 8) as u8).collect())
                .expect("size"),
        ),
        DynamicImage::ImageRgb16(img) => {
            Pixels::Rgb(RgbImage::from_raw(w, h, shift(img.as_raw())).expect("size"))
        }
        DynamicImage::ImageRgba16(img) => Pixels::Rgb(
            RgbImage::from_raw(
                w,
                h,
                img.pixels()
                    .flat_map(|p| {
                        [
                            (p.0[0] >> 8) as u8,
                            (p.0[1] >> 8) as u8,
                            (p.0[2] >> 8) as u8,
                        ]
                    })
                    .collect(),
            )
            .expect("size"),
        ),
        other => Pixels::Rgb(other.to_rgb8()),
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
        let sixteen =
            image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(2, 2, image::Luma([0x12ff]));
        let png16 = encode(DynamicImage::ImageLuma16(sixteen), ImageFormat::Png);
        assert_eq!(
            decode(&png16, LIMITS).unwrap(),
            Pixels::Grey(GrayImage::from_pixel(2, 2, image::Luma([0x12])))
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
