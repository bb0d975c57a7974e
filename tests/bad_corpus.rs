//! A corpus of bad inputs run against the binary: broken and truncated safetensors and configs,
//! corrupt and mislabelled images, odd captions files, impossible shards, non-finite and
//! out-of-range numbers for the numeric flags of every command, unwritable and occupied output
//! paths, wrong tensors. Each must end in a non-zero exit (not a signal) within a time limit,
//! with a message that names the file or flag, and never a panic. Valid odd inputs (small,
//! grayscale, RGBA and 16-bit images; empty and exotic prompts; long captions) must work.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stablerep::nn::checkpoint::{Checkpoint, HostTensor};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stablerep"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Runs `args` with a time limit: (exit code, or None for a signal / time-out; stdout + stderr).
fn run(args: &[String], limit: Duration) -> (Option<i32>, String) {
    let mut child = bin().args(args).spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (st.code(), text);
        }
        if t0.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            return (None, format!("no exit within {limit:?} (a hang)"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Shared valid inputs the cases corrupt one at a time.
struct Base {
    dir: PathBuf,
    pool: PathBuf,
    folder: PathBuf,
    ck: PathBuf,
    model: PathBuf,
}

fn s(v: &str) -> String {
    v.to_string()
}

fn p(v: &Path) -> String {
    v.display().to_string()
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn setup(name: &str) -> Base {
    let dir = std::env::temp_dir().join(format!("stablerep-corpus-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A tiny pool (4 captions x 2 images of 32 pixels) from the mini-world.
    let pool = dir.join("pool");
    let (code, out) = run(
        &[
            s("world"),
            s("--out"),
            p(&pool),
            s("--captions"),
            s("4"),
            s("--images-per-caption"),
            s("2"),
            s("--size"),
            s("32"),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{out}");
    // A labelled folder: two classes of two images.
    let folder = dir.join("folder");
    for (c, v) in [("a", 0.2f32), ("b", 0.8)] {
        for i in 0..2 {
            let img = vec![v + 0.05 * i as f32; 3 * 40 * 40];
            stablerep::util::image::save_rgb(
                &folder.join(c).join(format!("{i}.png")),
                40,
                40,
                &img,
            )
            .unwrap();
        }
    }
    // The tiny timm ViT's encoder (32 px, width 32, head dim 16).
    let fx = Checkpoint::load(&root().join("tests/fixtures/vit_tiny.safetensors")).unwrap();
    let mut ck = Checkpoint::default();
    for (k, t) in &fx.tensors {
        if k.starts_with("visual.") {
            ck.tensors.insert(k.clone(), t.clone());
        }
    }
    let ckp = dir.join("ck.safetensors");
    ck.save(&ckp).unwrap();
    let model = root().join("assets/world-sd");
    Base {
        dir,
        pool,
        folder,
        ck: ckp,
        model,
    }
}

/// A ViT small enough for the 16-pixel training cases.
fn tiny_model() -> Vec<String> {
    [
        "--img-size",
        "16",
        "--patch",
        "8",
        "--width",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
    ]
    .map(s)
    .to_vec()
}

/// A case: arguments, and a text the output must contain (the file or flag it is about).
struct Case {
    name: String,
    args: Vec<String>,
    names: String,
}

fn case(name: &str, args: Vec<String>, names: &str) -> Case {
    Case {
        name: name.into(),
        args,
        names: names.into(),
    }
}

/// Numeric flags of every command with values they must refuse.
fn numeric_cases(b: &Base) -> Vec<Case> {
    let out = p(&b.dir.join("out"));
    let gen = |flag: &str, v: &str| {
        let mut a = vec![s("generate"), s("--model"), p(&b.model), s("--prompt")];
        a.extend([s("a red circle"), s("--out"), out.clone(), s(flag), s(v)]);
        if flag == "--eta" {
            a.extend([s("--sampler"), s("ddim")]);
        }
        a
    };
    let train = |flag: &str, v: &str| {
        let mut a = vec![s("train"), s("--pool"), p(&b.pool), s("--out"), out.clone()];
        for (f, dv) in [
            ("--captions-per-batch", "2"),
            ("--images-per-caption", "2"),
            ("--img-size", "16"),
            ("--patch", "8"),
            ("--width", "16"),
            ("--depth", "1"),
            ("--heads", "2"),
            ("--steps", "2"),
        ] {
            if f != flag {
                a.extend([s(f), s(dv)]);
            }
        }
        a.extend([s(flag), s(v)]);
        a
    };
    let probe = |flag: &str, v: &str, method: &str| {
        let mut a = vec![
            s("probe"),
            s("--checkpoint"),
            p(&b.ck),
            s("--head-dim"),
            s("16"),
        ];
        a.extend([s("--test"), p(&b.folder), s("--train"), p(&b.folder)]);
        a.extend([s("--method"), s(method), s(flag), s(v)]);
        a
    };
    let world = |flag: &str, v: &str| {
        let mut a = vec![s("world"), s("--out"), out.clone()];
        if flag != "--captions" {
            a.extend([s("--captions"), s("2")]);
        }
        a.extend([s(flag), s(v)]);
        a
    };
    let demo = |flag: &str, v: &str| {
        vec![
            s("demo"),
            s("--quick"),
            s("--out"),
            out.clone(),
            s(flag),
            s(v),
        ]
    };
    let fid = |flag: &str, v: &str| {
        vec![
            s("fidelity"),
            s("--captions"),
            s("2"),
            s("--model"),
            p(&b.model),
            s(flag),
            s(v),
        ]
        .into_iter()
        .enumerate()
        .filter(|(i, x)| !(flag == "--captions" && (*i == 1 || (*i == 2 && x == "2"))))
        .map(|(_, x)| x)
        .collect::<Vec<_>>()
    };
    let engine = |flag: &str, v: &str| vec![s("engine-demo"), s(flag), s(v)];
    let mut cases = Vec::new();
    for (f, vals) in [
        ("--guidance", &["nan", "inf", "-inf"][..]),
        ("--steps", &["0", "-3", "x"][..]),
        ("--size", &["0", "13", "1000000"][..]),
        ("--save-size", &["0"][..]),
        ("--images-per-prompt", &["0"][..]),
        ("--eta", &["nan", "-1", "2"][..]),
        ("--seed", &["-1", "1e3"][..]),
        ("--shard", &["2/2", "0/0", "a/b", "-1/2", "1"][..]),
    ] {
        for v in vals {
            let flag = if f == "--shard" { "--shard" } else { f };
            let mut a = gen(flag, v);
            if f == "--shard" {
                // --shard is read with --captions.
                let caps = write(&b.dir.join("caps.txt"), b"a red circle\n");
                let i = a.iter().position(|x| x == "--prompt").unwrap();
                a[i] = s("--captions");
                a[i + 1] = p(&caps);
            }
            cases.push(case(&format!("generate {f} {v}"), a, f));
        }
    }
    for (f, vals) in [
        ("--lr", &["nan", "inf", "-1", "0"][..]),
        ("--blr", &["nan", "-1"][..]),
        ("--temperature", &["0", "nan", "-0.1", "inf"][..]),
        ("--weight-decay", &["nan", "-1", "inf"][..]),
        ("--epochs", &["nan", "0", "-1", "inf"][..]),
        ("--steps", &["0"][..]),
        ("--captions-per-batch", &["0", "1000"][..]),
        ("--images-per-caption", &["0", "1", "3"][..]),
        ("--img-size", &["0", "12"][..]),
        ("--patch", &["0", "5"][..]),
        ("--width", &["0", "15"][..]),
        ("--depth", &["0"][..]),
        ("--heads", &["0", "3"][..]),
        ("--head-hidden", &["0"][..]),
        ("--head-out", &["0"][..]),
        ("--checkpoint-every", &["0"][..]),
        ("--log-every", &["0"][..]),
        ("--source-size", &["0", "8"][..]),
    ] {
        for v in vals {
            cases.push(case(&format!("train {f} {v}"), train(f, v), f));
        }
    }
    for (f, vals, m) in [
        ("--k", &["0", "-1"][..], "knn"),
        ("--temperature", &["0", "nan", "-1", "inf"][..], "knn"),
        ("--ways", &["0", "1", "3"][..], "fewshot"),
        ("--shots", &["0", "5"][..], "fewshot"),
        ("--queries", &["0"][..], "fewshot"),
        ("--episodes", &["0"][..], "fewshot"),
        ("--epochs", &["0"][..], "linear"),
        ("--batch-size", &["0"][..], "linear"),
        ("--head-dim", &["0", "7"][..], "knn"),
    ] {
        for v in vals {
            cases.push(case(&format!("probe {m} {f} {v}"), probe(f, v, m), f));
        }
    }
    for (f, vals) in [
        ("--captions", &["0"][..]),
        ("--images-per-caption", &["0"][..]),
        ("--size", &["0", "3", "100000"][..]),
    ] {
        for v in vals {
            cases.push(case(&format!("world {f} {v}"), world(f, v), f));
        }
    }
    for (f, vals) in [
        ("--guidance", &["nan", "inf"][..]),
        ("--images-per-caption", &["0", "1"][..]),
        ("--captions", &["0", "1"][..]),
        ("--steps", &["0"][..]),
        ("--views", &["0", "7", "6", "1000"][..]),
        ("--stem", &["patchy"][..]),
        ("--init", &["timm", ""][..]),
    ] {
        for v in vals {
            cases.push(case(&format!("demo {f} {v}"), demo(f, v), f));
        }
    }
    for (f, vals) in [
        ("--guidance", &["nan", "inf"][..]),
        ("--steps", &["0"][..]),
        ("--captions", &["0"][..]),
        ("--images-per-caption", &["0", "1"][..]),
    ] {
        for v in vals {
            cases.push(case(&format!("fidelity {f} {v}"), fid(f, v), f));
        }
    }
    for (f, vals) in [
        ("--steps", &["0"][..]),
        ("--hidden", &["0"][..]),
        ("--lr", &["nan", "-1", "inf"][..]),
    ] {
        for v in vals {
            cases.push(case(&format!("engine-demo {f} {v}"), engine(f, v), f));
        }
    }
    cases
}

/// A safetensors file whose header is `header` followed by `data`.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

/// Broken files for every command that reads one.
fn file_cases(b: &Base) -> Vec<Case> {
    let d = b.dir.join("files");
    let valid = std::fs::read(&b.ck).unwrap();
    let bad_st: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("four bytes", vec![1, 2, 3, 4]),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("header length past the end", {
            let mut v = valid.clone();
            v[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            v
        }),
        ("header not JSON", safetensors_bytes("{not json", &[])),
        (
            "offsets past the data",
            safetensors_bytes(
                r#"{"visual.cls_token":{"dtype":"F32","shape":[1,1,32],"data_offsets":[0,128]}}"#,
                &[0; 16],
            ),
        ),
        (
            "shape and bytes disagree",
            safetensors_bytes(
                r#"{"visual.cls_token":{"dtype":"F32","shape":[1,1,32],"data_offsets":[0,16]}}"#,
                &[0; 16],
            ),
        ),
        (
            "unsupported dtype",
            safetensors_bytes(
                r#"{"visual.cls_token":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        (
            "no encoder tensors",
            safetensors_bytes(
                r#"{"other":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        (
            "a shape whose product overflows",
            safetensors_bytes(
                r#"{"visual.cls_token":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
        (
            "negative shape",
            safetensors_bytes(
                r#"{"visual.cls_token":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
        ),
    ];
    let mut cases = Vec::new();
    for (i, (what, bytes)) in bad_st.iter().enumerate() {
        let f = write(&d.join(format!("st{i}.safetensors")), bytes);
        let name = p(&f);
        cases.push(case(
            &format!("embed --checkpoint {what}"),
            vec![
                s("embed"),
                s("--checkpoint"),
                name.clone(),
                s("--images"),
                p(&b.folder.join("a/0.png")),
                s("--out"),
                p(&d.join("f.safetensors")),
            ],
            &name,
        ));
        cases.push(case(
            &format!("probe --checkpoint {what}"),
            vec![
                s("probe"),
                s("--checkpoint"),
                name.clone(),
                s("--test"),
                p(&b.folder),
                s("--train"),
                p(&b.folder),
            ],
            &name,
        ));
        cases.push(case(
            &format!("train --init {what}"),
            vec![
                s("train"),
                s("--pool"),
                p(&b.pool),
                s("--init"),
                name.clone(),
                s("--captions-per-batch"),
                s("2"),
                s("--images-per-caption"),
                s("2"),
                s("--out"),
                p(&d.join("t")),
            ],
            &name,
        ));
        cases.push(case(
            &format!("embed --input-tensor {what}"),
            vec![
                s("embed"),
                s("--checkpoint"),
                p(&b.ck),
                s("--input-tensor"),
                name.clone(),
                s("--out"),
                p(&d.join("f.safetensors")),
            ],
            &name,
        ));
    }
    // Wrong tensors where a specific one is expected.
    let mut wrong = Checkpoint::default();
    wrong.tensors.insert(
        "latents".into(),
        HostTensor {
            shape: vec![1, 4, 3, 3],
            data: vec![0.0; 36],
        },
    );
    let wrong_latents = d.join("latents.safetensors");
    wrong.save(&wrong_latents).unwrap();
    cases.push(case(
        "generate --init-noise wrong shape",
        vec![
            s("generate"),
            s("--model"),
            p(&b.model),
            s("--prompt"),
            s("x"),
            s("--out"),
            p(&d.join("g")),
            s("--init-noise"),
            p(&wrong_latents),
        ],
        "latents",
    ));
    cases.push(case(
        "embed --input-tensor without images",
        vec![
            s("embed"),
            s("--checkpoint"),
            p(&b.ck),
            s("--input-tensor"),
            p(&wrong_latents),
            s("--out"),
            p(&d.join("f.safetensors")),
        ],
        "images",
    ));
    let fx = Checkpoint::load(&root().join("tests/fixtures/train_step.safetensors")).unwrap();
    let mut init = Checkpoint::default();
    for (k, t) in &fx.tensors {
        if let Some(k) = k.strip_prefix("before.") {
            init.tensors.insert(k.to_string(), t.clone());
        }
    }
    let init_path = d.join("init.safetensors");
    init.save(&init_path).unwrap();
    cases.push(case(
        "train --fixed-batch without images",
        vec![
            s("train"),
            s("--fixed-batch"),
            p(&wrong_latents),
            s("--init"),
            p(&init_path),
            s("--head-dim"),
            s("16"),
            s("--no-augment"),
            s("--captions-per-batch"),
            s("2"),
            s("--images-per-caption"),
            s("2"),
            s("--out"),
            p(&d.join("t")),
        ],
        "images",
    ));
    // Broken model folders: each part's config and weights.
    for (part, file) in [
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("scheduler", "scheduler_config.json"),
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ] {
        let originals = std::fs::read(b.model.join(part).join(file)).unwrap();
        let json = file.ends_with(".json");
        let variants: Vec<(&str, Vec<u8>)> = if json {
            let text = String::from_utf8(originals.clone()).unwrap();
            let mut v = vec![
                ("empty", vec![]),
                ("not JSON", b"{ this is not json".to_vec()),
                ("a list", b"[1, 2, 3]".to_vec()),
            ];
            // Wrong types and impossible sizes in the real config.
            let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
            for key in [
                "block_out_channels",
                "in_channels",
                "hidden_size",
                "num_attention_heads",
                "num_train_timesteps",
                "layers_per_block",
                "beta_start",
            ] {
                if cfg.get(key).is_some() {
                    for bad in [
                        serde_json::json!("wide"),
                        serde_json::json!(-1),
                        serde_json::json!(0),
                        serde_json::json!([]),
                        serde_json::json!(1u64 << 40),
                        serde_json::json!([1u64 << 40, 1u64 << 40]),
                    ] {
                        let mut c = cfg.clone();
                        c[key] = bad.clone();
                        let label: &'static str =
                            Box::leak(format!("{key} = {bad}").into_boxed_str());
                        v.push((label, c.to_string().into_bytes()));
                    }
                }
            }
            v
        } else {
            vec![
                ("empty", vec![]),
                ("truncated", originals[..originals.len() / 3].to_vec()),
            ]
        };
        for (what, bytes) in variants {
            let m = d.join(format!(
                "model-{part}-{}",
                what.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            ));
            if !m.exists() {
                copy_dir(&b.model, &m);
            }
            write(&m.join(part).join(file), &bytes);
            cases.push(case(
                &format!("generate with {part}/{file} {what}"),
                vec![
                    s("generate"),
                    s("--model"),
                    p(&m),
                    s("--prompt"),
                    s("x"),
                    s("--steps"),
                    s("2"),
                    s("--out"),
                    p(&d.join("g")),
                ],
                part,
            ));
        }
    }
    cases.push(case(
        "generate --model missing",
        vec![
            s("generate"),
            s("--model"),
            p(&d.join("no-such-model")),
            s("--prompt"),
            s("x"),
            s("--out"),
            p(&d.join("g")),
        ],
        "no-such-model",
    ));
    cases
}

/// Corrupt, truncated and mislabelled images; odd captions files; output paths.
fn data_cases(b: &Base) -> Vec<Case> {
    let d = b.dir.join("data");
    let png = std::fs::read(b.folder.join("a/0.png")).unwrap();
    let mut cases = Vec::new();
    for (what, bytes) in [
        ("zero bytes", vec![]),
        ("truncated", png[..png.len() / 2].to_vec()),
        ("text", b"this is not an image".to_vec()),
        ("a PNG signature only", png[..8].to_vec()),
    ] {
        let slug = what.replace(' ', "_");
        // In a labelled folder (probe).
        let f = d.join(format!("folder-{slug}"));
        copy_dir(&b.folder, &f);
        write(&f.join("b/bad.png"), &bytes);
        // The folder holds bad.jpg too (below): either may be read first.
        let bad = f.join("b/bad.");
        cases.push(case(
            &format!("probe with a {what} image"),
            vec![
                s("probe"),
                s("--checkpoint"),
                p(&b.ck),
                s("--head-dim"),
                s("16"),
                s("--test"),
                p(&f),
                s("--train"),
                p(&b.folder),
            ],
            &p(&bad),
        ));
        // A JPEG name on it.
        let badj = write(&f.join("b/bad.jpg"), &bytes);
        cases.push(case(
            &format!("embed a {what} .jpg"),
            vec![
                s("embed"),
                s("--checkpoint"),
                p(&b.ck),
                s("--head-dim"),
                s("16"),
                s("--images"),
                p(&badj),
                s("--out"),
                p(&d.join("f.safetensors")),
            ],
            &p(&badj),
        ));
        // In a pool (training reads it).
        let pl = d.join(format!("pool-{slug}"));
        copy_dir(&b.pool, &pl);
        let pool = stablerep::data::pool::Pool::open(&pl).unwrap();
        let victim = pool.image_path(1, 0).unwrap();
        std::fs::write(&victim, &bytes).unwrap();
        cases.push(case(
            &format!("train on a pool with a {what} image"),
            vec![
                s("train"),
                s("--pool"),
                p(&pl),
                s("--captions-per-batch"),
                s("4"),
                s("--images-per-caption"),
                s("2"),
                s("--steps"),
                s("2"),
                s("--out"),
                p(&d.join(format!("t-{slug}"))),
            ]
            .into_iter()
            .chain(tiny_model())
            .collect(),
            &victim.file_name().unwrap().to_string_lossy(),
        ));
    }
    // Labelled folders that are not: one class; an empty class; no such folder.
    let one = d.join("one-class");
    copy_dir(&b.folder.join("a"), &one.join("a"));
    let empty = d.join("empty-class");
    copy_dir(&b.folder, &empty);
    std::fs::create_dir_all(empty.join("c")).unwrap();
    for (what, f, names) in [
        ("one class", one.clone(), p(&one)),
        ("missing", d.join("nowhere"), s("nowhere")),
    ] {
        cases.push(case(
            &format!("probe --test {what}"),
            vec![
                s("probe"),
                s("--checkpoint"),
                p(&b.ck),
                s("--head-dim"),
                s("16"),
                s("--test"),
                p(&f),
                s("--train"),
                p(&b.folder),
            ],
            &names,
        ));
    }
    // Pools whose index is broken.
    for (what, csv) in [
        ("empty index", s("")),
        ("header only", s("image,caption\n")),
        ("binary index", s("\u{0}\u{1}\u{2}\u{fffd}")),
    ] {
        let pl = d.join(format!("pool-csv-{}", what.replace(' ', "_")));
        copy_dir(&b.pool, &pl);
        write(&pl.join("captions.csv"), csv.as_bytes());
        cases.push(case(
            &format!("train on a pool with an {what}"),
            vec![
                s("train"),
                s("--pool"),
                p(&pl),
                s("--captions-per-batch"),
                s("2"),
                s("--images-per-caption"),
                s("2"),
                s("--out"),
                p(&d.join("t")),
            ],
            "captions.csv",
        ));
    }
    // Captions files for generate.
    for (what, bytes) in [
        ("empty", b"".to_vec()),
        ("blank lines only", b"\n\n   \n\t\n".to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x81, 0x0a, 0xc3]),
        ("missing", vec![]),
    ] {
        let f = d.join(format!("caps-{}.txt", what.replace(' ', "_")));
        if what != "missing" {
            write(&f, &bytes);
        }
        cases.push(case(
            &format!("generate --captions {what}"),
            vec![
                s("generate"),
                s("--model"),
                p(&b.model),
                s("--captions"),
                p(&f),
                s("--out"),
                p(&d.join("g")),
            ],
            &f.file_name().unwrap().to_string_lossy(),
        ));
    }
    // Output paths: inside a file, and an output folder that is a file.
    let file = write(&d.join("a-file"), b"x");
    for (cmd, args) in [
        (
            "world",
            vec![s("world"), s("--captions"), s("2"), s("--out")],
        ),
        (
            "generate",
            vec![
                s("generate"),
                s("--model"),
                p(&b.model),
                s("--prompt"),
                s("x"),
                s("--steps"),
                s("2"),
                s("--out"),
            ],
        ),
        (
            "train",
            [
                s("train"),
                s("--pool"),
                p(&b.pool),
                s("--captions-per-batch"),
                s("2"),
                s("--images-per-caption"),
                s("2"),
                s("--steps"),
                s("1"),
            ]
            .into_iter()
            .chain(tiny_model())
            .chain([s("--out")])
            .collect(),
        ),
        (
            "embed",
            vec![
                s("embed"),
                s("--checkpoint"),
                p(&b.ck),
                s("--head-dim"),
                s("16"),
                s("--images"),
                p(&b.folder.join("a/0.png")),
                s("--out"),
            ],
        ),
    ] {
        for (what, out) in [
            ("an output inside a file", file.join("sub")),
            ("an output folder that is a file", file.clone()),
        ] {
            if cmd == "embed" && what.ends_with("is a file") {
                continue; // embed's --out is a file: overwriting it is its job
            }
            let mut a = args.clone();
            a.push(p(&out));
            cases.push(case(&format!("{cmd} with {what}"), a, "a-file"));
        }
    }
    cases
}

/// Every case must fail cleanly and name what it is about.
#[test]
fn bad_inputs_fail_cleanly_and_name_the_file_or_flag() {
    let b = setup("bad");
    let mut cases = numeric_cases(&b);
    cases.extend(file_cases(&b));
    cases.extend(data_cases(&b));
    assert!(cases.len() >= 150, "only {} cases", cases.len());
    let failures = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let (code, out) = run(&c.args, Duration::from_secs(180));
                let problem = match code {
                    None => Some("killed by a signal or timed out".to_string()),
                    Some(0) => Some("exit status 0".to_string()),
                    Some(_) if out.contains("panicked") => Some("panicked".to_string()),
                    Some(_) if !out.contains(&c.names) => {
                        Some(format!("no mention of `{}`", c.names))
                    }
                    Some(_) => None,
                };
                if let Some(pr) = problem {
                    let tail: String = out.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{}: {pr}: {tail}", c.name));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    std::fs::remove_dir_all(&b.dir).ok();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Valid odd inputs work: a 1 x 1 image, grayscale, gray+alpha, RGBA and 16-bit PNGs, a JPEG.
#[test]
fn odd_but_valid_images_are_embedded() {
    let b = setup("odd");
    let d = b.dir.join("odd");
    std::fs::create_dir_all(&d).unwrap();
    let mut files = Vec::new();
    let tiny = image::RgbImage::from_pixel(1, 1, image::Rgb([200, 10, 10]));
    files.push(d.join("tiny.png"));
    tiny.save(files.last().unwrap()).unwrap();
    let gray = image::GrayImage::from_fn(37, 23, |x, y| image::Luma([(x * 5 + y) as u8]));
    files.push(d.join("gray.png"));
    gray.save(files.last().unwrap()).unwrap();
    let ga = image::GrayAlphaImage::from_fn(20, 30, |x, _| image::LumaA([x as u8 * 9, 128]));
    files.push(d.join("gray_alpha.png"));
    ga.save(files.last().unwrap()).unwrap();
    let rgba = image::RgbaImage::from_fn(64, 48, |x, y| image::Rgba([x as u8, y as u8, 90, 40]));
    files.push(d.join("rgba.png"));
    rgba.save(files.last().unwrap()).unwrap();
    let deep = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(33, 33, |x, y| {
        image::Rgb([x as u16 * 1900, y as u16 * 1900, 40000])
    });
    files.push(d.join("deep16.png"));
    deep.save(files.last().unwrap()).unwrap();
    let jpg = image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 77]));
    files.push(d.join("photo.jpg"));
    jpg.save(files.last().unwrap()).unwrap();
    let mut args = vec![
        s("embed"),
        s("--checkpoint"),
        p(&b.ck),
        s("--head-dim"),
        s("16"),
        s("--out"),
        p(&d.join("f.safetensors")),
        s("--images"),
    ];
    args.extend(files.iter().map(|f| p(f)));
    let (code, out) = run(&args, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    let f = Checkpoint::load(&d.join("f.safetensors")).unwrap();
    let feats = f.get("features", Some(&[files.len(), 32])).unwrap();
    assert!(feats.data.iter().all(|v| v.is_finite()));
    // Empty and exotic prompts generate.
    for prompt in [
        "",
        "🐶 ❤ 東京 ... \"quoted\" \\ backslash",
        &"long caption ".repeat(60),
    ] {
        let (code, out) = run(
            &[
                s("generate"),
                s("--model"),
                p(&b.model),
                s("--prompt"),
                s(prompt),
                s("--steps"),
                s("2"),
                s("--out"),
                p(&d.join("gen")),
            ],
            Duration::from_secs(180),
        );
        assert_eq!(code, Some(0), "prompt {prompt:?}: {out}");
    }
    std::fs::remove_dir_all(&b.dir).ok();
}
