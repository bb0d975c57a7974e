//! Caption cleaning before CLIP tokenization, as OpenAI's `clip.tokenize` does it:
//! `ftfy.fix_text`, HTML unescaping (twice), whitespace collapsing and lower-casing.
//!
//! Of ftfy's fixes this implements the ones that change ordinary captions: NFC normalization,
//! curly quotes to straight ones, Latin ligatures, full-width ASCII, control and format
//! characters removed. It does not repair mojibake (UTF-8 decoded as Latin-1 and the like).
//! HTML entities: numeric ones and the common named ones (see [`NAMED`]); a rare named entity
//! is left as written.

use unicode_normalization::UnicodeNormalization;

/// Named HTML entities decoded by [`unescape_html`], with the character they stand for.
pub const NAMED: &[(&str, &str)] = &[
    ("amp", "&"),
    ("lt", "<"),
    ("gt", ">"),
    ("quot", "\""),
    ("apos", "'"),
    ("nbsp", "\u{a0}"),
    ("copy", "\u{a9}"),
    ("reg", "\u{ae}"),
    ("trade", "\u{2122}"),
    ("hellip", "\u{2026}"),
    ("mdash", "\u{2014}"),
    ("ndash", "\u{2013}"),
    ("lsquo", "\u{2018}"),
    ("rsquo", "\u{2019}"),
    ("ldquo", "\u{201c}"),
    ("rdquo", "\u{201d}"),
    ("laquo", "\u{ab}"),
    ("raquo", "\u{bb}"),
    ("deg", "\u{b0}"),
    ("middot", "\u{b7}"),
    ("times", "\u{d7}"),
    ("divide", "\u{f7}"),
    ("bull", "\u{2022}"),
    ("euro", "\u{20ac}"),
    ("pound", "\u{a3}"),
    ("yen", "\u{a5}"),
    ("cent", "\u{a2}"),
    ("sect", "\u{a7}"),
    ("para", "\u{b6}"),
    ("eacute", "\u{e9}"),
    ("egrave", "\u{e8}"),
    ("aacute", "\u{e1}"),
    ("agrave", "\u{e0}"),
    ("ouml", "\u{f6}"),
    ("uuml", "\u{fc}"),
    ("auml", "\u{e4}"),
    ("szlig", "\u{df}"),
    ("ntilde", "\u{f1}"),
    ("ccedil", "\u{e7}"),
];

/// Entities Python's `html.unescape` also accepts without the closing semicolon.
const LEGACY: &[&str] = &["amp", "lt", "gt", "quot", "nbsp", "copy", "reg"];

/// Decodes HTML character references (`&amp;`, `&#233;`, `&#xE9;`) like Python's
/// `html.unescape` for the entities in [`NAMED`]; anything else is kept verbatim.
pub fn unescape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        match decode_entity(tail) {
            Some((text, used)) => {
                out.push_str(&text);
                rest = &tail[used..];
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decodes the reference at the start of `t` (after the `&`): the text and bytes consumed.
fn decode_entity(t: &str) -> Option<(String, usize)> {
    if let Some(num) = t.strip_prefix('#') {
        let (hex, digits) = match num.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, num),
        };
        let len = digits
            .chars()
            .take_while(|c| {
                if hex {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
            .count();
        if len == 0 {
            return None;
        }
        let value = u32::from_str_radix(&digits[..len], if hex { 16 } else { 10 }).ok()?;
        let c = match value {
            0 | 0xd800..=0xdfff => '\u{fffd}',
            v => char::from_u32(v).unwrap_or('\u{fffd}'),
        };
        let mut used = 1 + usize::from(hex) + len;
        if t[used..].starts_with(';') {
            used += 1;
        }
        return Some((c.to_string(), used));
    }
    let len = t.chars().take_while(|c| c.is_ascii_alphanumeric()).count();
    let name = &t[..len];
    let (_, text) = NAMED.iter().find(|(n, _)| *n == name)?;
    if t[len..].starts_with(';') {
        Some((text.to_string(), len + 1))
    } else if LEGACY.contains(&name) {
        Some((text.to_string(), len))
    } else {
        None
    }
}

/// The subset of `ftfy.fix_text` described in the module docs.
pub fn fix_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.nfc() {
        match c {
            '\u{2018}'..='\u{201b}' | '\u{2bc}' => out.push('\''),
            '\u{201c}'..='\u{201f}' => out.push('"'),
            '\u{fb00}' => out.push_str("ff"),
            '\u{fb01}' => out.push_str("fi"),
            '\u{fb02}' => out.push_str("fl"),
            '\u{fb03}' => out.push_str("ffi"),
            '\u{fb04}' => out.push_str("ffl"),
            '\u{fb05}' | '\u{fb06}' => out.push_str("st"),
            '\u{ff01}'..='\u{ff5e}' => {
                out.push(char::from_u32(c as u32 - 0xff01 + 0x21).unwrap_or(c));
            }
            '\u{3000}' => out.push(' '),
            '\r' | '\u{2028}' | '\u{2029}' | '\u{85}' => out.push('\n'),
            c if is_removed_control(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// Control and format characters ftfy's `remove_control_chars` deletes.
fn is_removed_control(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
        | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e007f}')
}

/// The whole pipeline of `clip.tokenize`'s cleaning: fix, unescape twice, collapse
/// whitespace, trim, lower-case.
pub fn clean(s: &str) -> String {
    let fixed = unescape_html(&unescape_html(&fix_text(s)));
    let collapsed = fixed.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_quotes_and_spaces() {
        assert_eq!(clean("  Tom &amp;amp; Jerry\t\n&#233;T "), "tom & jerry ét");
        assert_eq!(clean("it\u{2019}s \u{201c}fine\u{201d}"), "it's \"fine\"");
        assert_eq!(clean("\u{fb01}ne\u{ff21}\u{3000}x"), "finea x");
        assert_eq!(clean("e\u{301}"), "\u{e9}");
        assert_eq!(
            unescape_html("a &amp b &#x41; &bogus; &"),
            "a & b A &bogus; &"
        );
    }
}
