//! The classic attention layers: each computes its scores with its own parameters and runs them through the
//! classic path ([`crate::attention::classic`]: scores → mask → normalise → weighted sum).
//!
//! | layer | paper | file |
//! |---|---|---|
//! | [`global::GlobalAttention`] | Luong et al. 2015 §3.1 (dot, general, concat); Bahdanau et al. 2015 | `global.rs` |
//! | [`local::LocalAttention`] | Luong et al. 2015 §3.2 (local-m, local-p) | `local.rs` |
//! | [`coattention::CoAttention`] | bidirectional alignment of sentence pairs (ESIM, decomposable attention) | `coattention.rs` |
//! | [`han::AttentionPooling`], [`han::HierarchicalEncoder`] | Yang et al. 2016 (HAN) | `han.rs` |
//! | [`spatial::SpatialAttention`] | Xu et al. 2015 (Show, Attend and Tell) | `spatial.rs` |
//! | [`din::DinAttention`] | Zhou et al. 2018 (Deep Interest Network) | `din.rs` |
//! | [`gat::Gat`] | Veličković et al. 2018 (GAT), Brody et al. 2022 (GATv2), on edge lists | `gat.rs` |
//! | [`hard`]: top-k, sampled (REINFORCE with a baseline), Gumbel-softmax straight-through | Xu et al. 2015 §4.1; Williams 1992; Jang et al. 2017 | `hard.rs` |
//! | [`truncated::TruncatedSelfAttention`]: windowed self-attention, streamed with a bounded cache | streaming speech Transformers | `truncated.rs` |
//! | [`transformer::TransformerLayer`]: self-, cross-attention and feed-forward branches, pre- or post-norm | Vaswani et al. 2017 §3.1; Xiong et al. 2020 | `transformer.rs` |
//! | [`feed_forward::FeedForward`]: plain or gated | Vaswani et al. 2017 §3.3; Shazeer 2020 | `feed_forward.rs` |
//! | [`linear::Linear`]: `x Wᵀ + b` with a one-product bias gradient | — | `linear.rs` |
//! | [`norm::Norm`]: layer norm, RMS norm (fused, hand-written backward) | Ba et al. 2016; Zhang & Sennrich 2019 | `norm.rs` |
//! | [`patch_embedding::PatchEmbedding`]: image → `P×P` patches → `C` | Dosovitskiy et al. 2021 (ViT) | `patch_embedding.rs` |
//! | [`pooling::pool`]: cls / mean / max / mean-√n / weighted mean / last token over real tokens; L2 normalisation | sentence-transformers (Reimers & Gurevych 2019) | `pooling.rs` |
//! | [`stack::Stack`]: distinct or shared parameters across depth | ALBERT (Lan et al. 2020), Universal Transformer | `stack.rs` |

pub mod coattention;
pub mod din;
pub mod feed_forward;
pub mod gat;
pub mod global;
pub mod han;
pub mod hard;
pub mod linear;
pub mod local;
pub mod norm;
pub mod patch_embedding;
pub mod pooling;
pub mod spatial;
pub mod stack;
pub mod transformer;
pub mod truncated;
