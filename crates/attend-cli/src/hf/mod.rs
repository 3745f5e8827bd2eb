//! `attend hf run` and `attend generate`: Hugging Face model directories (config.json, model.safetensors,
//! tokenizer.json) read from disk, run like `transformers` runs them.

pub mod embed;
pub mod generate;
pub mod run;

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use attend::checkpoint::hf::{self, HfDir, HfModel};
use candle_core::{DType, Device};

/// The directory and its model, with errors on one line naming the directory.
pub fn open(dir: &Path) -> Result<(HfDir, HfModel)> {
    let d = HfDir::open(dir).map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    let m = hf::load(&d, DType::F32, &Device::Cpu, false).map_err(|e| anyhow!(crate::errors::attend(&e)))?;
    Ok((d, m))
}

/// `DIR/tokenizer.json`, if the directory has one.
pub fn tokenizer(dir: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let p = dir.join("tokenizer.json");
    if !p.is_file() {
        return Ok(None);
    }
    tokenizers::Tokenizer::from_file(&p)
        .map(Some)
        .map_err(|e| anyhow!("{}: cannot read the tokenizer: {e}", p.display()))
}

/// `"5,17,33"` as ids.
pub fn parse_ids(flag: &str, text: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>, _> = text.split(',').map(|s| s.trim().parse::<u32>()).collect();
    match ids {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!("{flag} {text:?}: expected comma-separated non-negative integers such as \"5,17,33\""),
    }
}
