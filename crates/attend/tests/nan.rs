//! NaN and ±∞ through the attention core, against `scripts/oracle/nan.py` (PyTorch, float64, exact masking): a
//! non-finite value in q, k, v, the upstream gradient or an additive mask reaches exactly the outputs and gradients
//! of the (query, key) pairs that see it; a hidden pair contributes nothing; a row that sees no key is 0.
//!
//! Every implementation runs every case. The fused kernel's instruction set is the process's (`ATTEND_ISA`): CI runs
//! this file once per path; `attend-kernels/tests/flash.rs` covers every path and block size in one process.

mod common;

use attend::attention::{attention_with, AttentionImpl, AttentionOptions};
use common::*;

const IMPLS: [AttentionImpl; 3] = [AttentionImpl::Fused, AttentionImpl::Materialized, AttentionImpl::Reference];

#[test]
fn non_finite_values_reach_exactly_the_pairs_that_see_them() {
    let cases = fixture_cases("nan");
    assert!(cases.len() >= 20, "expected the NaN sweep, found {} cases", cases.len());
    for case in cases {
        let f = load("nan", &case);
        // Every implementation; then, for an additive mask, the fused kernel once more with the mask as a plain
        // tensor (a learned one runs the materialised path).
        let runs = IMPLS.iter().map(|&i| (i, true)).chain(f.has("mask").then_some((AttentionImpl::Fused, false)));
        for (imp, learned) in runs {
            let (q, k, v) = (f.var("q"), f.var("k"), f.var("v"));
            let (mask, mvar) = mask_of_with(&f, learned);
            let opts =
                AttentionOptions { scale: scale_of(&f), need_lse: true, implementation: imp, ..Default::default() };
            let o = attention_with(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, &opts)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            let label = format!("{case} {imp:?}{}", if learned { "" } else { " (plain mask tensor)" });
            assert_close(&format!("{label} out"), &o.out, &f.t("out"), F32);
            assert_close(&format!("{label} lse"), o.lse.as_ref().unwrap(), &f.t("lse"), F32);
            let g = weighted_sum(&o.out, &f.t("dout")).backward().unwrap();
            for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
                assert_close(&format!("{label} {name}"), g.get(x.as_tensor()).unwrap(), &f.t(name), F32_GRAD);
            }
            if let Some(m) = mvar {
                assert_close(&format!("{label} dmask"), g.get(m.as_tensor()).unwrap(), &f.t("dmask"), F32_GRAD);
            }
        }
    }
}
