//! One self-contained HTML page of [`AttentionMaps`]: no network, no CDN, no external fonts; it opens from disk.
//! Views: head view (token-to-token links of one layer, heads selectable), model view (every layer × head as a
//! thumbnail, click to open), attention rollout and attention flow (texts up to [`FLOW_MAX_TOKENS`] tokens), and
//! the per-head summary.
//!
//! The weights travel as one byte each (`round(255·w)`), only for the heads asked for: 512 tokens × 12 layers ×
//! 12 heads is 38 MB of bytes (50 MB as base64), where JSON floats would be five times that.

use std::path::Path;

use rayon::prelude::*;
use serde_json::json;

use super::{AttentionMaps, FLOW_MAX_TOKENS};
use crate::Result;

/// What the page shows beside the maps.
#[derive(Clone, Debug, Default)]
pub struct PageOptions {
    pub title: String,
    /// One line under the title (the model directory, the text).
    pub subtitle: String,
    /// The layer the head view opens on (default 0).
    pub layer: Option<usize>,
    /// Only these heads, in this order (default: all). The rollout and the summary still use every head.
    pub heads: Option<Vec<usize>>,
    /// For a vision model: the image as it saw it, whose patches are tokens `first..` (the page then opens on an
    /// image view: each head's attention from a token, [CLS] or a clicked patch, over the picture).
    pub image: Option<PageImage>,
}

/// The picture behind a vision model's tokens.
#[derive(Clone, Debug, Default)]
pub struct PageImage {
    /// A PNG file's bytes (the page shows it from a data URL).
    pub png: Vec<u8>,
    /// Patches per column and per row: `(rows, cols)`, row-major after the first patch token.
    pub grid: (usize, usize),
    /// The token of the top-left patch (1 after a class token).
    pub first: usize,
}

const TEMPLATE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");

/// The page as a string.
pub fn page(maps: &AttentionMaps, opts: &PageOptions) -> Result<String> {
    maps.check_selection(opts.layer, opts.heads.as_deref())?;
    if let Some(im) = &opts.image {
        let (rows, cols) = im.grid;
        crate::ensure!(
            im.first + rows * cols <= maps.len(),
            "viz",
            "an image of {rows}x{cols} patches from token {} does not fit {} tokens",
            im.first,
            maps.len()
        );
    }
    let heads: Vec<usize> = opts.heads.clone().unwrap_or_else(|| (0..maps.num_heads()).collect());
    let t = maps.len();
    let pairs: Vec<(usize, usize)> = (0..maps.num_layers()).flat_map(|l| heads.iter().map(move |&h| (l, h))).collect();
    let mut weights = vec![0u8; pairs.len() * t * t];
    weights.par_chunks_mut(t * t).zip(&pairs).for_each(|(out, &(l, h))| {
        out.iter_mut().zip(maps.head(l, h)).for_each(|(q, &w)| *q = quantise(w));
    });
    // Rollout rows spread thinner with every layer: bytes relative to each row's largest entry keep them visible.
    let row_relative = |row: &[f32]| -> Vec<u8> {
        let max = row.iter().cloned().fold(0f32, f32::max);
        row.iter().map(|&w| if max > 0.0 { quantise(w / max) } else { 0 }).collect()
    };
    let relative = |m: &[f32]| -> Vec<u8> { m.chunks_exact(t).flat_map(row_relative).collect() };
    let roll = maps.rollout()?;
    let rollout: Vec<u8> = roll.par_iter().flat_map_iter(|m| relative(m)).collect();
    // Flow costs a max-flow per pair of positions: only for short texts.
    let flow = if t <= FLOW_MAX_TOKENS { relative(&maps.flow()?) } else { vec![] };
    // A vision page shades each query's row over the patches relative to that row's largest patch weight: with
    // ~200 tokens a typical weight of 0.005 would be a single level of 255.
    let patches: Vec<u8> = match &opts.image {
        None => vec![],
        Some(im) => {
            let (first, n) = (im.first, im.grid.0 * im.grid.1);
            let rows_of = |m: &[f32]| -> Vec<u8> {
                m.chunks_exact(t).flat_map(|row| row_relative(&row[first..first + n])).collect()
            };
            let mut out: Vec<u8> = pairs.par_iter().flat_map_iter(|&(l, h)| rows_of(maps.head(l, h))).collect();
            out.extend(roll.iter().flat_map(|m| rows_of(m)));
            out
        }
    };
    let s = maps.summary();
    // The small fields as JSON ("</" escaped: it would end the <script> early, and a token may well be "</s>"); the
    // two byte blobs as base64 in elements of their own, so the page never parses 50 MB of JSON.
    let small = json!({
        "tokens": maps.tokens,
        "special": maps.special,
        "causal": maps.causal,
        "layers": maps.num_layers(),
        "heads": heads,
        "layer": opts.layer.unwrap_or(0),
        "flowMaxTokens": FLOW_MAX_TOKENS,
        "summary": { "entropy": s.entropy, "distance": s.distance, "special": s.special },
        "image": opts.image.as_ref().map(|im| json!({
            "src": format!("data:image/png;base64,{}", base64(&im.png)),
            "grid": [im.grid.0, im.grid.1],
            "first": im.first,
        })),
    })
    .to_string()
    .replace("</", "<\\/");
    let (weights, (rollout, flow)) = rayon::join(|| base64(&weights), || (base64(&rollout), base64(&flow)));
    let patches = base64(&patches);
    fill(
        TEMPLATE,
        &[
            ("{{TITLE}}", &escape(&opts.title)),
            ("{{SUBTITLE}}", &escape(&opts.subtitle)),
            ("{{SCRIPT}}", SCRIPT),
            ("{{DATA}}", &small),
            ("{{WEIGHTS}}", &weights),
            ("{{ROLLOUT}}", &rollout),
            ("{{FLOW}}", &flow),
            ("{{PATCHES}}", &patches),
        ],
    )
}

/// The template with each placeholder replaced once, in one pass (the data is tens of MB: no whole-page copies).
fn fill(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let Some((key, value)) = values.iter().find(|(k, _)| rest[at..].starts_with(k)) else {
            crate::bail!(
                "viz",
                "the page template has an unknown placeholder at {:?}",
                &rest[at..at + 12.min(rest.len() - at)]
            )
        };
        out.push_str(value);
        rest = &rest[at + key.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Writes the page atomically (a temporary file beside `path`, then a rename).
pub fn write(path: &Path, maps: &AttentionMaps, opts: &PageOptions) -> Result<()> {
    crate::checkpoint::write_atomic(path, page(maps, opts)?.as_bytes())
}

fn quantise(w: f32) -> u8 {
    (w.clamp(0.0, 1.0) * 255.0).round() as u8
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Standard base64 with padding (what the page's decoder and data URLs read), in parallel over 3 MB pieces (whole 3-byte groups,
/// so the pieces concatenate).
pub fn base64(bytes: &[u8]) -> String {
    const PIECE: usize = 3 << 20;
    if bytes.len() > PIECE {
        return bytes.par_chunks(PIECE).map(base64_serial).collect::<Vec<_>>().concat();
    }
    base64_serial(bytes)
}

fn base64_serial(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            out.push(if k <= c.len() { A[(n >> (18 - 6 * k)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, enc) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(super::base64(raw.as_bytes()), enc, "{raw:?}");
        }
    }
}
