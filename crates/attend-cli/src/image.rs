//! Images for vision models: PNG and JPEG files decoded to 8-bit RGB, and the preprocessing of a Hugging Face image
//! processor (`preprocessor_config.json`): resize as PIL does (separable bilinear or bicubic with its antialiasing
//! support when shrinking, rounded to 8 bits after each pass), rescale, normalise. Checked against
//! `ViTImageProcessor` in `tests/viz.rs` (fixtures from `scripts/oracle/viz.py`).
//!
//! # Shapes
//! - [`Rgb8::data`]: `(height, width, 3)` row-major bytes
//! - [`Preprocess::pixel_values`]: `(1, 3, height, width)` f32, as `pixel_values` of Hugging Face

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Reads a PNG (any bit depth or colour type: palettes expanded, 16 bits cut to 8, alpha dropped as PIL's
/// `convert("RGB")` drops it) or a JPEG, by its first bytes rather than its name.
pub fn load(path: &Path) -> Result<Rgb8> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read the image", path.display()))?;
    let what = |e: String| anyhow!("{}: not a readable image: {e}", path.display());
    if bytes.starts_with(b"\x89PNG") {
        // The crate's default cap (64 MiB decoded) would refuse an ordinary 24-megapixel photo.
        let limits = png::Limits { bytes: 1 << 30 };
        let mut dec = png::Decoder::new_with_limits(std::io::Cursor::new(&bytes), limits);
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().map_err(|e| what(e.to_string()))?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).map_err(|e| what(e.to_string()))?;
        let (width, height) = (info.width as usize, info.height as usize);
        let px = &buf[..info.buffer_size()];
        let data = match info.color_type {
            png::ColorType::Rgb => px.to_vec(),
            png::ColorType::Rgba => px.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
            png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
            png::ColorType::GrayscaleAlpha => px.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
            other => return Err(what(format!("unexpected colour type {other:?} after expansion"))),
        };
        return Ok(Rgb8 { width, height, data });
    }
    if bytes.starts_with(&[0xFF, 0xD8]) {
        use zune_jpeg::zune_core::{colorspace::ColorSpace, options::DecoderOptions};
        let opts = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut dec = zune_jpeg::JpegDecoder::new_with_options(&bytes[..], opts);
        let data = dec.decode().map_err(|e| what(format!("{e:?}")))?;
        let (width, height) = dec.dimensions().ok_or_else(|| what("no dimensions".into()))?;
        if data.len() != width * height * 3 {
            return Err(what(format!("{} bytes decoded for {width}x{height} RGB", data.len())));
        }
        return Ok(Rgb8 { width, height, data });
    }
    bail!("{}: not a PNG or JPEG file (attend reads those two image formats)", path.display())
}

/// PIL's resampling filters that image processors name (`resample`: 2 bilinear, 3 bicubic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear if x < 1.0 => 1.0 - x,
            // PIL's cubic with a = −0.5.
            Filter::Bicubic if x < 1.0 => (1.5 * x - 2.5) * x * x + 1.0,
            Filter::Bicubic if x < 2.0 => ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0,
            _ => 0.0,
        }
    }
}

/// For each output position along an axis of `n_in → n_out`: the first input index and the normalised weights, as
/// PIL computes them (the filter widened by the shrink factor, so shrinking averages rather than samples).
fn coefficients(n_in: usize, n_out: usize, f: Filter) -> Vec<(usize, Vec<f64>)> {
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = f.support() * fscale;
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // `as i64` truncates toward zero, as PIL's (int) cast does.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = (((center + support + 0.5) as i64).max(0) as usize).min(n_in);
            let mut w: Vec<f64> = (lo..hi).map(|x| f.weight((x as f64 - center + 0.5) / fscale)).collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, w)
        })
        .collect()
}

/// Resizes to `width × height`: rows first, then columns, each pass rounded to 8 bits (PIL resizes 8-bit images
/// in two such passes).
pub fn resize(img: &Rgb8, width: usize, height: usize, f: Filter) -> Rgb8 {
    let round = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    let mut mid = img.clone();
    if width != img.width {
        let cx = coefficients(img.width, width, f);
        let mut data = vec![0u8; img.height * width * 3];
        for y in 0..img.height {
            for (x, (lo, w)) in cx.iter().enumerate() {
                for ch in 0..3 {
                    let s: f64 = w
                        .iter()
                        .enumerate()
                        .map(|(k, wk)| wk * img.data[(y * img.width + lo + k) * 3 + ch] as f64)
                        .sum();
                    data[(y * width + x) * 3 + ch] = round(s);
                }
            }
        }
        mid = Rgb8 { width, height: img.height, data };
    }
    if height == mid.height {
        return mid;
    }
    let cy = coefficients(mid.height, height, f);
    let mut data = vec![0u8; height * width * 3];
    for (y, (lo, w)) in cy.iter().enumerate() {
        for x in 0..width {
            for ch in 0..3 {
                let s: f64 =
                    w.iter().enumerate().map(|(k, wk)| wk * mid.data[((lo + k) * width + x) * 3 + ch] as f64).sum();
                data[(y * width + x) * 3 + ch] = round(s);
            }
        }
    }
    Rgb8 { width, height, data }
}

/// What a Hugging Face image processor does to an image before the model sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// `(width, height)` to resize to, or `None` to keep the image's own size.
    pub size: Option<(usize, usize)>,
    pub filter: Filter,
    pub rescale: Option<f32>,
    /// `(mean, std)` per channel.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Preprocess {
    /// From `DIR/preprocessor_config.json` when the directory has one; otherwise `ViTImageProcessor`'s defaults at
    /// the model's `image_size` (bilinear resize, rescale by 1/255, mean and std 0.5).
    pub fn from_dir(dir: &Path, image_size: usize) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = Preprocess {
            size: Some((image_size, image_size)),
            filter: Filter::Bilinear,
            rescale: Some(1.0 / 255.0),
            normalize: Some(([0.5; 3], [0.5; 3])),
        };
        if !path.exists() {
            return Ok(p);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
        let field = |name: &str| v.get(name).filter(|x| !x.is_null());
        let bad = |name: &str, want: &str| anyhow!("{}: `{name}` must be {want}", path.display());
        let flag = |name: &str| -> Result<bool> {
            field(name).map_or(Ok(true), |x| x.as_bool().ok_or_else(|| bad(name, "true or false")))
        };
        if !flag("do_resize")? {
            p.size = None;
        } else if let Some(s) = field("size") {
            let dim = |k: &str| s.get(k).and_then(Value::as_u64).map(|x| x as usize);
            p.size = Some(match (dim("width"), dim("height"), s.as_u64()) {
                (Some(w), Some(h), _) => (w, h),
                (_, _, Some(n)) => (n as usize, n as usize),
                _ => {
                    return Err(bad(
                        "size",
                        "{\"height\": H, \"width\": W} or a number (shortest-edge resizing is not supported)",
                    ))
                }
            });
        }
        if let Some(r) = field("resample") {
            p.filter = match r.as_u64() {
                Some(2) => Filter::Bilinear,
                Some(3) => Filter::Bicubic,
                _ => return Err(bad("resample", "2 (bilinear) or 3 (bicubic), the filters attend implements")),
            };
        }
        p.rescale = match flag("do_rescale")? {
            false => None,
            true => Some(field("rescale_factor").map_or(Ok(1.0 / 255.0), |x| {
                x.as_f64().map(|f| f as f32).ok_or_else(|| bad("rescale_factor", "a number"))
            })?),
        };
        let triple = |name: &str, default: f32| -> Result<[f32; 3]> {
            match field(name) {
                None => Ok([default; 3]),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(default as f64) as f32; 3]),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0) as f32))
                }
                Some(_) => Err(bad(name, "a number or three numbers")),
            }
        };
        p.normalize = match flag("do_normalize")? {
            false => None,
            true => {
                let std = triple("image_std", 0.5)?;
                if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
                    return Err(bad("image_std", "three finite numbers other than 0"));
                }
                Some((triple("image_mean", 0.5)?, std))
            }
        };
        if field("do_center_crop").and_then(Value::as_bool) == Some(true) {
            return Err(bad("do_center_crop", "false: attend does not crop (resize to the model's size instead)"));
        }
        Ok(p)
    }

    /// The image as the model sees it: resized (8-bit, for showing it) and as `pixel_values (1, 3, H, W)`.
    pub fn pixel_values(&self, img: &Rgb8, dev: &Device) -> Result<(Rgb8, Tensor)> {
        let img = match self.size {
            Some((w, h)) if (w, h) != (img.width, img.height) => resize(img, w, h, self.filter),
            _ => img.clone(),
        };
        let (w, h) = (img.width, img.height);
        let mut px = vec![0f32; 3 * h * w];
        for ch in 0..3 {
            for i in 0..h * w {
                let mut v = img.data[i * 3 + ch] as f32;
                if let Some(r) = self.rescale {
                    v *= r;
                }
                if let Some((mean, std)) = self.normalize {
                    v = (v - mean[ch]) / std[ch];
                }
                px[ch * h * w + i] = v;
            }
        }
        let t = Tensor::from_vec(px, (1, 3, h, w), dev)?;
        Ok((img, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    /// The largest difference between our pixel values of `image` and `ViTImageProcessor`'s (`key` of
    /// fixtures/viz/vit.safetensors, from scripts/oracle/viz.py).
    fn worst(image: &str, key: &str, filter: Filter) -> f32 {
        let dev = Device::Cpu;
        let want = candle_core::safetensors::load(fixtures().join("viz/vit.safetensors"), &dev).unwrap();
        let pre = Preprocess { filter, ..Preprocess::from_dir(&fixtures().join("hf/vit"), 16).unwrap() };
        let (shown, px) = pre.pixel_values(&load(&fixtures().join("viz").join(image)).unwrap(), &dev).unwrap();
        assert_eq!((shown.width, shown.height), (16, 16));
        assert_eq!(px.dims(), want[key].dims());
        (px - &want[key]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn pixel_values_match_vit_image_processor() {
        // Shrinking 40 × 24 → 16 × 16 bilinear and bicubic, enlarging 10 × 6 → 16 × 16. PIL rounds each resize pass to 8 bits in fixed point; we round in floating point: at most one level apart
        // (2/255 after normalising by a std of 0.5).
        for (image, key, filter) in [
            ("vit_image.png", "pixel_values", Filter::Bilinear),
            ("vit_image.png", "pixel_values_bicubic", Filter::Bicubic),
            ("vit_image_small.png", "pixel_values_small", Filter::Bilinear),
        ] {
            let d = worst(image, key, filter);
            assert!(d <= 2.0 / 255.0 + 1e-6, "{key}: {d}");
        }
        // Another JPEG decoder than PIL's libjpeg: a few levels apart at most.
        let jpeg = worst("vit_image.jpg", "pixel_values_jpeg", Filter::Bilinear);
        assert!(jpeg <= 4.0 / 255.0, "JPEG: {jpeg}");
    }

    #[test]
    fn a_large_photo_is_read() {
        // 4400 × 4000 RGBA is 70 MB decoded, past the png crate's default cap of 64 MiB.
        let (w, h) = (4400usize, 4000usize);
        let mut rgba = vec![0u8; w * h * 4];
        rgba[(7 * w + 9) * 4..][..4].copy_from_slice(&[10, 20, 30, 255]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big.png");
        {
            let f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
            let mut enc = png::Encoder::new(f, w as u32, h as u32);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header().unwrap().write_image_data(&rgba).unwrap();
        }
        let img = load(&path).unwrap();
        assert_eq!((img.width, img.height, img.data.len()), (w, h, w * h * 3));
        assert_eq!(&img.data[(7 * w + 9) * 3..][..3], &[10, 20, 30], "alpha dropped, colour kept");
    }

    #[test]
    fn pil_coefficients_sum_to_one_and_widen_when_shrinking() {
        for f in [Filter::Bilinear, Filter::Bicubic] {
            for (n_in, n_out) in [(40, 16), (24, 16), (16, 40), (7, 7), (1000, 3)] {
                for (lo, w) in coefficients(n_in, n_out, f) {
                    assert!(lo + w.len() <= n_in);
                    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{f:?} {n_in}→{n_out}");
                }
            }
        }
        // Shrinking 40 → 16 averages over a support of 2.5 input pixels each side; enlarging samples 2 pixels.
        assert_eq!(coefficients(40, 16, Filter::Bilinear)[8].1.len(), 5);
        assert!(coefficients(16, 40, Filter::Bilinear)[20].1.len() <= 3);
        // A flat image stays flat.
        let flat = Rgb8 { width: 9, height: 5, data: vec![77; 9 * 5 * 3] };
        assert!(resize(&flat, 4, 11, Filter::Bicubic).data.iter().all(|&v| v == 77));
    }

    #[test]
    fn bad_files_and_configs_are_one_line_errors_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        let text = tmp.path().join("notes.png");
        std::fs::write(&text, "not an image").unwrap();
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains("notes.png") && e.contains("not a PNG or JPEG"), "{e}");
        let e = load(&tmp.path().join("missing.jpg")).unwrap_err().to_string();
        assert!(e.contains("missing.jpg") && e.contains("cannot read"), "{e}");
        let broken = tmp.path().join("broken.png");
        std::fs::write(&broken, b"\x89PNG\r\n\x1a\n garbage").unwrap();
        let e = load(&broken).unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("not a readable image"), "{e}");
        for (cfg, field) in [
            (r#"{"resample": 0}"#, "resample"),
            (r#"{"size": {"shortest_edge": 224}}"#, "size"),
            (r#"{"image_mean": "grey"}"#, "image_mean"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
            (r#"{"image_std": [0.5, 0, 0.5]}"#, "image_std"),
            (r#"{"do_center_crop": true, "crop_size": 12}"#, "do_center_crop"),
            ("{", "not valid JSON"),
        ] {
            std::fs::write(tmp.path().join("preprocessor_config.json"), cfg).unwrap();
            let e = Preprocess::from_dir(tmp.path(), 16).unwrap_err().to_string();
            assert!(e.contains("preprocessor_config.json") && e.contains(field), "{cfg}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // No file: ViTImageProcessor's defaults at the model's size.
        std::fs::remove_file(tmp.path().join("preprocessor_config.json")).unwrap();
        let p = Preprocess::from_dir(tmp.path(), 32).unwrap();
        assert_eq!((p.size, p.filter, p.rescale), (Some((32, 32)), Filter::Bilinear, Some(1.0 / 255.0)));
    }
}
