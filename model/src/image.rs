//! Image preprocessing (`docs/qwen3-vl-reference.md` §5): decode, `smart_resize`,
//! PIL-exact bicubic resampling, normalisation and the patch rows in merge-block
//! order. Also the zoo's fixed grid (`docs/zoo-recipe.md` §4): the image stretched to
//! 448×448 (196 tokens).

use crate::config::PreprocessorConfig;
use crate::error::{Error, Result};
use std::path::Path;

/// Largest image, in pixels, that we agree to decode (about 16k × 16k would be 268M).
pub const MAX_DECODE_PIXELS: u64 = 64 * 1024 * 1024;

/// An 8-bit RGB image, row-major, channels interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// The model-ready form of one image.
#[derive(Debug, Clone)]
pub struct PatchedImage {
    /// `[P, C·T·patch·patch]` row-major patch rows in merge-block order.
    pub pixel_values: Vec<f32>,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
    /// Width of one patch row.
    pub patch_dim: usize,
}

impl PatchedImage {
    /// Number of patch rows P.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of `<|image_pad|>` tokens: P / merge².
    pub fn num_tokens(&self, merge: usize) -> usize {
        self.num_patches() / (merge * merge)
    }

    /// The patch rows as the reference's `[P, C·T·p·p]` pixel tensor (a copy).
    pub fn to_tensor(&self) -> Result<candle_core::Tensor> {
        let shape = (self.num_patches(), self.patch_dim);
        let t = candle_core::Tensor::from_vec(
            self.pixel_values.clone(),
            shape,
            &candle_core::Device::Cpu,
        )?;
        Ok(t)
    }
}

/// Largest image file read, in bytes (1 GiB): twice the largest pixel buffer the
/// decoder may allocate (16-bit RGBA at [`MAX_DECODE_PIXELS`]), so no image the
/// decoder accepts is cut, while a stream that never ends (`--image <(yes)`) is
/// refused instead of filling memory.
pub const MAX_IMAGE_BYTES: u64 = 2 * 8 * MAX_DECODE_PIXELS;

/// Decodes a PNG or JPEG file to RGB (alpha dropped, as PIL's `convert("RGB")` does).
///
/// `path` may be a pipe (`--image <(curl …)`, `--image /dev/stdin`) as well as a
/// regular file: an image is read once, front to back ([`crate::input::read_stream`]).
pub fn load_rgb(path: &Path) -> Result<Rgb8> {
    // Labelled as the image (not a bare I/O error), so a directory or an unreadable
    // file given to `--image` says which option it came from.
    let bad = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = crate::input::read_stream(path, MAX_IMAGE_BYTES).map_err(|e| bad(e.to_string()))?;
    if bytes.is_empty() {
        // What a FIFO whose writer is gone (or never came) reads as.
        return Err(bad("is empty, not a PNG or JPEG image".into()));
    }
    decode_rgb(&bytes, path)
}

/// The (width, height) a PNG or JPEG's header declares, checked against the pixel
/// limit, without decoding it; `name` only labels errors.
pub fn dimensions(bytes: &[u8], name: &Path) -> Result<(usize, usize)> {
    let bad = |msg: String| Error::Image {
        path: name.to_path_buf(),
        msg,
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    match reader.format() {
        None => return Err(bad("not a PNG or JPEG image".into())),
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(bad(
                "truncated JPEG: its data ends before the end-of-image marker (FF D9)".into(),
            ))
        }
        Some(_) => {}
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_PIXELS * 8);
    reader.limits(limits);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad(format!("cannot read dimensions: {e}")))?;
    if (w as u64) * (h as u64) > MAX_DECODE_PIXELS {
        return Err(bad(format!(
            "{w}×{h} is larger than the {MAX_DECODE_PIXELS}-pixel limit"
        )));
    }
    Ok((w as usize, h as usize))
}

/// Decodes image bytes; `name` only labels errors.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<Rgb8> {
    let bad = |msg: String| Error::Image {
        path: name.to_path_buf(),
        msg,
    };
    let (w, h) = dimensions(bytes, name)?;
    let (w, h) = (w as u32, h as u32);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    reader.limits(limits_for(w, h));
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    let rgb = img.to_rgb8();
    Ok(Rgb8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// Whether a JPEG stream reaches its end-of-image marker (FF D9): its marker
/// segments are skipped by their lengths (so an FF D9 inside an EXIF thumbnail or a
/// comment does not count) and its entropy-coded scans are walked to the next marker.
///
/// The decoder (zune-jpeg, through `image`) fills a truncated scan with grey and
/// reports success, where a truncated PNG is an error; this makes the two agree.
/// Bytes after the marker are ignored, as every decoder does.
fn jpeg_is_complete(b: &[u8]) -> bool {
    // In a scan, FF is followed by 00 (a stuffed FF), FF (fill) or D0–D7 (restart):
    // none of them ends the scan.
    let is_marker = |x: u8| !matches!(x, 0x00 | 0xFF | 0xD0..=0xD7);
    if !b.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        while i + 1 < b.len() && !(b[i] == 0xFF && is_marker(b[i + 1])) {
            i += 1;
        }
        if i + 1 >= b.len() {
            return false;
        }
        match b[i + 1] {
            0xD9 => return true,
            // Markers without a length: SOI, TEM.
            0xD8 | 0x01 => i += 2,
            _ => {
                let Some(len) = b.get(i + 2..i + 4) else {
                    return false;
                };
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                if len < 2 {
                    return false;
                }
                i += 2 + len;
            }
        }
    }
}

fn limits_for(w: u32, h: u32) -> image::Limits {
    let mut l = image::Limits::default();
    l.max_alloc = Some((w as u64 * h as u64 * 8).max(1 << 20));
    l
}

/// HF `smart_resize`: the nearest size whose sides are multiples of `factor`
/// (rounding half to even, as Python's `round`), kept within the pixel bounds.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 {
        return Err(Error::Image {
            path: "<image>".into(),
            msg: "image has a zero side".into(),
        });
    }
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Image {
            path: "<image>".into(),
            msg: format!("aspect ratio {width}:{height} exceeds 200"),
        });
    }
    let mut h_bar = ((h / f).round_ties_even() * f).max(f);
    let mut w_bar = ((w / f).round_ties_even() * f).max(f);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// PIL's bicubic kernel (a = −0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// PIL's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output sample's taps: first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
fn coefficients(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let sum: f64 = w.iter().sum();
            let one = (1u64 << PRECISION_BITS) as f64;
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if sum != 0.0 { k / sum } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like PIL's `Image.resize((w, h), BICUBIC)` on an RGB image: two separable
/// passes, each rounded back to 8 bits, in Pillow 13's order (see `vertical_first`).
pub fn resize_bicubic(img: &Rgb8, out_w: usize, out_h: usize) -> Rgb8 {
    if img.width == out_w && img.height == out_h {
        return img.clone();
    }
    let (w_pass, h_pass) = (out_w != img.width, out_h != img.height);
    if vertical_first(img.width, img.height, out_w, out_h) {
        let cur = if h_pass {
            resize_vertical(img, out_h)
        } else {
            img.clone()
        };
        if w_pass {
            resize_horizontal(&cur, out_w)
        } else {
            cur
        }
    } else {
        let cur = if w_pass {
            resize_horizontal(img, out_w)
        } else {
            img.clone()
        };
        if h_pass {
            resize_vertical(&cur, out_h)
        } else {
            cur
        }
    }
}

/// Which pass Pillow runs first. Since Pillow 13 (python-pillow/Pillow#9549,
/// `ImagingResampleInner`), the vertical pass goes first when the height shrinks
/// by more than twice as many pixels as the width does (so a widened image that
/// loses height does too); otherwise horizontal first, as in earlier Pillow. The
/// two orders round differently, so the choice changes output bytes.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    dh > 0 && dh > 2 * dw
}

/// One horizontal pass: every row resampled to `out_w` columns.
fn resize_horizontal(img: &Rgb8, out_w: usize) -> Rgb8 {
    let half = 1i64 << (PRECISION_BITS - 1);
    let taps = coefficients(img.width, out_w);
    let mut data = vec![0u8; img.height * out_w * 3];
    for y in 0..img.height {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        for (x, t) in taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc = half;
                for (i, &k) in t.weights.iter().enumerate() {
                    acc += row[(t.start + i) * 3 + c] as i64 * k as i64;
                }
                data[(y * out_w + x) * 3 + c] = clip8(acc);
            }
        }
    }
    Rgb8 {
        width: out_w,
        height: img.height,
        data,
    }
}

/// One vertical pass: every column resampled to `out_h` rows.
fn resize_vertical(img: &Rgb8, out_h: usize) -> Rgb8 {
    let half = 1i64 << (PRECISION_BITS - 1);
    let taps = coefficients(img.height, out_h);
    let w = img.width;
    let mut data = vec![0u8; out_h * w * 3];
    for (y, t) in taps.iter().enumerate() {
        for x in 0..w * 3 {
            let mut acc = half;
            for (i, &k) in t.weights.iter().enumerate() {
                acc += img.data[(t.start + i) * w * 3 + x] as i64 * k as i64;
            }
            data[y * w * 3 + x] = clip8(acc);
        }
    }
    Rgb8 {
        width: w,
        height: out_h,
        data,
    }
}

/// How the image is brought to a patch grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// HF's processor: `smart_resize` to multiples of 32 within the pixel bounds.
    Dynamic,
    /// The zoo's host: stretch to a fixed square side (448 → 196 tokens).
    Fixed(usize),
}

/// Rescale, normalise and patchify an RGB image whose sides are multiples of
/// `patch·merge`, as HF's slow (PIL) processor does.
pub fn patchify(img: &Rgb8, pp: &PreprocessorConfig) -> Result<PatchedImage> {
    let (p, m, t) = (pp.patch_size, pp.merge_size, pp.temporal_patch_size);
    if !img.height.is_multiple_of(p * m) || !img.width.is_multiple_of(p * m) {
        return Err(Error::Image {
            path: "<image>".into(),
            msg: format!(
                "{}×{} is not a multiple of {} on both sides",
                img.width,
                img.height,
                p * m
            ),
        });
    }
    let (gh, gw) = (img.height / p, img.width / p);
    let patch_dim = 3 * t * p * p;
    // (x·rescale − mean) / std in f32, after an f64 rescale as HF's `rescale` does.
    let norm: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            let mut lut = [0f32; 256];
            for (v, o) in lut.iter_mut().enumerate() {
                let r = (v as f64 * pp.rescale_factor) as f32;
                *o = (r - pp.image_mean[c]) / pp.image_std[c];
            }
            lut
        })
        .collect();
    let mut out = Vec::with_capacity(gh * gw * patch_dim);
    for br in 0..gh / m {
        for bc in 0..gw / m {
            for ir in 0..m {
                for ic in 0..m {
                    let (row, col) = (br * m + ir, bc * m + ic);
                    for (c, lut) in norm.iter().enumerate() {
                        // The still image fills every temporal slot.
                        for _ in 0..t {
                            for py in 0..p {
                                let y = row * p + py;
                                for px in 0..p {
                                    let x = col * p + px;
                                    out.push(lut[img.data[(y * img.width + x) * 3 + c] as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(PatchedImage {
        pixel_values: out,
        grid_thw: [1, gh, gw],
        patch_dim,
    })
}

/// The (height, width) a `height × width` image is resized to in `mode`: known from
/// its header, before it is decoded.
pub fn target_size(
    height: usize,
    width: usize,
    pp: &PreprocessorConfig,
    mode: Resize,
) -> Result<(usize, usize)> {
    let factor = pp.patch_size * pp.merge_size;
    match mode {
        Resize::Dynamic => smart_resize(height, width, factor, pp.min_pixels, pp.max_pixels),
        Resize::Fixed(side) if side % factor != 0 => Err(Error::Config(format!(
            "fixed image side {side} is not a multiple of {factor}"
        ))),
        Resize::Fixed(side) => Ok((side, side)),
    }
}

/// The whole pipeline: resize (dynamic or fixed), then patchify.
pub fn preprocess(img: &Rgb8, pp: &PreprocessorConfig, mode: Resize) -> Result<PatchedImage> {
    let (h, w) = target_size(img.height, img.width, pp, mode)?;
    patchify(&resize_bicubic(img, w, h), pp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_hf_examples() {
        let f = 32;
        assert_eq!(
            smart_resize(448, 448, f, 65536, 16777216).unwrap(),
            (448, 448)
        );
        // Python round(3.5) = 4, round(2.5) = 2: ties go to even.
        assert_eq!(smart_resize(112, 80, f, 1024, 1 << 24).unwrap(), (128, 64));
        assert_eq!(smart_resize(100, 150, f, 4096, 262144).unwrap(), (96, 160));
        // Too small: scaled up to min_pixels.
        let (h, w) = smart_resize(64, 64, f, 65536, 16777216).unwrap();
        assert_eq!((h, w), (256, 256));
        // Too large: scaled down below max_pixels.
        let (h, w) = smart_resize(4000, 3000, f, 65536, 1 << 20).unwrap();
        assert!(h * w <= 1 << 20 && h % 32 == 0 && w % 32 == 0);
        assert!(smart_resize(10, 4000, f, 1, 1 << 30).is_err());
    }

    /// A 64×48 gradient, JPEG-encoded.
    fn jpeg() -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    #[test]
    fn truncated_jpegs_are_refused() {
        let name = Path::new("photo.jpg");
        let full = jpeg();
        assert_eq!(decode_rgb(&full, name).unwrap().width, 64);
        // Bytes after the end-of-image marker are ignored.
        let mut tail = full.clone();
        tail.extend_from_slice(b"trailer");
        decode_rgb(&tail, name).unwrap();
        for keep in [full.len() - 2, full.len() * 2 / 3, 400] {
            let e = decode_rgb(&full[..keep], name).unwrap_err().to_string();
            assert!(
                e.contains("photo.jpg") && e.contains("truncated JPEG"),
                "{keep}: {e}"
            );
        }
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // (in w, in h, out w, out h): Pillow 13 ran the vertical pass first?
        for (iw, ih, ow, oh, v) in [
            (179, 99, 162, 47, true),
            (67, 159, 30, 64, true),
            (150, 100, 160, 96, true), // widened, height down
            (150, 100, 140, 96, false),
            (151, 126, 72, 29, false),
            (40, 40, 30, 20, false), // dh == 2·dw: horizontal first
            (40, 41, 30, 20, true),
            (20, 15, 33, 26, false), // upscale
            (20, 60, 20, 27, true),  // height only
            (60, 20, 37, 20, false), // width only
        ] {
            assert_eq!(vertical_first(iw, ih, ow, oh), v, "{iw}x{ih} -> {ow}x{oh}");
        }
    }

    #[test]
    fn identity_resize_is_a_copy_and_weights_sum_to_one() {
        let img = Rgb8 {
            width: 4,
            height: 2,
            data: (0..24).collect(),
        };
        assert_eq!(resize_bicubic(&img, 4, 2), img);
        for (i, o) in [(100, 96), (96, 160), (7, 3), (3, 7)] {
            for t in coefficients(i, o) {
                let s: i64 = t.weights.iter().map(|&k| k as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64);
            }
        }
        // A constant image stays constant through resampling.
        let flat = Rgb8 {
            width: 50,
            height: 30,
            data: vec![77; 50 * 30 * 3],
        };
        let r = resize_bicubic(&flat, 64, 32);
        assert!(r.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn patch_rows_follow_merge_block_order() {
        let pp = PreprocessorConfig::default();
        // 64×32: grid 2 rows × 4 cols of patches; pixel value encodes its patch.
        let (w, h) = (64, 32);
        let mut data = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let patch = (y / 16) * 4 + x / 16;
                data[(y * w + x) * 3] = patch as u8 * 10;
            }
        }
        let img = Rgb8 {
            width: w,
            height: h,
            data,
        };
        let p = patchify(&img, &pp).unwrap();
        assert_eq!(p.grid_thw, [1, 2, 4]);
        let first_of_row = |r: usize| p.pixel_values[r * p.patch_dim];
        let to_patch = |v: f32| ((v * 0.5 + 0.5) * 255.0 / 10.0).round() as usize;
        // Block (0,0) holds patches 0,1,4,5; block (0,1) holds 2,3,6,7.
        let order: Vec<usize> = (0..8).map(|r| to_patch(first_of_row(r))).collect();
        assert_eq!(order, vec![0, 1, 4, 5, 2, 3, 6, 7]);
        // Both temporal slots carry the same frame: columns c·512 + t·256 + ...
        assert_eq!(p.pixel_values[0], p.pixel_values[256]);
        assert_eq!(p.pixel_values[0], -1.0);
    }
}
