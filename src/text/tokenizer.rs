//! OpenAI CLIP's byte-level BPE tokenizer (49,408 ids), as `clip.tokenize` runs it for
//! StableRep+ and as Stable Diffusion's text encoder expects. The merge table ships in
//! `assets/clip/merges.txt` (the first 48,894 merges of `bpe_simple_vocab_16e6.txt`) and is
//! compiled into the binary.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use unicode_normalization::UnicodeNormalization;

use super::clean::clean;
use crate::error::{Error, Result};

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

/// How text is cleaned before pre-tokenization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// OpenAI's `clip.tokenize` / open_clip: ftfy-style fixes, HTML entities unescaped twice,
    /// whitespace collapsed and trimmed, lower case (StableRep+).
    OpenClip,
    /// transformers' CLIP tokenizer, as Stable Diffusion pipelines run it: NFC, every whitespace
    /// run to one space, lower case.
    Transformers,
}

/// The tokenizer: byte table, merge ranks, the string-to-id map and the cleaning rule.
pub struct Tokenizer {
    byte_char: [char; 256],
    ranks: HashMap<(String, String), u32>,
    ids: HashMap<String, u32>,
    norm: Normalization,
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

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.ids.len())
            .field("merges", &self.ranks.len())
            .field("normalization", &self.norm)
            .finish()
    }
}

impl Tokenizer {
    /// The shared tokenizer built from the shipped merge table.
    pub fn clip() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::from_merges(MERGES, Normalization::OpenClip))
    }

    /// The shipped vocabulary with transformers' normalization: Stable Diffusion's tokenizer
    /// when a model folder has no `tokenizer/` files.
    pub fn clip_transformers() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::from_merges(MERGES, Normalization::Transformers))
    }

    /// An owned copy of [`Tokenizer::clip_transformers`] (for models that keep their tokenizer).
    pub fn from_merges_transformers() -> Tokenizer {
        Tokenizer::from_merges(MERGES, Normalization::Transformers)
    }

    /// Reads a diffusers/transformers `vocab.json` and `merges.txt` (transformers'
    /// normalization). Fails with the file's name when a file is missing or malformed, or when
    /// the vocabulary lacks a merge result, a byte symbol or the special tokens.
    pub fn from_files(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| Error::Io {
                path: p.display().to_string(),
                source: e,
            })
        };
        let (vt, mt) = (read(vocab)?, read(merges)?);
        let ids: HashMap<String, u32> = serde_json::from_str(&vt).map_err(|e| {
            Error::Config(format!(
                "{}: not a token -> id JSON map: {e}",
                vocab.display()
            ))
        })?;
        let byte_char = bytes_to_unicode();
        let mut ranks = HashMap::new();
        for (rank, line) in mt.lines().skip(1).take(N_MERGES).enumerate() {
            if line.is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                Error::Config(format!(
                    "{}: line {} is not a merge 'a b': {line:?}",
                    merges.display(),
                    rank + 2
                ))
            })?;
            if !ids.contains_key(&format!("{a}{b}")) {
                return Err(Error::Config(format!(
                    "{}: merge '{a} {b}' (line {}) has no entry in {}",
                    merges.display(),
                    rank + 2,
                    vocab.display()
                )));
            }
            ranks.insert((a.to_string(), b.to_string()), rank as u32);
        }
        for c in byte_char.iter() {
            for s in [c.to_string(), format!("{c}</w>")] {
                if !ids.contains_key(&s) {
                    return Err(Error::Config(format!(
                        "{}: the byte symbol {s:?} is missing",
                        vocab.display()
                    )));
                }
            }
        }
        for (name, want) in [("<|startoftext|>", SOT), ("<|endoftext|>", EOT)] {
            match ids.get(name) {
                Some(&id) if id == want => {}
                got => {
                    return Err(Error::Config(format!(
                        "{}: {name} must have id {want} (CLIP), found {got:?}",
                        vocab.display()
                    )))
                }
            }
        }
        Ok(Tokenizer {
            byte_char,
            ranks,
            ids,
            norm: Normalization::Transformers,
        })
    }

    /// The cleaning rule in use.
    pub fn normalization(&self) -> Normalization {
        self.norm
    }

    /// Builds a tokenizer from merges text (a header line, then "a b" per line).
    fn from_merges(text: &str, norm: Normalization) -> Tokenizer {
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
            norm,
        }
    }

    /// The vocabulary as transformers' `vocab.json` (token -> id).
    pub fn vocab_json(&self) -> String {
        let sorted: std::collections::BTreeMap<&String, &u32> = self.ids.iter().collect();
        serde_json::to_string(&sorted).unwrap_or_default()
    }

    /// The shipped merge table as transformers' `merges.txt` (a header, then the first
    /// 48,894 merges of CLIP's BPE).
    pub fn merges_text() -> &'static str {
        MERGES
    }

    /// Vocabulary size (49,408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.ids.len()
    }

    /// BPE ids of `text` after cleaning, without start/end tokens.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let cleaned = match self.norm {
            Normalization::OpenClip => clean(text),
            Normalization::Transformers => {
                let nfc: String = text.nfc().collect();
                nfc.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_lowercase()
            }
        };
        for piece in pre_tokenize(&cleaned) {
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
        self.tokenize_checked(text, context, pad).0
    }

    /// [`Tokenizer::tokenize`], also saying whether the text was cut to fit `context`.
    pub fn tokenize_checked(&self, text: &str, context: usize, pad: u32) -> (Vec<u32>, bool) {
        let mut ids = vec![SOT];
        ids.extend(self.encode(text));
        ids.push(EOT);
        let cut = ids.len() > context;
        if cut {
            ids.truncate(context);
            if let Some(last) = ids.last_mut() {
                *last = EOT;
            }
        }
        ids.resize(context, pad);
        (ids, cut)
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

/// Unicode letters (`\p{L}`, general category L*): alphabetic characters less the ones
/// Unicode counts as alphabetic without being letters: numbers, combining marks (Devanagari
/// vowel signs...) and the circled / squared Latin letters (category So).
fn is_letter(c: char) -> bool {
    c.is_alphabetic()
        && !c.is_numeric()
        && !unicode_normalization::char::is_combining_mark(c)
        && !matches!(c, '\u{24b6}'..='\u{24e9}' | '\u{1f130}'..='\u{1f149}' | '\u{1f150}'..='\u{1f169}' | '\u{1f170}'..='\u{1f189}')
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
