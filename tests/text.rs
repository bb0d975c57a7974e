//! The CLIP tokenizer against token ids from open_clip's reference tokenizer
//! (`tools/make_fixtures.py`, `tests/fixtures/clip_tokens.json`).

use stablerep::text::tokenizer::{Tokenizer, CONTEXT};

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn matches_reference_tokenizer() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/clip_tokens.json"
    );
    let cases: Vec<Case> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    let tok = Tokenizer::clip();
    let mut wrong = Vec::new();
    for c in &cases {
        let got = tok.tokenize(&c.text, CONTEXT, 0);
        if got != c.ids {
            wrong.push(format!(
                "{:?}\n  want {:?}\n  got  {:?}",
                c.text, c.ids, got
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
