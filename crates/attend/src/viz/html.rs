//! One self-contained HTML page of [`AttentionMaps`]: no network, no CDN, no external fonts; it opens from disk.
//! Views: head view (token-to-token links of one layer, heads selectable), model view (every layer × head as a
//! thumbnail, click to open), attention rollout, and the per-head summary.
//!
//! The weights travel as one byte each (`round(255·w)`), only for the heads asked for: 512 tokens × 12 layers ×
//! 12 heads is 38 MB of bytes (50 MB as base64), where JSON floats would be five times that.

use std::path::Path;

use serde_json::json;

use super::AttentionMaps;
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
}

const TEMPLATE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");

/// The page as a string.
pub fn page(maps: &AttentionMaps, opts: &PageOptions) -> Result<String> {
    maps.check_selection(opts.layer, opts.heads.as_deref())?;
    let heads: Vec<usize> = opts.heads.clone().unwrap_or_else(|| (0..maps.num_heads()).collect());
    let t = maps.len();
    let mut weights = Vec::with_capacity(maps.num_layers() * heads.len() * t * t);
    for l in 0..maps.num_layers() {
        for &h in &heads {
            weights.extend(maps.head(l, h).iter().map(|&w| quantise(w)));
        }
    }
    // Rollout rows spread thinner with every layer: bytes relative to each row's largest entry keep them visible.
    let mut rollout = Vec::with_capacity(maps.num_layers() * t * t);
    for m in maps.rollout() {
        for row in m.chunks_exact(t) {
            let max = row.iter().cloned().fold(0f32, f32::max);
            rollout.extend(row.iter().map(|&w| if max > 0.0 { quantise(w / max) } else { 0 }));
        }
    }
    let s = maps.summary();
    let data = json!({
        "tokens": maps.tokens,
        "special": maps.special,
        "causal": maps.causal,
        "layers": maps.num_layers(),
        "heads": heads,
        "layer": opts.layer.unwrap_or(0),
        "weights": base64(&weights),
        "rollout": base64(&rollout),
        "summary": { "entropy": s.entropy, "distance": s.distance, "special": s.special },
    });
    // Inside <script>, "</" would end the element early (a token may well be "</s>").
    let data = data.to_string().replace("</", "<\\/");
    Ok(TEMPLATE
        .replace("{{TITLE}}", &escape(&opts.title))
        .replace("{{SUBTITLE}}", &escape(&opts.subtitle))
        .replace("{{SCRIPT}}", SCRIPT)
        .replace("{{DATA}}", &data))
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

/// Standard base64 with padding (what the page's `atob` reads).
fn base64(bytes: &[u8]) -> String {
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
