//! `attend hf run`, `attend generate` and `attend embed` end to end on the tiny GPT-2, BERT and sentence-transformers
//! directories of fixtures/hf against what `transformers` and `sentence-transformers` computed (fixtures/hf_ref,
//! scripts/oracle/hf.py): outputs under Hugging Face's names and shapes, greedy ids token for token from ids and from
//! text, embeddings from arguments and from a file, and one-line errors on bad input.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::Value;

mod common;
use common::*;

const PARITY: Tol = Tol { atol: 1e-4, rtol: 0.0 };

fn gpt2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/hf/gpt2")
}

fn reference() -> (std::collections::HashMap<String, Tensor>, std::collections::HashMap<String, String>) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/hf_ref/gpt2.safetensors");
    (load(&p), metadata(&p))
}

fn ids_csv(t: &Tensor) -> String {
    let v: Vec<i64> = t.to_dtype(DType::I64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn ok(args: &[&str]) -> String {
    let run = attend(args);
    assert!(run.status.success(), "{args:?}: {}", String::from_utf8_lossy(&run.stderr));
    String::from_utf8(run.stdout).unwrap()
}

#[test]
fn hf_run_writes_transformers_logits_for_ids_and_for_an_inputs_file() {
    let (r, _) = reference();
    let tmp = tempfile::tempdir().unwrap();
    let dir = gpt2_dir();
    // --input-ids: one unpadded sequence, logits (T, V).
    let out = tmp.path().join("one.safetensors");
    let row0 = r["input_ids"].get(0).unwrap();
    ok(&[
        "hf",
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids_csv(&row0),
        "--output",
        out.to_str().unwrap(),
    ]);
    let got = &load(&out)["logits"];
    compare("logits (T, V)", got, &r["logits"].get(0).unwrap(), PARITY).unwrap();
    // --inputs with a right-padded batch: (B, T, V), compared where the mask is 1.
    let inp = tmp.path().join("in.safetensors");
    save(&inp, &[("input_ids", &r["input_ids"]), ("attention_mask", &r["attention_mask"])]);
    let out = tmp.path().join("batch.safetensors");
    ok(&[
        "hf",
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--inputs",
        inp.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let got = &load(&out)["logits"];
    assert_eq!(got.dims(), r["logits"].dims());
    compare("logits row 0", &got.get(0).unwrap(), &r["logits"].get(0).unwrap(), PARITY).unwrap();
    compare(
        "logits row 1 (real tokens)",
        &got.get(1).unwrap().narrow(0, 0, 4).unwrap(),
        &r["logits"].get(1).unwrap().narrow(0, 0, 4).unwrap(),
        PARITY,
    )
    .unwrap();
}

#[test]
fn generate_is_greedy_like_transformers_from_ids_and_from_text() {
    let (r, meta) = reference();
    let dir = gpt2_dir();
    let prompt = r["gen_prompt_ids"].get(0).unwrap();
    let want: Vec<u64> = r["gen_ids"]
        .get(0)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u64)
        .collect();
    let new = (want.len() - prompt.dim(0).unwrap()).to_string();
    let line = ok(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids_csv(&prompt),
        "--max-new-tokens",
        &new,
        "--json",
    ]);
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    let ids: Vec<u64> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids, want);
    // From text, through tokenizer.json.
    let line = ok(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        &meta["prompt"],
        "--max-new-tokens",
        "10",
        "--json",
    ]);
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    let want_ids: Value = serde_json::from_str(&meta["gen_text_ids"]).unwrap();
    assert_eq!(v["ids"], want_ids);
    assert_eq!(v["text"].as_str().unwrap(), meta["gen_text"]);
    // Streaming text: the same text on stdout.
    let streamed =
        ok(&["generate", "--model", dir.to_str().unwrap(), "--prompt", &meta["prompt"], "--max-new-tokens", "10"]);
    assert_eq!(streamed.trim_end_matches('\n'), meta["gen_text"]);
    // Sampling is seeded: the same seed, the same ids.
    let sample = |seed: &str| {
        ok(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--input-ids",
            "5,6,7",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])
    };
    assert_eq!(sample("3"), sample("3"));
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let dir = gpt2_dir();
    let d = dir.to_str().unwrap();
    let e = expect_failure(&["hf", "run", "--model", d, "--input-ids", "1,300", "--output", o], &out);
    assert_mentions(&e, &["token id 300", "0..300"]);
    let e = expect_failure(&["hf", "run", "--model", d, "--input-ids", "1,x", "--output", o], &out);
    assert_mentions(&e, &["--input-ids"]);
    let e = expect_failure(
        &["hf", "run", "--model", tmp.path().to_str().unwrap(), "--input-ids", "1", "--output", o],
        &out,
    );
    assert_mentions(&e, &["config.json"]);
    let inp = tmp.path().join("in.safetensors");
    save(
        &inp,
        &[
            ("input_ids", &Tensor::new(&[[1i64, 2]], &candle_core::Device::Cpu).unwrap()),
            ("pixel_values", &Tensor::zeros((1, 3, 2, 2), DType::F32, &candle_core::Device::Cpu).unwrap()),
        ],
    );
    let e = expect_failure(&["hf", "run", "--model", d, "--inputs", inp.to_str().unwrap(), "--output", o], &out);
    assert_mentions(&e, &["pixel_values", "gpt2"]);
    let long = vec!["1"; 64].join(",");
    let e = expect_failure(&["generate", "--model", d, "--input-ids", &long, "--max-new-tokens", "5"], &out);
    assert_mentions(&e, &["context of 64"]);
    let e = expect_failure(&["generate", "--model", d, "--input-ids", "1", "--temperature", "0"], &out);
    assert_mentions(&e, &["temperature"]);
    // An unknown model_type names the field and what is supported.
    let other = tmp.path().join("bert");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("config.json"), r#"{"model_type": "xlnet"}"#).unwrap();
    let e = expect_failure(&["hf", "run", "--model", other.to_str().unwrap(), "--input-ids", "1", "--output", o], &out);
    assert_mentions(&e, &["model_type", "xlnet", "gpt2"]);
}

#[test]
fn bench_train_step_reports_the_contract_keys() {
    for (path, phases) in [("fused", &["forward_backward_ms"][..]), ("autograd", &["forward_ms", "backward_ms"][..])] {
        let args =
            ["bench", "train-step", "--preset", "cpu", "--path", path, "--iters", "1", "--warmup", "0", "--json"];
        let line = ok(&args);
        let v: Value = serde_json::from_str(line.trim()).unwrap();
        for key in ["median_ms", "tokens_per_s", "optimizer_ms"].iter().chain(phases) {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {line}");
        }
        assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{line}");
        assert_eq!(v["params"], 809856, "the anchor's cpu config has 809,856 parameters");
        assert_eq!(v["path"], path);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name)
}

#[test]
fn hf_run_writes_bert_outputs_under_transformers_names() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, reference, outputs) in [
        ("bert", "bert", vec![("last_hidden_state", "last_hidden_state"), ("pooler_output", "pooler_output")]),
        ("bert-mlm", "bert-mlm", vec![("logits", "mlm_logits")]),
    ] {
        let r = load(&fixture(&format!("hf_ref/{reference}.safetensors")));
        let inp = tmp.path().join(format!("{dir}-in.safetensors"));
        let names = ["input_ids", "token_type_ids", "attention_mask"];
        save(&inp, &names.map(|n| (n, &r[n])));
        let out = tmp.path().join(format!("{dir}.safetensors"));
        let model = fixture(&format!("hf/{dir}"));
        let args = ["hf", "run", "--model", model.to_str().unwrap(), "--inputs", inp.to_str().unwrap()];
        ok(&[&args[..], &["--output", out.to_str().unwrap()]].concat());
        let got = load(&out);
        assert_eq!(got.len(), outputs.len(), "{dir}: outputs {:?}", got.keys().collect::<Vec<_>>());
        // Row 0 has no padding; compare it whole (padded positions are undefined in both libraries).
        for (ours, theirs) in outputs {
            let (g, w) = (got[ours].get(0).unwrap(), r[theirs].get(0).unwrap());
            compare(&format!("{dir} {ours}"), &g, &w, PARITY).unwrap();
        }
    }
}

fn embeddings_of(stdout: &str) -> Vec<(String, Vec<f32>)> {
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            let e = v["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (v["text"].as_str().unwrap().to_string(), e)
        })
        .collect()
}

#[test]
fn embed_matches_sentence_transformers_from_args_and_from_a_file() {
    let refp = fixture("hf_ref/st-bert.safetensors");
    let (r, meta) = (load(&refp), metadata(&refp));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    assert!(texts.iter().any(String::is_empty), "the fixture embeds an empty text");
    let model = fixture("hf/st-bert");
    let m = model.to_str().unwrap();
    let want = &r["embeddings"];
    let check = |label: &str, got: &[(String, Vec<f32>)]| {
        assert_eq!(got.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(), texts, "{label}: texts in input order");
        for (i, (_, e)) in got.iter().enumerate() {
            let g = Tensor::new(e.as_slice(), &candle_core::Device::Cpu).unwrap();
            compare(&format!("{label} text {i}"), &g, &want.get(i).unwrap(), PARITY).unwrap();
        }
    };
    let args: Vec<&str> =
        ["embed", "--model", m, "--json"].into_iter().chain(texts.iter().map(String::as_str)).collect();
    check("args", &embeddings_of(&ok(&args)));
    // One text a batch: padding never reaches an embedding.
    let args1: Vec<&str> = [&args[..3], &["--batch-size", "1", "--json"], &args[4..]].concat();
    check("batch size 1", &embeddings_of(&ok(&args1)));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("texts.txt");
    std::fs::write(&file, texts.join("\n") + "\n").unwrap();
    check("file", &embeddings_of(&ok(&["embed", "--model", m, "--json", "--file", file.to_str().unwrap()])));
    // Without --json: one human-readable line per text.
    assert_eq!(ok(&["embed", "--model", m, "a", "b"]).lines().count(), 2);
}

#[test]
fn embed_applies_a_directorys_dense_projections_as_sentence_transformers() {
    let refp = fixture("hf_ref/st-dense.safetensors");
    let (r, meta) = (load(&refp), metadata(&refp));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let model = fixture("hf/st-dense");
    let args: Vec<&str> = ["embed", "--model", model.to_str().unwrap(), "--json"]
        .into_iter()
        .chain(texts.iter().map(String::as_str))
        .collect();
    let got = embeddings_of(&ok(&args));
    assert_eq!(got.len(), texts.len());
    for (i, (t, e)) in got.iter().enumerate() {
        assert_eq!((t, e.len()), (&texts[i], 16), "text {i}: the last Dense module's width");
        let g = Tensor::new(e.as_slice(), &candle_core::Device::Cpu).unwrap();
        compare(&format!("dense text {i}"), &g, &r["embeddings"].get(i).unwrap(), PARITY).unwrap();
    }
}

#[test]
fn embed_refuses_what_it_cannot_embed_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let none = tmp.path().join("none");
    let gpt2 = gpt2_dir();
    let e = expect_failure(&["embed", "--model", gpt2.to_str().unwrap(), "x"], &none);
    assert_mentions(&e, &["config.json", "model_type"]);
    let st = fixture("hf/st-bert");
    let missing = tmp.path().join("missing.txt");
    let e = expect_failure(&["embed", "--model", st.to_str().unwrap(), "--file", missing.to_str().unwrap()], &none);
    assert_mentions(&e, &["missing.txt"]);
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = expect_failure(&["embed", "--model", st.to_str().unwrap(), "--file", empty.to_str().unwrap()], &none);
    assert_mentions(&e, &["empty.txt", "no texts"]);
}

#[test]
fn hf_run_classifies_images_with_vit() {
    let tmp = tempfile::tempdir().unwrap();
    let r = load(&fixture("hf_ref/vit.safetensors"));
    let inp = tmp.path().join("pixels.safetensors");
    save(&inp, &[("pixel_values", &r["pixel_values"])]);
    let out = tmp.path().join("vit.safetensors");
    let model = fixture("hf/vit");
    let m = model.to_str().unwrap();
    ok(&["hf", "run", "--model", m, "--inputs", inp.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    compare("vit logits", &load(&out)["logits"], &r["logits"], PARITY).unwrap();
    let none = tmp.path().join("none.safetensors");
    let e =
        expect_failure(&["hf", "run", "--model", m, "--input-ids", "1,2", "--output", none.to_str().unwrap()], &none);
    assert_mentions(&e, &["input_ids", "vit"]);
}

#[test]
fn t5_runs_and_generates_like_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let r = load(&fixture("hf_ref/t5.safetensors"));
    let inp = tmp.path().join("t5-in.safetensors");
    save(&inp, &["input_ids", "attention_mask", "decoder_input_ids"].map(|n| (n, &r[n])));
    let out = tmp.path().join("t5.safetensors");
    let model = fixture("hf/t5");
    let m = model.to_str().unwrap();
    ok(&["hf", "run", "--model", m, "--inputs", inp.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    compare("t5 logits", &load(&out)["logits"], &r["logits"], PARITY).unwrap();
    // Greedy from ids, as transformers' generate returns them (the decoder start first).
    let src = ids_csv(&r["input_ids"].get(0).unwrap());
    let want: Vec<i64> = r["gen_ids"].get(0).unwrap().to_vec1().unwrap();
    let n = (want.len() - 1).to_string();
    for extra in [&[][..], &["--num-beams", "1"][..]] {
        let args =
            [&["generate", "--model", m, "--input-ids", &src, "--max-new-tokens", &n, "--json"][..], extra].concat();
        let v: Value = serde_json::from_str(ok(&args).trim()).unwrap();
        let got: Vec<i64> = v["ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(got, want, "{extra:?}");
    }
    let none = tmp.path().join("none.safetensors");
    let e =
        expect_failure(&["hf", "run", "--model", m, "--input-ids", "5,1", "--output", none.to_str().unwrap()], &none);
    assert_mentions(&e, &["decoder_input_ids"]);
    let e = expect_failure(
        &["generate", "--model", gpt2_dir().to_str().unwrap(), "--input-ids", "5", "--num-beams", "2"],
        &none,
    );
    assert_mentions(&e, &["--num-beams", "encoder"]);
}

#[test]
fn bench_embed_reports_the_contract_keys() {
    let line = ok(&["bench", "embed", "--batch", "2", "--tokens", "8", "--iters", "1", "--warmup", "0", "--json"]);
    let v: Value = serde_json::from_str(line.trim()).unwrap();
    for key in ["median_ms", "tokens_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {line}");
    }
    assert_eq!(v["params"], 22713216, "all-MiniLM-L6-v2 has 22,713,216 parameters");
}

#[test]
fn embed_refuses_a_file_that_is_not_utf8() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9\n").unwrap();
    let st = fixture("hf/st-bert");
    let e = expect_failure(
        &["embed", "--model", st.to_str().unwrap(), "--file", bad.to_str().unwrap()],
        &tmp.path().join("none"),
    );
    assert_mentions(&e, &["latin1.txt", "UTF-8"]);
}
