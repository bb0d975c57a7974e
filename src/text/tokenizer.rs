//! OpenAI CLIP's byte-level BPE tokenizer (49,408 ids), as `clip.tokenize` runs it for
//! StableRep+ and as Stable Diffusion's text encoder expects. The merge table ships in
//! `assets/clip/merges.txt` (the first 48,894 merges of `bpe_simple_vocab_16e6.txt`) and is
//! compiled into the binary.

use std::collections::HashMap;
use std::sync::OnceLock;

use super::clean::clean;

/// The merge table shipped with the crate.
const MERGES: &str = include_str!("../../assets/clip/merges.txt");
/// Number of merges CLIP uses.
const N_MERGES: usize = 48_894;
/// Start-of-text id.
pub const SOT: u32 = 49_406;
/// End-of-text id.
pub const EOT: u32 = 49_407;
/// Vocabulary size.
pub const VOCAB: usize = 49_408;
/// CLIP's context length.
pub const CONTEXT: usize = 77;

/// The tokenizer: byte table, merge ranks and the string-to-id map.
pub struct Tokenizer {
    byte_char: [char; 256],
    ranks: HashMap<(String, String), u32>,
    ids: HashMap<String, u32>,
}

/// GPT-2's reversible byte-to-character table: printable Latin-1 bytes map to themselves, the
/// rest to code points from 256 up.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('\0')
        };
    }
    table
}

impl Tokenizer {
    /// The shared tokenizer built from the shipped merge table.
    pub fn clip() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::from_merges(MERGES))
    }

    /// Builds a tokenizer from merges text (a header line, then "a b" per line).
    fn from_merges(text: &str) -> Tokenizer {
        let byte_char = bytes_to_unicode();
        // Vocabulary order: the 256 byte symbols in byte-table order (printable first, as
        // CLIP lists them), the same with `</w>`, one entry per merge, then the specials.
        let mut order: Vec<u32> = (0..256u32)
            .filter(|&b| byte_char[b as usize] as u32 == b)
            .collect();
        order.extend((0..256u32).filter(|&b| byte_char[b as usize] as u32 != b));
        let mut vocab: Vec<String> = order
            .iter()
            .map(|&b| byte_char[b as usize].to_string())
            .collect();
        let with_end: Vec<String> = vocab.iter().map(|s| format!("{s}</w>")).collect();
        vocab.extend(with_end);
        let mut ranks = HashMap::with_capacity(N_MERGES);
        for (rank, line) in text.lines().skip(1).take(N_MERGES).enumerate() {
            if let Some((a, b)) = line.split_once(' ') {
                vocab.push(format!("{a}{b}"));
                ranks.insert((a.to_string(), b.to_string()), rank as u32);
            }
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let ids = vocab
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as u32))
            .collect();
        Tokenizer {
            byte_char,
            ranks,
            ids,
        }
    }

    /// Vocabulary size (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.ids.len()
    }

    /// BPE ids of `text` after cleaning, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for piece in pre_tokenize(&clean(text)) {
            match piece {
                Piece::Special(id) => out.push(id),
                Piece::Text(t) => self.bpe(t, &mut out),
            }
        }
        out
    }

    /// `[SOT] + ids + [EOT]`, truncated to `context` (the last kept id becomes EOT), padded
    /// with `pad` (0 as `clip.tokenize` does; Stable Diffusion pads with EOT).
    pub fn tokenize(&self, text: &str, context: usize, pad: u32) -> Vec<u32> {
        let mut ids = vec![SOT];
        ids.extend(self.encode(text));
        ids.push(EOT);
        if ids.len() > context {
            ids.truncate(context);
            if let Some(last) = ids.last_mut() {
                *last = EOT;
            }
        }
        ids.resize(context, pad);
        ids
    }

    /// Merges one pre-token's symbols by rank and appends their ids.
    fn bpe(&self, token: &str, out: &mut Vec<u32>) {
        let mut word: Vec<String> = token
            .bytes()
            .map(|b| self.byte_char[b as usize].to_string())
            .collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())))
                .min()
                .copied();
            let Some(rank) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len()
                    && self.ranks.get(&(word[i].clone(), word[i + 1].clone())) == Some(&rank)
                {
                    merged.push(format!("{}{}", word[i], word[i + 1]));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        // Every symbol is a byte character or a merge result, so it is in the vocabulary.
        out.extend(word.iter().filter_map(|s| self.ids.get(s)));
    }
}

/// One match of CLIP's pre-tokenization pattern.
enum Piece<'a> {
    /// A literal `<|startoftext|>` / `<|endoftext|>`.
    Special(u32),
    /// A run to byte-encode and merge.
    Text(&'a str),
}

/// Unicode letters (`\p{L}`): alphabetic characters that are not numbers.
fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}

/// Splits cleaned text by CLIP's pattern
/// `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
/// (alternatives tried in order at each position; whitespace between matches is dropped).
fn pre_tokenize(text: &str) -> Vec<Piece<'_>> {
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(c) = text[i..].chars().next() {
        let rest = &text[i..];
        let len = if rest.starts_with("<|startoftext|>") {
            out.push(Piece::Special(SOT));
            i += "<|startoftext|>".len();
            continue;
        } else if rest.starts_with("<|endoftext|>") {
            out.push(Piece::Special(EOT));
            i += "<|endoftext|>".len();
            continue;
        } else if let Some(m) = CONTRACTIONS.iter().find(|m| rest.starts_with(**m)) {
            m.len()
        } else if is_letter(c) {
            run_len(rest, is_letter)
        } else if c.is_numeric() {
            c.len_utf8()
        } else if c.is_whitespace() {
            i += c.len_utf8();
            continue;
        } else {
            run_len(rest, |c| {
                !c.is_whitespace() && !is_letter(c) && !c.is_numeric()
            })
        };
        out.push(Piece::Text(&rest[..len]));
        i += len;
    }
    out
}

/// Byte length of the leading run of characters satisfying `f`.
fn run_len(s: &str, f: impl Fn(char) -> bool) -> usize {
    s.char_indices()
        .find(|&(_, c)| !f(c))
        .map_or(s.len(), |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_prompts() {
        let t = Tokenizer::clip();
        assert_eq!(t.vocab_size(), VOCAB);
        assert_eq!(
            t.tokenize("a photo of a cat", 9, 0),
            [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0]
        );
        let long = t.tokenize(&"dog ".repeat(100), CONTEXT, 0);
        assert_eq!((long.len(), long[0], long[76]), (77, SOT, EOT));
    }
}
