//! `attend viz` end to end: pages written by the CLI from the tiny GPT-2 and BERT directories of fixtures/hf, opened
//! in a real browser (headless Chromium: no sandbox, no GPU, no background networking, a throwaway profile). The page's
//! own self-test (`page.html#selftest`) reports script errors, what it drew and what a click on a thumbnail opened;
//! a screenshot must not be blank. Plus one-line errors for what does not exist or is not supported.
//!
//! Chromium comes from Debian's `chromium` package (`.ci/run` installs it). Without it these tests fail and say how to
//! install it; `ATTEND_SKIP_BROWSER=1` skips the browser part explicitly (it prints that it did).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod common;
use common::*;

fn hf(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/hf").join(name).display().to_string()
}

fn image(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/viz").join(name).display().to_string()
}

/// The browser, or `None` when the caller opted out with ATTEND_SKIP_BROWSER=1.
fn chromium() -> Option<PathBuf> {
    if std::env::var("ATTEND_SKIP_BROWSER").as_deref() == Ok("1") {
        eprintln!("ATTEND_SKIP_BROWSER=1: not opening the pages in a browser");
        return None;
    }
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(o) = Command::new(c).arg("--version").output() {
            if o.status.success() {
                return Some(PathBuf::from(c));
            }
        }
    }
    panic!(
        "the viz tests open pages in headless Chromium, which is not installed: `apt-get install chromium` \
         (or set ATTEND_SKIP_BROWSER=1 to skip them knowingly)"
    );
}

fn headless(browser: &Path, profile: &Path) -> Command {
    let mut c = Command::new(browser);
    c.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The page's self-test report, read back from the DOM after its scripts ran.
fn selftest(browser: &Path, page: &Path, profile: &Path) -> Value {
    let out = headless(browser, profile)
        .args(["--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("file://{}#selftest", page.display()))
        .output()
        .expect("cannot start chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let start = dom.find(r#"<pre id="attend-selftest">"#).unwrap_or_else(|| {
        panic!(
            "{}: no self-test report in the DOM (did the script fail?)\n{}",
            page.display(),
            &dom[..dom.len().min(2000)]
        )
    });
    let json = &dom[start + r#"<pre id="attend-selftest">"#.len()..];
    let json = &json[..json.find("</pre>").unwrap()];
    serde_json::from_str(&json.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")).unwrap()
}

/// Pixels of a screenshot that are not the background colour.
fn inked_pixels(png_path: &Path) -> usize {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let bytes = &buf[..info.buffer_size()];
    let bg = &bytes[..px];
    bytes.chunks(px).filter(|p| p != &bg).count()
}

#[test]
fn pages_open_in_a_browser_draw_every_layer_head_and_token_and_clicks_open_heads() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], usize, usize); 3] = [
        ("gpt2", &["--text", "the quick brown fox"], 2, 4),
        ("bert", &["--text", "the quick brown fox", "--pair", "a lazy dog"], 2, 4),
        ("bert", &["--text", "hello world", "--heads", "1,3", "--layer", "1"], 2, 2),
    ];
    let browser = chromium();
    for (k, (model, args, layers, heads)) in cases.iter().enumerate() {
        let page = tmp.path().join(format!("{model}-{k}.html"));
        let dir = hf(model);
        let mut all = vec!["viz", "--model", &dir];
        all.extend_from_slice(args);
        let out = page.display().to_string();
        all.extend_from_slice(&["--out", &out]);
        let run = attend(&all);
        assert!(run.status.success(), "{all:?}: {}", String::from_utf8_lossy(&run.stderr));
        let html = std::fs::read_to_string(&page).unwrap();
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{model}: the page must not reach the network"
        );
        let Some(browser) = &browser else { continue };
        let profile = tmp.path().join(format!("profile-{k}"));
        let r = selftest(browser, &page, &profile);
        let label = format!("{model} {args:?}");
        assert_eq!(r["errors"], serde_json::json!([]), "{label}: script errors");
        assert_eq!(r["layers"], *layers, "{label}");
        assert_eq!(r["heads"], *heads, "{label}");
        let t = r["tokens"].as_u64().unwrap() as usize;
        assert!(t > 2, "{label}: {t} tokens");
        assert_eq!(r["thumbnails"], layers * heads, "{label}: one thumbnail per layer × head");
        assert_eq!(r["headTokens"], 2 * t, "{label}: every token on both sides of the head view");
        assert_eq!(r["rolloutTokens"], t, "{label}");
        assert_eq!(r["flowTokens"], t, "{label}: attention flow for a short text");
        assert_eq!(r["summaryRows"], layers * 4, "{label}: the summary lists every head of the model");
        let opened = &r["clickOpened"];
        assert_eq!(opened["view"], "head", "{label}: a thumbnail click opens the head view");
        assert_eq!(opened["layer"], 0, "{label}");
        assert_eq!(opened["heads"].as_array().unwrap().len(), 1, "{label}: only the clicked head");
        assert_eq!(opened["visible"], true, "{label}");
        // Each view painted: a screenshot of it holds more than a handful of non-background pixels.
        for view in ["head", "model", "rollout", "summary"] {
            let shot = tmp.path().join(format!("{model}-{k}-{view}.png"));
            let o = headless(browser, &profile)
                .args(["--window-size=900,700", "--hide-scrollbars"])
                .arg(format!("--screenshot={}", shot.display()))
                .arg(format!("file://{}#{view}", page.display()))
                .output()
                .unwrap();
            assert!(shot.exists(), "{label} {view}: no screenshot: {}", String::from_utf8_lossy(&o.stderr));
            let inked = inked_pixels(&shot);
            assert!(inked > 5_000, "{label} {view}: the screenshot is blank ({inked} pixels drawn)");
        }
    }
}

#[test]
fn a_vit_image_page_shows_every_head_over_the_picture_and_a_click_looks_from_a_patch() {
    let tmp = tempfile::tempdir().unwrap();
    let browser = chromium();
    let vit = hf("vit");
    // (image, extra flags, pictures in the image view: the chosen heads and the rollout)
    let cases: [(&str, &[&str], usize); 2] =
        [("vit_image.png", &[], 5), ("vit_image.jpg", &["--heads", "3,1", "--layer", "1"], 3)];
    for (k, (file, flags, panels)) in cases.iter().enumerate() {
        let page = tmp.path().join(format!("vit-{k}.html"));
        let (img, out) = (image(file), page.display().to_string());
        let args = [&["viz", "--model", &vit, "--image", &img][..], flags, &["--out", &out]].concat();
        let run = attend(&args);
        assert!(run.status.success(), "{args:?}: {}", String::from_utf8_lossy(&run.stderr));
        let html = std::fs::read_to_string(&page).unwrap();
        assert!(!html.contains("http://") && !html.contains("https://"), "the page must not reach the network");
        let Some(browser) = &browser else { continue };
        let profile = tmp.path().join(format!("vit-profile-{k}"));
        let r = selftest(browser, &page, &profile);
        assert_eq!(r["errors"], serde_json::json!([]), "{file}: script errors");
        assert_eq!((r["layers"].as_u64(), r["tokens"].as_u64()), (Some(2), Some(17)), "{file}: [CLS] + 4 × 4 patches");
        assert_eq!(r["imageGrid"], serde_json::json!([4, 4]), "{file}");
        assert_eq!(r["imagePanels"], *panels, "{file}: one picture per chosen head and the rollout");
        assert_eq!(r["imageFrom"], 16, "{file}: a click on the bottom-right patch looks from it (token 16)");
        assert_eq!(r["imageLoaded"], true, "{file}: the picture decoded");
        let px: Vec<u64> = r["brightestPixel"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert!(
            px[3] == 255 && px[..3].iter().sum::<u64>() > 0,
            "{file}: the most attended patch shows the picture: {px:?}"
        );
        assert_eq!(r["thumbnails"].as_u64().unwrap() as usize, 2 * (panels - 1), "{file}: the model view too");
        let shot = tmp.path().join(format!("vit-{k}.png"));
        headless(browser, &profile)
            .args(["--window-size=900,700", "--hide-scrollbars"])
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("file://{}#image", page.display()))
            .output()
            .unwrap();
        let inked = inked_pixels(&shot);
        assert!(inked > 20_000, "{file}: the image view's screenshot is nearly blank ({inked} pixels drawn)");
    }
    // The static pictures: the same panels, each an embedded PNG of the model's 16 × 16 view, in SVG and PNG.
    let (svg, png_path) = (tmp.path().join("v.svg"), tmp.path().join("v.png"));
    for (fmt, out) in [("svg", &svg), ("png", &png_path)] {
        let o = out.display().to_string();
        let args = ["viz", "--model", &vit, "--image", &image("vit_image.png"), "--heads", "0,2", "--format", fmt];
        let run = attend(&[&args[..], &["--out", &o]].concat());
        assert!(run.status.success(), "{fmt}: {}", String::from_utf8_lossy(&run.stderr));
    }
    let text = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(text.matches("<image ").count(), 3, "heads 0 and 2, and the rollout");
    assert!(text.contains("href=\"data:image/png;base64,"), "embedded, not linked");
    assert!(inked_pixels(&png_path) > 20_000, "the PNG picture drew the panels");
}

#[test]
fn what_does_not_exist_or_is_not_supported_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("page.html");
    let o = out.display().to_string();
    let (gpt2, bert, vit) = (hf("gpt2"), hf("bert"), hf("vit"));
    let e = expect_failure(&["viz", "--model", &gpt2, "--text", "hi there", "--layer", "7", "--out", &o], &out);
    assert_mentions(&e, &["layer 7 does not exist", "0..2"]);
    let e = expect_failure(&["viz", "--model", &bert, "--text", "hi there", "--heads", "0,9", "--out", &o], &out);
    assert_mentions(&e, &["head 9 does not exist", "0..4"]);
    let long = "the quick brown fox ".repeat(40);
    let e = expect_failure(&["viz", "--model", &gpt2, "--text", &long, "--out", &o], &out);
    assert_mentions(&e, &["tokens, longer than the model's context", "n_positions", "config.json"]);
    let e = expect_failure(&["viz", "--model", &vit, "--text", "hi", "--out", &o], &out);
    assert_mentions(&e, &["vit", "reads images", "--image"]);
    let e = expect_failure(&["viz", "--model", &gpt2, "--image", &image("vit_image.png"), "--out", &o], &out);
    assert_mentions(&e, &["--image shows vision models", "gpt2"]);
    let notes = tmp.path().join("notes.jpg");
    std::fs::write(&notes, "a text file").unwrap();
    let e = expect_failure(&["viz", "--model", &vit, "--image", &notes.display().to_string(), "--out", &o], &out);
    assert_mentions(&e, &["notes.jpg", "not a PNG or JPEG"]);
    // A directory whose processor keeps the image's size: a 40 × 24 picture does not fit a 16 × 16 model.
    let keep = tmp.path().join("vit-keep");
    std::fs::create_dir(&keep).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(Path::new(&vit).join(f), keep.join(f)).unwrap();
    }
    std::fs::write(keep.join("preprocessor_config.json"), r#"{"do_resize": false}"#).unwrap();
    let keep = keep.display().to_string();
    let e = expect_failure(&["viz", "--model", &keep, "--image", &image("vit_image.png"), "--out", &o], &out);
    assert_mentions(&e, &["40x24", "takes 16x16", "image_size", "do_resize"]);
    let e = expect_failure(&["viz", "--model", &gpt2, "--text", "hi", "--pair", "there", "--out", &o], &out);
    assert_mentions(&e, &["gpt2", "--pair"]);
    let e = expect_failure(&["viz", "--model", &gpt2, "--source", "hi", "--out", &o], &out);
    assert_mentions(&e, &["--source", "not supported yet"]);
    let e = expect_failure(&["viz", "--model", &gpt2, "--text", "hi", "--heads", "x", "--out", &o], &out);
    assert_mentions(&e, &["--heads", "\"x\""]);
    let missing = tmp.path().join("nope").display().to_string();
    let e = expect_failure(&["viz", "--model", &missing, "--text", "hi", "--out", &o], &out);
    assert_mentions(&e, &["nope"]);
}

/// `(x, y, w, h, fill)` of every `<rect>` of an SVG the CLI wrote.
fn svg_rects(svg: &str) -> Vec<(f32, f32, f32, f32, [u8; 3])> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[at..at + tag[at..].find('"')?].to_string())
    };
    svg.split("<rect")
        .skip(1)
        .map(|tag| {
            let num = |n: &str| attr(tag, n).map_or(0.0, |v| v.parse::<f32>().unwrap());
            let fill = attr(tag, "fill").unwrap();
            let hex = |k: usize| u8::from_str_radix(&fill[1 + 2 * k..3 + 2 * k], 16).unwrap();
            (num("x"), num("y"), num("width"), num("height"), [hex(0), hex(1), hex(2)])
        })
        .collect()
}

#[test]
fn static_heatmaps_show_the_weights_in_svg_and_png_with_the_embedded_font() {
    use attend::checkpoint::hf::{self as hfl, HfDir, HfModel};
    use attend::models::bert::BertInput;
    let tmp = tempfile::tempdir().unwrap();
    let (dir, text, pair) = (hf("bert"), "the quick brown fox", "a lazy dog");
    let (svg, png_path) = (tmp.path().join("h.svg"), tmp.path().join("h.png"));
    for (fmt, out) in [("svg", &svg), ("png", &png_path)] {
        let o = out.display().to_string();
        let args = ["viz", "--model", &dir, "--text", text, "--pair", pair, "--layer", "1", "--heads", "2,0"];
        let run = attend(&[&args[..], &["--format", fmt, "--out", &o]].concat());
        assert!(run.status.success(), "{fmt}: {}", String::from_utf8_lossy(&run.stderr));
    }
    // The weights the picture should show: layer 1, heads 2 then 0, from the library on the same tokens.
    let tok = tokenizers::Tokenizer::from_file(format!("{dir}/tokenizer.json")).unwrap();
    let enc = tok.encode((text, pair), true).unwrap();
    let t = enc.get_ids().len();
    let dev = candle_core::Device::Cpu;
    let ids = candle_core::Tensor::from_vec(enc.get_ids().to_vec(), (1, t), &dev).unwrap();
    let types = candle_core::Tensor::from_vec(enc.get_type_ids().to_vec(), (1, t), &dev).unwrap();
    let HfModel::Bert(m) = hfl::load(&HfDir::open(&dir).unwrap(), candle_core::DType::F32, &dev, false).unwrap() else {
        panic!("fixtures/hf/bert is a BERT checkpoint")
    };
    let input = BertInput { token_type_ids: Some(&types), need_weights: true, ..BertInput::new(&ids) };
    let w = m.model.bert().forward(&input).unwrap().weights[1].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        !svg_text.contains("<text") && !svg_text.contains("font"),
        "labels are glyph outlines, not font references"
    );
    let rects = svg_rects(&svg_text);
    // Background, then each head's T × T cells (row-major), then the 100-step scale.
    assert_eq!(rects.len(), 1 + 2 * t * t + 100);
    let blue = [49f32, 54.0, 149.0];
    for (k, head) in [2usize, 0].into_iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                let a = w[(head * t + i) * t + j];
                let want = blue.map(|b| (255.0 - a * (255.0 - b)).round() as i32);
                let got = rects[1 + (k * t + i) * t + j].4;
                assert!(
                    (0..3).all(|c| (got[c] as i32 - want[c]).abs() <= 1),
                    "head {head} ({i}, {j}): {got:?} vs {want:?}"
                );
            }
        }
    }
    // Labels: one title per panel, every token twice per panel, and the scale's two.
    assert_eq!(svg_text.matches("<path").count(), 2 * (1 + 2 * t) + 2);
    // The PNG is the same scene rasterised: each cell's centre has the cell's colour, and the labels drew ink.
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let width = info.width as usize;
    let svg_w: f32 = svg_text.split("width=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
    assert_eq!(width, svg_w as usize);
    for &(x, y, rw, rh, fill) in &rects[1..1 + 2 * t * t] {
        let (cx, cy) = ((x + rw / 2.0) as usize, (y + rh / 2.0) as usize);
        let p = &buf[(cy * width + cx) * 3..][..3];
        assert_eq!(p, fill, "PNG pixel at ({cx}, {cy})");
    }
    let dark = buf.chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
    assert!(dark > 500, "the labels drew text ({dark} dark pixels)");
}
