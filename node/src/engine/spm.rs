//! SentencePiece-style tokenization from a GGUF vocabulary (`tokenizer.ggml.model = "llama"`, e.g.
//! Gemma 3), exactly as llama.cpp's `llm_tokenizer_spm` does it: spaces become `▁`, the text is
//! split into UTF-8 characters, and adjacent symbols are merged greedily by the score of the
//! merged piece (highest score first, leftmost on ties) as long as the merged piece is in the
//! vocabulary; a final symbol that is not a token falls back to its bytes (`<0xXX>` tokens).
//!
//! The `tokenizers` crate's SentencePiece support is Unigram (Viterbi over scores) or BPE with an
//! explicit merge list; GGUF carries neither, and llama.cpp's score-ordered bigram merging is
//! what the model's own engine runs, so it is reproduced here (bounded: one heap entry per
//! candidate merge, at most `2·chars` live).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::tokenizer::TokenId;

/// The character SentencePiece uses for a space.
pub const SPACE: &str = "\u{2581}";

/// Vocabulary lookups for SPM merging.
#[derive(Debug, Clone)]
pub struct Spm {
    ids: HashMap<String, TokenId>,
    scores: Vec<f32>,
    /// Token of each byte value (`<0xXX>`), for byte fallback.
    byte_ids: Vec<Option<TokenId>>,
    unk: Option<TokenId>,
    /// Prepend a space to each text fragment that follows a special token or starts the text
    /// (`tokenizer.ggml.add_space_prefix`; false for Gemma 3).
    add_space_prefix: bool,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    /// Byte range in the escaped text; `len == 0` once merged into its left neighbour.
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug, PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl Eq for Bigram {}
impl Ord for Bigram {
    // Max-heap: higher score first, then the leftmost pair (llama.cpp's `llm_bigram_spm`).
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl Spm {
    /// `tokens[i]` with score `scores[i]`; `byte_ids` from the vocabulary's `<0xXX>` tokens.
    pub fn new(
        tokens: &[String],
        scores: Vec<f32>,
        unk: Option<TokenId>,
        add_space_prefix: bool,
    ) -> Self {
        // Like llama.cpp's token_to_id map, a duplicated token string resolves to its last id.
        let ids: HashMap<String, TokenId> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as TokenId))
            .collect();
        let byte_ids = (0..=255u8)
            .map(|b| ids.get(&format!("<0x{b:02X}>")).copied())
            .collect();
        Self {
            ids,
            scores,
            byte_ids,
            unk,
            add_space_prefix,
        }
    }

    /// The bytes a byte-fallback token `<0xXX>` stands for.
    pub fn byte_piece(token: &str) -> Option<u8> {
        let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
        if hex.len() != 2 {
            return None;
        }
        u8::from_str_radix(hex, 16).ok()
    }

    /// Tokenize one fragment of plain text (no special tokens in it). `after_special` is true for
    /// the first fragment and for fragments that follow a special token.
    pub fn encode(&self, raw: &str, after_special: bool, out: &mut Vec<TokenId>) {
        let mut text = String::with_capacity(raw.len() + 3);
        if self.add_space_prefix && after_special {
            text.push(' ');
        }
        text.push_str(raw);
        let text = text.replace(' ', SPACE);
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = symbols.last_mut() else {
            return;
        };
        last.next = None;
        let mut heap = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.try_bigram(&text, &symbols, Some(i - 1), Some(i), &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Stale entry: one side was merged away since it was pushed.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            self.try_bigram(&text, &symbols, l.prev, Some(b.left), &mut heap);
            self.try_bigram(&text, &symbols, Some(b.left), r.next, &mut heap);
        }
        let mut at = Some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                // Merged symbols are always tokens, so this is one character: its bytes.
                None => out.extend(
                    piece
                        .bytes()
                        .filter_map(|b| self.byte_ids[b as usize].or(self.unk)),
                ),
            }
            at = s.next;
        }
    }

    fn try_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let (a, b) = (symbols[l], symbols[r]);
        let piece = &text[a.start..b.start + b.len];
        if let Some(&id) = self.ids.get(piece) {
            if let Some(&score) = self.scores.get(id as usize) {
                heap.push(Bigram {
                    left: l,
                    right: r,
                    score,
                    len: piece.len(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(tokens: &[(&str, f32)]) -> Spm {
        let mut toks: Vec<String> = tokens.iter().map(|t| t.0.to_string()).collect();
        let mut scores: Vec<f32> = tokens.iter().map(|t| t.1).collect();
        for b in 0..=255u8 {
            toks.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
        }
        Spm::new(&toks, scores, None, false)
    }

    #[test]
    fn merges_by_score_then_leftmost() {
        // "abc": "ab" (score 1) beats "bc" (score 0.5); then "abc" is not a token.
        let s = spm(&[("a", 0.0), ("b", 0.0), ("c", 0.0), ("ab", 1.0), ("bc", 0.5)]);
        let mut out = Vec::new();
        s.encode("abc", true, &mut out);
        assert_eq!(out, vec![3, 2]);
        // Equal scores: the leftmost pair merges first.
        let s = spm(&[("a", 0.0), ("ab", 1.0), ("b", 0.0), ("ba", 1.0)]);
        let mut out = Vec::new();
        s.encode("aba", true, &mut out);
        assert_eq!(out, vec![1, 0]);
    }

    #[test]
    fn spaces_become_the_sentencepiece_space_and_unknown_chars_fall_back_to_bytes() {
        let s = spm(&[("▁", 0.0), ("x", 0.0), ("▁x", 2.0), ("▁▁", 1.0)]);
        let mut out = Vec::new();
        s.encode(" x  é", true, &mut out);
        // "▁x" merges; "▁▁" merges; "é" (0xC3 0xA9) is two byte tokens (4 + byte).
        assert_eq!(out, vec![2, 3, 4 + 0xc3, 4 + 0xa9]);
        assert_eq!(Spm::byte_piece("<0x0A>"), Some(10));
        assert_eq!(Spm::byte_piece("<0x0>"), None);
        assert_eq!(Spm::byte_piece("x"), None);
    }

    #[test]
    fn space_prefix_only_when_asked() {
        let mut toks = vec!["▁a".to_string(), "a".to_string(), "▁".to_string()];
        let scores = vec![1.0, 0.0, 0.0];
        let with = Spm::new(&toks, scores.clone(), None, true);
        let mut out = Vec::new();
        with.encode("a", true, &mut out);
        assert_eq!(out, vec![0]);
        out.clear();
        with.encode("a", false, &mut out);
        assert_eq!(out, vec![1]);
        toks.truncate(3);
        let without = Spm::new(&toks, scores, None, false);
        out.clear();
        without.encode("a", true, &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        without.encode("", true, &mut out);
        assert!(out.is_empty());
    }
}
