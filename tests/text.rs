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

#[derive(serde::Deserialize)]
struct SdFixture {
    cases: Vec<Case>,
}

fn sd_cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd_tokens.json");
    let f: SdFixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(f.cases.len() >= 300);
    f.cases
}

fn check_sd(tok: &Tokenizer) {
    let mut wrong = Vec::new();
    for c in sd_cases() {
        let (got, cut) = tok.tokenize_checked(&c.text, CONTEXT, stablerep::text::tokenizer::EOT);
        if got != c.ids {
            wrong.push(format!(
                "{:?}\n  want {:?}\n  got  {:?}",
                c.text, c.ids, got
            ));
        }
        // Cut exactly when the sequence ends in EOT without padding after it.
        let ends_full = c.ids[CONTEXT - 2] != stablerep::text::tokenizer::EOT;
        assert_eq!(
            cut,
            ends_full && tok.encode(&c.text).len() > CONTEXT - 2,
            "{:?}",
            c.text
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of the prompts differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Writes vocab.json and merges.txt as diffusers' `tokenizer/` folder holds them, rebuilt from
/// the shipped merge table (shared/spec/stable-diffusion.md section 1.2).
fn write_tokenizer_files(dir: &std::path::Path) {
    let merges_text = include_str!("../assets/clip/merges.txt");
    let merges: Vec<&str> = merges_text.lines().skip(1).take(48_894).collect();
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut bs: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut vocab: Vec<String> = cs
        .iter()
        .map(|&c| char::from_u32(c).unwrap().to_string())
        .collect();
    let ends: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
    vocab.extend(ends);
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, v)| (v, serde_json::Value::from(i)))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map).unwrap()).unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
}

#[test]
fn stable_diffusion_tokenizer_matches_transformers() {
    check_sd(Tokenizer::clip_transformers());
}

#[test]
fn tokenizer_files_from_a_model_folder_load_and_match() {
    let dir = std::env::temp_dir().join(format!("stablerep-tok-{}", std::process::id()));
    write_tokenizer_files(&dir);
    let tok = Tokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    assert_eq!(tok.vocab_size(), 49_408);
    check_sd(&tok);
    // Broken folders are clear errors that name the file.
    let e = Tokenizer::from_files(&dir.join("nope.json"), &dir.join("merges.txt")).unwrap_err();
    assert!(e.to_string().contains("nope.json"), "{e}");
    std::fs::write(dir.join("bad.json"), "{\"a\": 1,").unwrap();
    let e = Tokenizer::from_files(&dir.join("bad.json"), &dir.join("merges.txt")).unwrap_err();
    assert!(e.to_string().contains("bad.json"), "{e}");
    let text = std::fs::read_to_string(dir.join("vocab.json")).unwrap();
    std::fs::write(
        dir.join("nospecial.json"),
        text.replace("<|endoftext|>", "<|end|>"),
    )
    .unwrap();
    let e =
        Tokenizer::from_files(&dir.join("nospecial.json"), &dir.join("merges.txt")).unwrap_err();
    assert!(e.to_string().contains("<|endoftext|>"), "{e}");
    std::fs::write(dir.join("odd.txt"), "#version: 0.2\nzz qq\n").unwrap();
    let e = Tokenizer::from_files(&dir.join("vocab.json"), &dir.join("odd.txt")).unwrap_err();
    assert!(
        e.to_string().contains("zz qq") && e.to_string().contains("odd.txt"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
