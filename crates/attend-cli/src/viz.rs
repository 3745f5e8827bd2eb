//! `attend viz --model DIR (--text TEXT [--pair TEXT] | --source TEXT | --image FILE | --node N | --user U)
//! [--layer L] [--heads 0,3] [--format html|png|svg] --out FILE`: what a model attends to, as one self-contained
//! page (`attend::viz::html`). The weights come from the model's normal forward (the fused kernel's weight side
//! channel), not from a second, slower path.
//!
//! Today: `--text` (and `--pair`) for Hugging Face GPT-2 and BERT-family (BERT, RoBERTa, DistilBERT) directories,
//! as HTML, or as static heatmaps of one layer's heads (`--format png|svg`); `--image` (PNG or JPEG, preprocessed as
//! the directory's `preprocessor_config.json` says) for ViT directories, as HTML with an image view, or as one
//! picture per head of a layer plus the rollout. Every other input and model is refused with a message that says
//! what works.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::hf::HfModel;
use attend::models::bert::BertInput;
use attend::models::gpt::GptInput;
use attend::viz::html::{self, PageImage, PageOptions};
use attend::viz::AttentionMaps;
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};

use crate::picture::{Anchor, Picture};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["text", "source", "image", "node", "user"]))]
pub struct VizArgs {
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The text to look at (Transformer-family models).
    #[arg(long)]
    text: Option<String>,
    /// A second text, for models that read pairs (BERT's segment B).
    #[arg(long, requires = "text")]
    pair: Option<String>,
    /// A source sentence for a sequence-to-sequence model (its alignment while it translates).
    #[arg(long)]
    source: Option<String>,
    /// An image for a vision model.
    #[arg(long)]
    image: Option<PathBuf>,
    /// A node of a graph model.
    #[arg(long)]
    node: Option<u64>,
    /// A user of a recommender.
    #[arg(long)]
    user: Option<u64>,
    /// The layer the page opens on.
    #[arg(long)]
    layer: Option<usize>,
    /// Only these heads, comma-separated (the page stays smaller).
    #[arg(long)]
    heads: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Html)]
    format: Format,
    /// Where to write the page or picture.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Html,
    Png,
    Svg,
}

pub fn run(args: VizArgs) -> Result<()> {
    if let Some(image) = &args.image {
        return image_view(&args, image);
    }
    let Some(text) = &args.text else {
        let which = if args.source.is_some() {
            "--source (sequence-to-sequence alignments)"
        } else if args.node.is_some() {
            "--node (graph attention)"
        } else {
            "--user (recommender attention)"
        };
        bail!("{which} is not supported yet; attend viz shows --text [--pair] for GPT-2 and BERT-family models");
    };
    let heads = heads_arg(&args)?;
    let (dir, model) = crate::hf::open(&args.model)?;
    let unsupported = || {
        anyhow!(
            "{}: attend viz --text shows GPT-2 and BERT-family models; a {} checkpoint is not supported yet",
            args.model.display(),
            dir.model_type()
        )
    };
    // Refused before tokenising: a directory we cannot show may well have no tokenizer either.
    if matches!(model, HfModel::Vit(_)) {
        bail!("{}: a vit checkpoint reads images: use --image FILE instead of --text", args.model.display());
    }
    if !matches!(model, HfModel::Gpt2(_) | HfModel::Bert(_)) {
        return Err(unsupported());
    }
    let tok = crate::hf::tokenizer(&args.model)?
        .ok_or_else(|| anyhow!("{}: no tokenizer.json, so the text cannot be tokenised", args.model.display()))?;
    let enc = match &args.pair {
        Some(p) => tok.encode((text.as_str(), p.as_str()), true),
        None => tok.encode(text.as_str(), true),
    }
    .map_err(|e| anyhow!("{}: cannot tokenise the text: {e}", args.model.display()))?;
    let t = enc.get_ids().len();
    if t == 0 {
        bail!("the text gives no tokens: nothing to show");
    }
    let dev = Device::Cpu;
    let ids = Tensor::from_vec(enc.get_ids().to_vec(), (1, t), &dev)?;
    let types = Tensor::from_vec(enc.get_type_ids().to_vec(), (1, t), &dev)?;
    let too_long = |ctx: usize, field: &str| -> Result<()> {
        if t > ctx {
            bail!(
                "the text is {t} tokens, longer than the model's context of {ctx} ({field} in {}/config.json)",
                args.model.display()
            );
        }
        Ok(())
    };
    let err = |e: attend::Error| anyhow!("{}: {}", args.model.display(), crate::errors::attend(&e));
    let (weights, causal) = match &model {
        HfModel::Gpt2(m) => {
            if args.pair.is_some() {
                bail!("a gpt2 checkpoint reads one text: drop --pair");
            }
            too_long(m.config.n_positions, "n_positions")?;
            let input = GptInput { need_weights: true, ..GptInput::new(&ids) };
            (m.model.hidden_states(&input, None).map_err(err)?.weights, true)
        }
        HfModel::Bert(m) => {
            too_long(m.config.max_position_embeddings, "max_position_embeddings")?;
            let input = BertInput { token_type_ids: Some(&types), need_weights: true, ..BertInput::new(&ids) };
            (m.model.bert().forward(&input).map_err(err)?.weights, false)
        }
        _ => return Err(unsupported()),
    };
    // Each token as it reads in the text (byte-level BPE's "Ġquick" is " quick"); the raw piece if it decodes empty.
    let tokens: Vec<String> = enc
        .get_ids()
        .iter()
        .zip(enc.get_tokens())
        .map(|(&id, raw)| match tok.decode(&[id], false) {
            Ok(s) if !s.is_empty() => s,
            _ => raw.clone(),
        })
        .collect();
    let special = enc.get_special_tokens_mask().iter().map(|&m| m != 0).collect();
    let maps = AttentionMaps::new(tokens, special, &weights, causal).map_err(err)?;
    let opts = PageOptions {
        title: format!("attend viz: {}", args.model.file_name().map_or("model".into(), |n| n.to_string_lossy())),
        subtitle: format!(
            "{} · {} tokens · {} layers × {} heads{}",
            dir.model_type(),
            t,
            maps.num_layers(),
            maps.num_heads(),
            if causal { " · causal" } else { "" }
        ),
        layer: args.layer,
        heads,
        image: None,
    };
    match args.format {
        Format::Html => html::write(&args.out, &maps, &opts).map_err(err),
        Format::Png | Format::Svg => {
            maps.check_selection(opts.layer, opts.heads.as_deref()).map_err(err)?;
            let heads = opts.heads.unwrap_or_else(|| (0..maps.num_heads()).collect());
            heatmaps(&maps, opts.layer.unwrap_or(0), &heads).write(&args.out, args.format == Format::Png)
        }
    }
}

fn heads_arg(args: &VizArgs) -> Result<Option<Vec<usize>>> {
    args.heads
        .as_deref()
        .map(|h| crate::hf::parse_ids("--heads", h).map(|v| v.into_iter().map(|x| x as usize).collect::<Vec<_>>()))
        .transpose()
}

/// `--image`: a ViT's attention over the patches of a picture, from [CLS] (and, in the page, from any patch).
fn image_view(args: &VizArgs, path: &std::path::Path) -> Result<()> {
    let heads = heads_arg(args)?;
    let (dir, model) = crate::hf::open(&args.model)?;
    let HfModel::Vit(m) = &model else {
        bail!(
            "{}: --image shows vision models (vit); a {} checkpoint reads text: use --text",
            args.model.display(),
            dir.model_type()
        );
    };
    let err = |e: attend::Error| anyhow!("{}: {}", args.model.display(), crate::errors::attend(&e));
    let (side, patch) = (m.config.image_size, m.config.patch_size);
    let img = crate::image::load(path)?;
    let pre = crate::image::Preprocess::from_dir(&args.model, side)?;
    let dev = Device::Cpu;
    let (shown, px) = pre.pixel_values(&img, &dev)?;
    if (shown.width, shown.height) != (side, side) {
        bail!(
            "{}: the image is {}x{} after preprocessing, but the model takes {side}x{side} (image_size in {}/config.json); \
             resize it, or let preprocessor_config.json resize it (do_resize, size)",
            path.display(),
            shown.width,
            shown.height,
            args.model.display()
        );
    }
    let weights = m.model.forward(&px, true).map_err(err)?.weights;
    let g = side / patch;
    let tokens: Vec<String> =
        std::iter::once("[CLS]".to_string()).chain((0..g * g).map(|p| format!("({},{})", p / g, p % g))).collect();
    let special = (0..tokens.len()).map(|i| i == 0).collect();
    let maps = AttentionMaps::new(tokens, special, &weights, false).map_err(err)?;
    let name = |p: &std::path::Path| p.file_name().map_or("?".into(), |n| n.to_string_lossy().into_owned());
    let opts = PageOptions {
        title: format!("attend viz: {} on {}", name(&args.model), name(path)),
        subtitle: format!(
            "{} · {}x{} image, {}x{} patches + [CLS] · {} layers × {} heads",
            dir.model_type(),
            side,
            side,
            g,
            g,
            maps.num_layers(),
            maps.num_heads()
        ),
        layer: args.layer,
        heads,
        image: Some(PageImage {
            png: crate::picture::encode_png(shown.width, shown.height, &shown.data)?,
            grid: (g, g),
            first: 1,
        }),
    };
    match args.format {
        Format::Html => html::write(&args.out, &maps, &opts).map_err(err),
        Format::Png | Format::Svg => {
            maps.check_selection(opts.layer, opts.heads.as_deref()).map_err(err)?;
            let heads = opts.heads.unwrap_or_else(|| (0..maps.num_heads()).collect());
            let pic = patch_panels(&maps, opts.layer.unwrap_or(0), &heads, &shown, g)?;
            pic.write(&args.out, args.format == Format::Png)
        }
    }
}

/// The picture darkened where a weight is low: alpha `0.8·(1 − w/max)` of black over each patch (the page's image
/// view does the same), `w` one per patch, row-major over a `g × g` grid.
pub fn shade_patches(img: &crate::image::Rgb8, g: usize, w: &[f32]) -> Vec<u8> {
    let max = w.iter().cloned().fold(0f32, f32::max);
    let mut out = img.data.clone();
    for y in 0..img.height {
        for x in 0..img.width {
            let p = (y * g / img.height) * g + x * g / img.width;
            let keep = 1.0 - 0.8 * (1.0 - if max > 0.0 { w[p] / max } else { 0.0 });
            for c in 0..3 {
                let i = (y * img.width + x) * 3 + c;
                out[i] = (img.data[i] as f32 * keep).round() as u8;
            }
        }
    }
    out
}

/// One picture per head of `layer` (the attention of [CLS] over the patches) and the rollout's, four to a row.
fn patch_panels(
    maps: &AttentionMaps,
    layer: usize,
    heads: &[usize],
    shown: &crate::image::Rgb8,
    g: usize,
) -> Result<Picture> {
    const INK: [u8; 3] = [34, 34, 34];
    let t = maps.len();
    let side = 224f32;
    let rollout = maps.rollout().map_err(|e| anyhow!("{}", crate::errors::attend(&e)))?;
    let mut panels: Vec<(String, Vec<f32>)> =
        heads.iter().map(|&h| (format!("layer {layer}, head {h}"), maps.head(layer, h)[1..t].to_vec())).collect();
    panels.push((format!("rollout after layer {layer}"), rollout[layer][1..t].to_vec()));
    let (pw, ph) = (side + 16.0, side + 30.0);
    let cols = panels.len().min(4);
    let rows = panels.len().div_ceil(4);
    let mut pic = Picture::new((16.0 + pw * cols as f32).ceil() as u32, (12.0 + ph * rows as f32 + 20.0).ceil() as u32);
    for (k, (title, w)) in panels.iter().enumerate() {
        let (ox, oy) = (16.0 + pw * (k % 4) as f32, 8.0 + ph * (k / 4) as f32);
        pic.text(ox, oy + 14.0, 13.0, title, INK, Anchor::Start);
        pic.image(ox, oy + 22.0, side, side, (shown.width, shown.height), shade_patches(shown, g, w))?;
    }
    let y = 12.0 + ph * rows as f32 + 8.0;
    pic.text(
        16.0,
        y,
        11.0,
        "brighter patches: more of [CLS]'s attention (each picture scaled to its largest)",
        INK,
        Anchor::Start,
    );
    Ok(pic)
}

/// One heatmap per head of `layer` (rows: queries, columns: keys), token labels on both axes when the cells are big
/// enough to read them, panels four to a row, and a scale from 0 to 1.
fn heatmaps(maps: &AttentionMaps, layer: usize, heads: &[usize]) -> Picture {
    const INK: [u8; 3] = [34, 34, 34];
    let shade = crate::picture::weight_shade;
    let t = maps.len();
    let cell = (560.0 / t as f32).clamp(1.0, 22.0);
    let labelled = cell >= 8.0;
    let size = (cell * 0.75).min(12.0);
    let short = |s: &str| -> String {
        let s = s.replace('\n', "⏎");
        if s.chars().count() > 14 {
            s.chars().take(13).collect::<String>() + "…"
        } else {
            s
        }
    };
    let labels: Vec<String> = maps.tokens.iter().map(|s| short(s)).collect();
    let margin =
        if labelled { labels.iter().map(|l| Picture::text_width(size, l)).fold(0.0, f32::max) + 6.0 } else { 0.0 };
    let side = cell * t as f32;
    let (panel_w, panel_h) = (margin + side + 20.0, 22.0 + margin + side + 16.0);
    let cols = heads.len().min(4);
    let rows = heads.len().div_ceil(4);
    let (w, h) = (16.0 + panel_w * cols as f32, 40.0 + panel_h * rows as f32);
    let mut pic = Picture::new(w.ceil() as u32, h.ceil() as u32);
    for (k, &head) in heads.iter().enumerate() {
        let (ox, oy) = (16.0 + panel_w * (k % 4) as f32, 8.0 + panel_h * (k / 4) as f32);
        pic.text(ox + margin, oy + 14.0, 13.0, &format!("layer {layer}, head {head}"), INK, Anchor::Start);
        let (mx, my) = (ox + margin, oy + 22.0 + margin);
        let m = maps.head(layer, head);
        for i in 0..t {
            for j in 0..t {
                pic.rect(mx + j as f32 * cell, my + i as f32 * cell, cell, cell, shade(m[i * t + j]));
            }
        }
        if labelled {
            for (i, l) in labels.iter().enumerate() {
                let mid = i as f32 * cell + cell / 2.0 + size * 0.35;
                let ink = if maps.special[i] { [136, 136, 136] } else { INK };
                pic.text(mx - 4.0, my + mid, size, l, ink, Anchor::End);
                pic.text_up(mx + mid, my - 4.0, size, l, ink, Anchor::Start);
            }
        }
    }
    crate::picture::weight_scale(&mut pic, 16.0, h - 22.0, "attention weight (rows: queries, columns: keys)");
    pic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaded_patches_keep_the_most_attended_one_and_darken_the_rest_by_their_weight() {
        // A 4 × 4 picture of 2 × 2 patches: patch 1 takes the most, patch 2 half of it, patches 0 and 3 nothing.
        let img = crate::image::Rgb8 { width: 4, height: 4, data: vec![200; 4 * 4 * 3] };
        let out = shade_patches(&img, 2, &[0.0, 0.6, 0.3, 0.0]);
        let at = |x: usize, y: usize| out[(y * 4 + x) * 3];
        assert_eq!((at(2, 0), at(3, 1)), (200, 200), "the top-right patch is the brightest: untouched");
        assert_eq!(at(0, 3), (200.0 * (1.0 - 0.8 * 0.5f32)).round() as u8, "bottom-left: half the weight");
        assert_eq!((at(0, 0), at(3, 3)), (40, 40), "no weight: a fifth of the brightness");
    }
}
