//! The classic attention layers: each computes its scores with its own parameters and runs them through the
//! classic path ([`crate::attention::classic`]: scores → mask → normalise → weighted sum).
//!
//! | layer | paper | file |
//! |---|---|---|
//! | [`global::GlobalAttention`] | Luong et al. 2015 §3.1 (dot, general, concat); Bahdanau et al. 2015 | `global.rs` |
//! | [`local::LocalAttention`] | Luong et al. 2015 §3.2 (local-m, local-p) | `local.rs` |

pub mod global;
pub mod local;
