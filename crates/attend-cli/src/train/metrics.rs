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

    #[test]
    fn bleu_is_one_for_identity_zero_without_a_four_gram_and_penalises_brevity() {
        let r = vec![vec![1, 2, 3, 4, 5, 6]];
        assert!((bleu(&r, &r) - 1.0).abs() < 1e-12);
        assert_eq!(bleu(&[vec![6, 5, 4, 3, 2, 1]], &r), 0.0);
        // 5 of the reference's 6 tokens, in order: precisions 1, bp = e^(1 − 6/5)
        let short = bleu(&[vec![1, 2, 3, 4, 5]], &r);
        assert!((short - (1.0f64 - 6.0 / 5.0).exp()).abs() < 1e-12, "{short}");
        // one substitution in the middle of 8 tokens: p1 = 7/8, p2 = 5/7, p3 = 3/6, p4 = 1/5 (hand-counted)
        let r8 = vec![vec![1, 2, 3, 4, 5, 6, 7, 8]];
        let h8 = vec![vec![1, 2, 3, 9, 5, 6, 7, 8]];
        let want = ((7.0f64 / 8.0).ln() + (5.0f64 / 7.0).ln() + (3.0f64 / 6.0).ln() + (1.0f64 / 5.0).ln()) / 4.0;
        assert!((bleu(&h8, &r8) - want.exp()).abs() < 1e-12);
        assert_eq!(exact_match(&[vec![1], vec![2]], &[vec![1], vec![3]]), 0.5);
    }
}
