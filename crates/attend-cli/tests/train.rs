//! `attend train`: a tiny run learns (the loss falls, the held-out token accuracy beats chance), a run killed with
//! SIGKILL and resumed ends with the same summary as one never stopped, and bad settings are refused in one line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{attend, bin};
use serde_json::Value;

const TINY: [&str; 16] = [
    "--task",
    "translate",
    "--model",
    "bahdanau",
    "--set",
    "hidden_size=16",
    "--set",
    "embed_dim=8",
    "--set",
    "batch_size=8",
    "--set",
    "eval_examples=16",
    "--set",
    "max_len=8",
    "--set",
    "log_every=5",
];

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attend-cli-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = TINY.to_vec();
    v.insert(0, "train");
    v.extend(["--out", out, "--steps", "150", "--checkpoint-every", "50", "--set", "lr=0.02", "--set", "warmup=5"]);
    v.extend(extra);
    v
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn a_run_learns_and_a_killed_run_resumes_to_the_same_summary() {
    let (a, b) = (tmp("straight"), tmp("killed"));
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = attend(&args(sa, &[]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let straight = summary(&a);
    let lines: Vec<Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines.iter().find_map(|l| l["loss"].as_f64()).unwrap();
    let last = straight["loss"].as_f64().unwrap();
    assert!(last < 0.8 * first, "the loss falls: {first} → {last}");
    let acc = straight["token_accuracy"].as_f64().unwrap();
    assert!(acc > 3.0 / 46.0, "held-out token accuracy {acc} beats chance (1/46)");
    for f in ["config.toml", "loss.png", "loss.svg", "alignments.png", "alignments.svg"] {
        assert!(a.join(f).exists(), "{f} written");
    }

    // The same run, killed once its first checkpoint is on disk, then resumed.
    let mut child = Command::new(bin()).args(args(sb, &[])).spawn().unwrap();
    let first_ckpt = b.join("checkpoints/step-000000050");
    let t0 = Instant::now();
    while !first_ckpt.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint after two minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!b.join("summary.json").exists(), "the run was killed before it finished (else this test proves nothing)");
    let out = attend(&args(sb, &["--resume"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = summary(&b);
    for key in ["step", "loss", "grad_norm", "token_accuracy", "exact_match", "bleu"] {
        assert_eq!(resumed[key], straight[key], "summary `{key}` after resuming");
    }
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

fn refused(args: &[&str], needle: &str) {
    let out = attend(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn the_list_names_every_model_and_bad_settings_are_refused_in_one_line() {
    let out = attend(&["train", "--list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for m in ["none", "bahdanau", "luong", "luong-local-p"] {
        assert!(text.contains(&format!("--task translate --model {m}")), "{text}");
    }
    let d = tmp("bad");
    let s = d.to_str().unwrap();
    refused(&["train", "--task", "poetry", "--out", s], "unknown task `poetry`");
    refused(&["train", "--task", "translate", "--model", "gpt", "--out", s], "is not a model of task translate");
    refused(&["train", "--task", "translate", "--out", s, "--set", "hiden_size=3"], "no config key `hiden_size`");
    refused(&["train", "--task", "translate", "--out", s, "--set", "lr=fast"], "lr");
    refused(&["train", "--task", "translate", "--out", s, "--set", "max_len=2"], "max_len");
    refused(&["train", "--task", "translate"], "--out");
    std::fs::create_dir_all(&d).unwrap();
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "hidden = 3\n").unwrap();
    refused(&["train", "--task", "translate", "--out", s, "--config", cfg.to_str().unwrap()], "bad.toml");
    // A finished run is not overwritten; resuming it with other settings is refused.
    let mut a: Vec<&str> = vec!["train"];
    a.extend(TINY);
    a.extend(["--out", s, "--steps", "5", "--set", "eval_examples=2"]);
    assert!(attend(&a).status.success());
    refused(&a, "already holds a run");
    let mut other = a.clone();
    other.extend(["--resume", "--set", "seed=3"]);
    refused(&other, "other settings");
    let _ = std::fs::remove_dir_all(&d);
}
