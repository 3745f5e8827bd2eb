//! Static pictures for papers and READMEs: a scene of filled rectangles and text, written as SVG or PNG. Text is drawn
//! from the embedded DejaVu Sans (assets/, Bitstream Vera licence): glyph outlines become SVG paths and are rasterised
//! for PNG, so a picture looks the same everywhere and needs no system font.

use std::path::Path;

use ab_glyph::{point, Font, FontRef, OutlineCurve, PxScale, ScaleFont};
use anyhow::{anyhow, Context, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn font() -> FontRef<'static> {
    FontRef::try_from_slice(FONT).expect("the embedded font parses")
}

pub type Rgb = [u8; 3];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    Start,
    End,
}

#[derive(Clone, Debug)]
enum Item {
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        fill: Rgb,
    },
    /// An RGB raster (`(ph, pw, 3)` bytes) stretched over `w × h` pixels at `(x, y)`, nearest neighbour.
    Image {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        pw: usize,
        ph: usize,
        rgb: Vec<u8>,
        /// The same pixels as a PNG file, for the SVG.
        png: Vec<u8>,
    },
    /// Baseline at `y`; `up`: rotated 90° counter-clockwise (reads bottom to top), anchored at `(x, y)`.
    Text {
        x: f32,
        y: f32,
        size: f32,
        text: String,
        fill: Rgb,
        anchor: Anchor,
        up: bool,
    },
}

/// A white canvas of `width × height` pixels and what is drawn on it, in order.
#[derive(Clone, Debug)]
pub struct Picture {
    width: u32,
    height: u32,
    items: Vec<Item>,
}

impl Picture {
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height, items: vec![] }
    }

    pub fn rect(&mut self, x: f32, y: f32, w: f32, h: f32, fill: Rgb) {
        self.items.push(Item::Rect { x, y, w, h, fill });
    }

    /// A raster of `pw × ph` RGB pixels (row-major bytes) drawn over `w × h` pixels at `(x, y)`, each pixel a block.
    pub fn image(&mut self, x: f32, y: f32, w: f32, h: f32, (pw, ph): (usize, usize), rgb: Vec<u8>) -> Result<()> {
        if rgb.len() != pw * ph * 3 || pw == 0 || ph == 0 {
            return Err(anyhow!("picture: an image of {pw}x{ph} pixels with {} bytes", rgb.len()));
        }
        let png = encode_png(pw, ph, &rgb)?;
        self.items.push(Item::Image { x, y, w, h, pw, ph, rgb, png });
        Ok(())
    }

    /// Text with its baseline at `y`, starting (or ending, with [`Anchor::End`]) at `x`.
    pub fn text(&mut self, x: f32, y: f32, size: f32, text: &str, fill: Rgb, anchor: Anchor) {
        self.items.push(Item::Text { x, y, size, text: text.into(), fill, anchor, up: false });
    }

    /// Text reading upwards, its baseline on the vertical line `x`, starting (or ending) at `y`.
    pub fn text_up(&mut self, x: f32, y: f32, size: f32, text: &str, fill: Rgb, anchor: Anchor) {
        self.items.push(Item::Text { x, y, size, text: text.into(), fill, anchor, up: true });
    }

    /// The width of `text` at `size` pixels.
    pub fn text_width(size: f32, text: &str) -> f32 {
        glyphs(size, text).last().map_or(0.0, |g| g.1 + g.2)
    }

    pub fn to_svg(&self) -> String {
        let f = font();
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
             <rect width=\"{w}\" height=\"{h}\" fill=\"#ffffff\"/>\n",
            w = self.width,
            h = self.height
        );
        let hex = |c: Rgb| format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2]);
        for item in &self.items {
            match item {
                Item::Rect { x, y, w, h, fill } => {
                    s += &format!("<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"{}\"/>\n", hex(*fill))
                }
                Item::Image { x, y, w, h, png, .. } => {
                    // Embedded as a PNG data URL, drawn with hard pixel edges as the PNG output draws it.
                    s += &format!(
                        "<image x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" preserveAspectRatio=\"none\" \
                         style=\"image-rendering:pixelated\" href=\"data:image/png;base64,{}\"/>\n",
                        attend::viz::html::base64(png)
                    )
                }
                Item::Text { x, y, size, text, fill, anchor, up } => {
                    let scaled = f.as_scaled(PxScale::from(*size));
                    let (sx, sy) = (scaled.h_scale_factor(), scaled.v_scale_factor());
                    let shift = if *anchor == Anchor::End { -Self::text_width(*size, text) } else { 0.0 };
                    let mut d = String::new();
                    for (id, gx, _) in glyphs(*size, text) {
                        let Some(outline) = f.outline(id) else { continue };
                        // Font units, y up → pixels along the baseline, y down.
                        let p = |q: ab_glyph::Point| (shift + gx + q.x * sx, -q.y * sy);
                        let mut last = None;
                        for c in &outline.curves {
                            let (start, seg) = match c {
                                OutlineCurve::Line(a, b) => {
                                    let b = p(*b);
                                    (*a, format!("L{:.2} {:.2}", b.0, b.1))
                                }
                                OutlineCurve::Quad(a, b, c) => {
                                    let (b, c) = (p(*b), p(*c));
                                    (*a, format!("Q{:.2} {:.2} {:.2} {:.2}", b.0, b.1, c.0, c.1))
                                }
                                OutlineCurve::Cubic(a, b, c, e) => {
                                    let (b, c, e) = (p(*b), p(*c), p(*e));
                                    (*a, format!("C{:.2} {:.2} {:.2} {:.2} {:.2} {:.2}", b.0, b.1, c.0, c.1, e.0, e.1))
                                }
                            };
                            if last != Some(start) {
                                let a = p(start);
                                d += &format!("M{:.2} {:.2}", a.0, a.1);
                            }
                            d += &seg;
                            last = Some(match c {
                                OutlineCurve::Line(_, b)
                                | OutlineCurve::Quad(_, _, b)
                                | OutlineCurve::Cubic(_, _, _, b) => *b,
                            });
                        }
                    }
                    let rot = if *up { " rotate(-90)" } else { "" };
                    s += &format!("<path transform=\"translate({x} {y}){rot}\" fill=\"{}\" d=\"{d}\"/>\n", hex(*fill));
                }
            }
        }
        s + "</svg>\n"
    }

    pub fn to_png(&self) -> Result<Vec<u8>> {
        let (w, h) = (self.width as usize, self.height as usize);
        let mut px = vec![255u8; w * h * 3];
        let mut blend = |x: i64, y: i64, c: Rgb, a: f32| {
            if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && a > 0.0 {
                let i = (y as usize * w + x as usize) * 3;
                for k in 0..3 {
                    px[i + k] = (px[i + k] as f32 * (1.0 - a) + c[k] as f32 * a).round() as u8;
                }
            }
        };
        let f = font();
        for item in &self.items {
            match item {
                Item::Rect { x, y, w: rw, h: rh, fill } => {
                    let (x0, y0) = (x.round() as i64, y.round() as i64);
                    let (x1, y1) = ((x + rw).round() as i64, (y + rh).round() as i64);
                    for yy in y0..y1 {
                        for xx in x0..x1 {
                            blend(xx, yy, *fill, 1.0);
                        }
                    }
                }
                Item::Image { x, y, w: iw, h: ih, pw, ph, rgb, .. } => {
                    let (x0, y0) = (x.round() as i64, y.round() as i64);
                    let (x1, y1) = ((x + iw).round() as i64, (y + ih).round() as i64);
                    for yy in y0..y1 {
                        let sy = (((yy - y0) as f32 + 0.5) / ih * *ph as f32) as usize;
                        for xx in x0..x1 {
                            let sx = (((xx - x0) as f32 + 0.5) / iw * *pw as f32) as usize;
                            let i = (sy.min(ph - 1) * pw + sx.min(pw - 1)) * 3;
                            blend(xx, yy, [rgb[i], rgb[i + 1], rgb[i + 2]], 1.0);
                        }
                    }
                }
                Item::Text { x, y, size, text, fill, anchor, up } => {
                    let shift = if *anchor == Anchor::End { -Self::text_width(*size, text) } else { 0.0 };
                    for (id, gx, _) in glyphs(*size, text) {
                        // Laid out along a baseline at the origin, then placed: upright or turned a quarter.
                        let g = id.with_scale_and_position(PxScale::from(*size), point(shift + gx, 0.0));
                        let Some(og) = f.outline_glyph(g) else { continue };
                        let b = og.px_bounds();
                        og.draw(|gx, gy, cov| {
                            let (u, v) = (b.min.x + gx as f32, b.min.y + gy as f32);
                            let (px_, py_) = if *up { (x + v, y - u) } else { (x + u, y + v) };
                            blend(px_.floor() as i64, py_.floor() as i64, *fill, cov.min(1.0));
                        });
                    }
                }
            }
        }
        encode_png(w, h, &px)
    }

    /// Writes SVG or PNG (by `png`) atomically.
    pub fn write(&self, path: &Path, png: bool) -> Result<()> {
        let bytes = if png { self.to_png()? } else { self.to_svg().into_bytes() };
        attend::checkpoint::write_atomic(path, &bytes).with_context(|| format!("{}: cannot write", path.display()))
    }
}

/// The colour of a weight in `[0, 1]` in every attention picture: white for 0 to a dark blue for 1.
pub fn weight_shade(a: f32) -> Rgb {
    const BLUE: [f32; 3] = [49.0, 54.0, 149.0];
    BLUE.map(|b| (255.0 - a.clamp(0.0, 1.0) * (255.0 - b)).round() as u8)
}

/// The scale of [`weight_shade`] from 0 to 1 at `(x, y)`, followed by `label`.
pub fn weight_scale(pic: &mut Picture, x: f32, y: f32, label: &str) {
    const INK: Rgb = [34, 34, 34];
    for k in 0..100 {
        pic.rect(x + 14.0 + k as f32, y, 1.0, 10.0, weight_shade(k as f32 / 99.0));
    }
    pic.text(x, y + 9.0, 11.0, "0", INK, Anchor::Start);
    pic.text(x + 118.0, y + 9.0, 11.0, &format!("1  {label}"), INK, Anchor::Start);
}

/// A PNG file of `width × height` RGB pixels.
pub fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| anyhow!("PNG: {e}"))?;
        wr.write_image_data(rgb).map_err(|e| anyhow!("PNG: {e}"))?;
    }
    Ok(out)
}

/// `(glyph, x offset, advance)` of each character of `text` at `size` pixels, kerned.
fn glyphs(size: f32, text: &str) -> Vec<(ab_glyph::GlyphId, f32, f32)> {
    let f = font();
    let scaled = f.as_scaled(PxScale::from(size));
    let mut x = 0.0;
    let mut prev = None;
    text.chars()
        .map(|c| {
            let id = scaled.glyph_id(c);
            if let Some(p) = prev {
                x += scaled.kern(p, id);
            }
            prev = Some(id);
            let at = x;
            x += scaled.h_advance(id);
            (id, at, scaled.h_advance(id))
        })
        .collect()
}
