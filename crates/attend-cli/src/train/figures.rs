//! What a training run draws: alignment heatmaps of held-out examples and the loss curve, each as PNG and SVG.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::picture::{weight_scale, weight_shade, Anchor, Picture, Rgb};

const INK: Rgb = [34, 34, 34];
const GREY: Rgb = [200, 200, 200];

/// One attention matrix `(rows, cols)` with its labels.
pub struct Heatmap {
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    /// Row-major `rows × cols`.
    pub weights: Vec<f32>,
    pub shape: (usize, usize),
}

/// The panels side by side under a title, labels on both axes, and the weight scale.
pub fn heatmaps(title: &str, panels: &[Heatmap]) -> Picture {
    let longest = panels.iter().map(|p| p.shape.0.max(p.shape.1)).max().unwrap_or(1);
    let cell = (360.0 / longest as f32).clamp(6.0, 20.0);
    let size = (cell * 0.7).min(11.0);
    let margin = |labels: &[String]| labels.iter().map(|l| Picture::text_width(size, l)).fold(0.0, f32::max) + 6.0;
    let dims: Vec<(f32, f32, f32, f32)> = panels
        .iter()
        .map(|p| (margin(&p.rows), margin(&p.cols), cell * p.shape.1 as f32, cell * p.shape.0 as f32))
        .collect();
    let width = 16.0 + dims.iter().map(|d| d.0 + d.2 + 24.0).sum::<f32>();
    let height = 40.0 + dims.iter().map(|d| d.1 + d.3).fold(0.0, f32::max) + 40.0;
    let mut pic = Picture::new(width.max(480.0).ceil() as u32, height.ceil() as u32);
    pic.text(16.0, 22.0, 13.0, title, INK, Anchor::Start);
    let mut ox = 16.0;
    for (p, &(mx, my, w, _)) in panels.iter().zip(&dims) {
        let (x0, y0) = (ox + mx, 36.0 + my);
        let (r, c) = p.shape;
        for i in 0..r {
            for j in 0..c {
                pic.rect(x0 + j as f32 * cell, y0 + i as f32 * cell, cell, cell, weight_shade(p.weights[i * c + j]));
            }
        }
        for (i, l) in p.rows.iter().enumerate() {
            pic.text(x0 - 4.0, y0 + i as f32 * cell + cell / 2.0 + size * 0.35, size, l, INK, Anchor::End);
        }
        for (j, l) in p.cols.iter().enumerate() {
            pic.text_up(x0 + j as f32 * cell + cell / 2.0 + size * 0.35, y0 - 4.0, size, l, INK, Anchor::Start);
        }
        ox += mx + w + 24.0;
    }
    weight_scale(&mut pic, 16.0, height - 22.0, "attention weight");
    pic
}

/// Curves `(label, colour, [(step, value)])` on one pair of axes (log scale when the values span over a decade).
pub fn curves(title: &str, y_label: &str, series: &[(String, Rgb, Vec<(f64, f64)>)]) -> Picture {
    let (w, h) = (640.0f32, 360.0f32);
    let (left, right, top, bottom) = (64.0f32, 16.0f32, 36.0f32, 48.0f32);
    let mut pic = Picture::new(w as u32, h as u32);
    pic.text(16.0, 22.0, 13.0, title, INK, Anchor::Start);
    let pts = series.iter().flat_map(|s| s.2.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.1.is_finite() && p.1 > 0.0) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return pic;
    }
    let log = y1 / y0 > 10.0;
    let fy = |y: f64| if log { y.ln() } else { y };
    let (ly0, ly1) = (fy(if log { y0 } else { 0.0f64.min(y0) }), fy(y1));
    let px = |x: f64| left + (w - left - right) * ((x - x0) / (x1 - x0).max(1e-12)) as f32;
    let py = |y: f64| top + (h - top - bottom) * (1.0 - ((fy(y) - ly0) / (ly1 - ly0).max(1e-12)) as f32);
    // Axes, with the ends of each labelled.
    pic.rect(left, top, 1.0, h - top - bottom, GREY);
    pic.rect(left, h - bottom, w - left - right, 1.0, GREY);
    pic.text(left - 4.0, top + 8.0, 10.0, &format!("{y1:.3}"), INK, Anchor::End);
    pic.text(left - 4.0, h - bottom, 10.0, &format!("{:.3}", if log { y0 } else { 0.0f64.min(y0) }), INK, Anchor::End);
    pic.text(left, h - bottom + 14.0, 10.0, &format!("{x0}"), INK, Anchor::Start);
    pic.text(w - right, h - bottom + 14.0, 10.0, &format!("{x1} steps"), INK, Anchor::End);
    pic.text_up(
        16.0,
        h - bottom,
        11.0,
        &format!("{y_label}{}", if log { " (log scale)" } else { "" }),
        INK,
        Anchor::Start,
    );
    for (k, (label, colour, pts)) in series.iter().enumerate() {
        // Line segments as runs of 2-pixel dots: the scene has rectangles and text only.
        for seg in pts.windows(2) {
            let ((xa, ya), (xb, yb)) = ((px(seg[0].0), py(seg[0].1)), (px(seg[1].0), py(seg[1].1)));
            let n = ((xb - xa).abs().max((yb - ya).abs()) as usize).max(1);
            for i in 0..=n {
                let t = i as f32 / n as f32;
                pic.rect(xa + t * (xb - xa) - 1.0, ya + t * (yb - ya) - 1.0, 2.0, 2.0, *colour);
            }
        }
        let ly = h - 18.0;
        let lx = left + k as f32 * 180.0;
        pic.rect(lx, ly - 6.0, 14.0, 3.0, *colour);
        pic.text(lx + 20.0, ly, 11.0, label, INK, Anchor::Start);
    }
    pic
}

/// Writes `stem.png` and `stem.svg`.
pub fn write_both(pic: &Picture, stem: &Path) -> Result<Vec<PathBuf>> {
    let (png, svg) = (stem.with_extension("png"), stem.with_extension("svg"));
    pic.write(&png, true)?;
    pic.write(&svg, false)?;
    Ok(vec![png, svg])
}
