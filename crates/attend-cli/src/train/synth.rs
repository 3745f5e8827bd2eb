//! The built-in synthetic translation task: a source language of random word strings and a target language that
//! needs both of the things that make translation hard for a fixed-size context vector.
//!
//! - **Word reordering**: each word has its own translation (a fixed lexicon), and the target reverses every block
//!   of three words (`a b c d e` → `C B A E D`), so the alignment is near-diagonal but not monotone.
//! - **Long-range agreement**: the target ends with a marker chosen by the class of the *first* source word (its id
//!   modulo [`MARKERS`]), so the first word must still be known after the whole sentence.
//!
//! Sentence lengths are uniform in `min_len..=max_len`, so the task can be swept by length. Example `i` of a split
//! is drawn from `(seed, split, i)` alone: any batch can be regenerated, in any order, on any machine.

/// Token ids shared by both vocabularies.
pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
const SPECIALS: u32 = 3;
/// Content words per language.
pub const WORDS: u32 = 40;
/// Agreement markers in the target language.
pub const MARKERS: u32 = 3;
/// Words per reversed block.
const BLOCK: usize = 3;

pub const SRC_VOCAB: usize = (SPECIALS + WORDS) as usize;
pub const TGT_VOCAB: usize = (SPECIALS + WORDS + MARKERS) as usize;

/// Which stream an example comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// SplitMix64 of a counter: the generator of every example.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Example `index` of `split`: `(source, target)` without `bos`/`eos`.
pub fn example(seed: u64, split: Split, index: u64, min_len: usize, max_len: usize) -> (Vec<u32>, Vec<u32>) {
    let base = mix(seed ^ mix(index.wrapping_mul(2).wrapping_add(split as u64)));
    let mut draw = (0u64..).map(move |i| mix(base.wrapping_add(i)));
    let span = (max_len - min_len + 1) as u64;
    let len = min_len + (draw.next().unwrap_or(0) % span) as usize;
    let src: Vec<u32> = (0..len).map(|_| SPECIALS + (draw.next().unwrap_or(0) % WORDS as u64) as u32).collect();
    (src.clone(), translate(&src))
}

/// The target of a source sentence: each word translated, every block of three reversed, then the marker of the
/// first word's class.
pub fn translate(src: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(src.len() + 1);
    for block in src.chunks(BLOCK) {
        out.extend(block.iter().rev()); // the lexicon maps source word w to target word w (different embeddings)
    }
    if let Some(&first) = src.first() {
        out.push(SPECIALS + WORDS + (first - SPECIALS) % MARKERS);
    }
    out
}

/// A word as the pictures print it: source words `s7`, target words `T7`, markers `<m1>`.
pub fn word(id: u32, target: bool) -> String {
    match id {
        PAD => "<pad>".into(),
        BOS => "<s>".into(),
        EOS => "</s>".into(),
        w if w >= SPECIALS + WORDS => format!("<m{}>", w - SPECIALS - WORDS),
        w if target => format!("T{}", w - SPECIALS),
        w => format!("s{}", w - SPECIALS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reversed_and_the_marker_follows_the_first_word() {
        let w = |i: u32| SPECIALS + i;
        assert_eq!(translate(&[w(0), w(1), w(2), w(3), w(4)]), vec![w(2), w(1), w(0), w(4), w(3), w(WORDS)]);
        assert_eq!(*translate(&[w(5), w(9)]).last().unwrap(), w(WORDS + 2));
    }

    #[test]
    fn examples_are_reproducible_within_bounds_and_the_splits_differ() {
        for i in 0..200 {
            let (s, t) = example(7, Split::Train, i, 4, 9);
            assert!((4..=9).contains(&s.len()) && t.len() == s.len() + 1);
            assert!(s.iter().all(|&x| (SPECIALS..SPECIALS + WORDS).contains(&x)));
            assert_eq!((s.clone(), t), example(7, Split::Train, i, 4, 9));
            assert_ne!(s, example(7, Split::Eval, i, 4, 9).0);
        }
    }
}
