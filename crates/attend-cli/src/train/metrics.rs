//! Sequence metrics: exact match and corpus BLEU-4 (Papineni et al. 2002: clipped n-gram precisions over the whole
//! corpus, geometric mean, brevity penalty; no smoothing, as sacreBLEU's default on tokens).

use std::collections::HashMap;

/// The share of hypotheses equal to their reference.
pub fn exact_match(hyps: &[Vec<u32>], refs: &[Vec<u32>]) -> f64 {
    if hyps.is_empty() {
        return 0.0;
    }
    hyps.iter().zip(refs).filter(|(h, r)| h == r).count() as f64 / hyps.len() as f64
}

fn ngrams(s: &[u32], n: usize) -> HashMap<&[u32], usize> {
    let mut m = HashMap::new();
    for g in s.windows(n) {
        *m.entry(g).or_insert(0) += 1;
    }
    m
}

/// Corpus BLEU-4 in `[0, 1]`.
pub fn bleu(hyps: &[Vec<u32>], refs: &[Vec<u32>]) -> f64 {
    let (mut matched, mut total) = ([0usize; 4], [0usize; 4]);
    let (mut hyp_len, mut ref_len) = (0usize, 0usize);
    for (h, r) in hyps.iter().zip(refs) {
        hyp_len += h.len();
        ref_len += r.len();
        for n in 1..=4 {
            let rc = ngrams(r, n);
            for (g, c) in ngrams(h, n) {
                matched[n - 1] += c.min(rc.get(g).copied().unwrap_or(0));
            }
            total[n - 1] += h.len().saturating_sub(n - 1);
        }
    }
    if matched.contains(&0) || hyp_len == 0 {
        return 0.0;
    }
    let log_p: f64 = (0..4).map(|i| (matched[i] as f64 / total[i] as f64).ln()).sum::<f64>() / 4.0;
    let bp = if hyp_len >= ref_len { 1.0 } else { (1.0 - ref_len as f64 / hyp_len as f64).exp() };
    bp * log_p.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sacreBLEU (scripts/oracle/bleu.py: tokenize="none", smooth_method="none") on random corpora with
    /// substitutions, shorter and longer hypotheses.
    #[test]
    fn bleu_matches_sacrebleu() {
        let fx: serde_json::Value =
            serde_json::from_str(include_str!("../../../../fixtures/train/bleu.json")).expect("fixture parses");
        let ids = |v: &serde_json::Value| -> Vec<Vec<u32>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
                .collect()
        };
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 4);
        for (i, c) in cases.iter().enumerate() {
            let (got, want) = (bleu(&ids(&c["hyps"]), &ids(&c["refs"])), c["bleu"].as_f64().unwrap());
            assert!((got - want).abs() < 1e-9, "case {i}: {got} vs sacreBLEU {want}");
        }
    }

    #[test]
    fn bleu_limits_and_exact_match() {
        let r = vec![vec![1, 2, 3, 4, 5, 6]];
        assert!((bleu(&r, &r) - 1.0).abs() < 1e-12);
        assert_eq!(bleu(&[vec![6, 5, 4, 3, 2, 1]], &r), 0.0); // no 4-gram in common
        assert_eq!(exact_match(&[vec![1], vec![2]], &[vec![1], vec![3]]), 0.5);
    }
}
