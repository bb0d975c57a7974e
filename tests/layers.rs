//! The crate's layers import downward only: every `crate::<module>` a top-level module names
//! must sit on a lower layer than the module itself (ARCHITECTURE.md lists the layers). A new
//! upward or sideways import fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, bottom up; modules on one line are one layer and must not import each
/// other.
const LAYERS: &[&[&str]] = &[
    &["error", "progress"],
    &["atomic"],
    &["util"],
    &["gpu", "text", "plot"],
    &["kernels", "nn"],
    &["exec"],
    &["graph"],
    &["cpu", "data"],
    &["models"],
    &["diffusion", "eval", "train"],
    &["world", "demo"],
    &["worker"],
    &["app"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules `src` names after `crate::` (also inside `crate::{a, b::c}`).
fn imports(src: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices("crate::") {
        // `stablerep::crate::` cannot occur; skip `$crate::` in macros.
        if i > 0 && src.as_bytes()[i - 1] == b'$' {
            continue;
        }
        let rest = &src[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut at_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => at_start = true,
                    c if c.is_whitespace() => {}
                    _ if depth == 1 && at_start => {
                        out.insert(ident(&group[j..]));
                        at_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    // `crate::Error` and `crate::Result` are lib.rs's re-exports of `error`'s.
    out.into_iter()
        .map(|m| match m.as_str() {
            "Error" | "Result" => "error".to_string(),
            _ => m,
        })
        .collect()
}

#[test]
fn every_module_imports_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut by_module: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        by_module.entry(module).or_default().extend(imports(&text));
    }
    assert!(by_module.len() >= 15, "{:?}", by_module.keys());
    let mut bad = Vec::new();
    for (module, deps) in &by_module {
        let Some(own) = layer_of(module) else {
            bad.push(format!("{module} is not in LAYERS"));
            continue;
        };
        for d in deps.iter().filter(|d| *d != module) {
            match layer_of(d) {
                Some(l) if l < own => {}
                Some(_) => bad.push(format!("{module} imports {d}, which is not below it")),
                None => bad.push(format!("{module} imports {d}, which is not in LAYERS")),
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_import_scanner_reads_paths_and_groups() {
    let s =
        "use crate::a::b;\nuse crate::{c, d::{e, f}, g};\nmacro_rules! m { () => { $crate::h } }";
    let got: Vec<String> = imports(s).into_iter().collect();
    assert_eq!(got, ["a", "c", "d", "g"]);
}
