//! Pools as WebDataset shards: byte-exact round trips between the two layouts, what Python's
//! `webdataset` reads from our shards (and ours from a shard its writer made), generation
//! resumed after a killed shard, training that reads either layout alike, and clear errors for
//! damaged or foreign shards.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use stablerep::data::convert::{convert, Format};
use stablerep::data::pool::Pool;
use stablerep::data::tar::TarWriter;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stablerep"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stablerep-wds-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn stderr_of(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn converting_between_layouts_is_byte_exact() {
    let dir = tmp("round-trip");
    let a = dir.join("a");
    common::make_pool(&a);
    let b = dir.join("b");
    assert_eq!(
        convert(
            &Pool::open(&a).unwrap(),
            &b,
            Format::WebDataset,
            5,
            |_, _| {}
        )
        .unwrap(),
        48
    );
    let names: Vec<String> = files(&b)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["pool-000000.tar", "pool-000001.tar", "pool-000002.tar"]
    );
    let (pa, pb) = (Pool::open(&a).unwrap(), Pool::open(&b).unwrap());
    assert_eq!(pb.captions.len(), 12);
    assert_eq!(pb.images_per_caption(), 4);
    for i in 0..12 {
        assert_eq!(pa.captions[i].text, pb.captions[i].text);
        assert_eq!(pb.captions[i].relpath, format!("{i:010}"));
        for j in 0..4 {
            assert_eq!(
                pa.read_bytes(i, j).unwrap(),
                pb.read_bytes(i, j).unwrap(),
                "{i} {j}"
            );
            assert_eq!(pa.load_rgb(i, j).unwrap(), pb.load_rgb(i, j).unwrap());
        }
    }
    // Back to folders: every file as it was, captions.csv included.
    let c = dir.join("c");
    let o = bin()
        .args(["pool", "convert", "--from"])
        .arg(&b)
        .arg("--to")
        .arg(&c)
        .args(["--format", "folder"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("48 images of 12 captions"));
    let (fa, fc) = (files(&a), files(&c));
    assert_eq!(fa.len(), fc.len());
    for (x, y) in fa.iter().zip(&fc) {
        assert_eq!(x.strip_prefix(&a).unwrap(), y.strip_prefix(&c).unwrap());
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{}",
            y.display()
        );
    }
    // And to shards again: the same bytes (the writer is deterministic).
    let d = dir.join("d");
    let o = bin()
        .args(["pool", "convert", "--from"])
        .arg(&c)
        .arg("--to")
        .arg(&d)
        .args(["--format", "webdataset", "--captions-per-shard", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (x, y) in files(&b).iter().zip(&files(&d)) {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }
    // Bad requests name the flag or the folder.
    let run = |args: &[&str]| bin().args(["pool", "convert"]).args(args).output().unwrap();
    let (bs, cs, ds) = (
        b.to_str().unwrap(),
        c.to_str().unwrap(),
        d.to_str().unwrap(),
    );
    let e = stderr_of(&run(&["--from", bs, "--to", ds, "--format", "folder"]));
    assert!(e.contains("not empty") && e.contains(ds), "{e}");
    let e = stderr_of(&run(&[
        "--from",
        bs,
        "--to",
        "x",
        "--format",
        "folder",
        "--captions-per-shard",
        "3",
    ]));
    assert!(e.contains("--captions-per-shard"), "{e}");
    let e = stderr_of(&run(&["--from", bs, "--to", "x", "--format", "zip"]));
    assert!(e.contains("zip"), "{e}");
    let e = stderr_of(&run(&[
        "--from",
        cs,
        "--to",
        "x",
        "--format",
        "webdataset",
        "--captions-per-shard",
        "0",
    ]));
    assert!(e.contains("--captions-per-shard"), "{e}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = stderr_of(&run(&[
        "--from",
        empty.to_str().unwrap(),
        "--to",
        "x",
        "--format",
        "folder",
    ]));
    assert!(e.contains("not a pool") && e.contains("empty"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// 3 captions x 2 images of 4 x 4 pixels, captions with a comma, quotes and non-ASCII text.
fn tiny_pool(dir: &Path) {
    let texts = ["a red cube, on grass", "a \"blue\" sphere", "un cône vert"];
    let mut index = String::new();
    for (c, text) in texts.iter().enumerate() {
        let rel = stablerep::data::pool::relpath(c as u64);
        index += &stablerep::data::csv::row(&[&rel, text]);
        for j in 0..2 {
            let img: Vec<f32> = (0..48)
                .map(|p| ((p * 7 + c * 31 + j * 13) % 17) as f32 / 16.0)
                .collect();
            stablerep::util::image::save_rgb(&dir.join(format!("seed_{j}")).join(&rel), 4, 4, &img)
                .unwrap();
        }
    }
    std::fs::write(dir.join("captions.csv"), index).unwrap();
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webdataset")
}

#[test]
fn python_webdataset_reads_our_shards_and_we_read_its() {
    let dir = tmp("python");
    tiny_pool(&dir.join("folder"));
    let ours = dir.join("ours");
    convert(
        &Pool::open(&dir.join("folder")).unwrap(),
        &ours,
        Format::WebDataset,
        2,
        |_, _| {},
    )
    .unwrap();
    let committed = fixtures().join("ours");
    if std::env::var_os("STABLEREP_UPDATE_FIXTURES").is_some() {
        std::fs::create_dir_all(&committed).unwrap();
        for f in files(&ours) {
            std::fs::copy(&f, committed.join(f.file_name().unwrap())).unwrap();
        }
    }
    // The committed shards (what tools/check_webdataset.py read) are what the writer makes.
    let (mine, theirs) = (files(&ours), files(&committed));
    assert_eq!(mine.len(), 2);
    assert_eq!(mine.len(), theirs.len());
    for (x, y) in mine.iter().zip(&theirs) {
        assert!(
            std::fs::read(x).unwrap() == std::fs::read(y).unwrap(),
            "{} differs from the committed shard: the writer changed; rerun with \
             STABLEREP_UPDATE_FIXTURES=1, then tools/check_webdataset.py",
            y.display()
        );
    }
    // What Python's webdataset read from them: keys, fields and bytes.
    let text = std::fs::read_to_string(fixtures().join("python_read.json")).unwrap();
    let read: serde_json::Value = serde_json::from_str(&text).unwrap();
    let samples = read["samples"].as_array().unwrap();
    let pool = Pool::open(&committed).unwrap();
    assert_eq!(samples.len(), pool.captions.len());
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["key"], pool.captions[i].relpath.as_str());
        let fields = s["fields"].as_object().unwrap();
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        assert_eq!(names, ["0.png", "1.png", "txt"], "sample {i}");
        assert_eq!(
            fields["txt"],
            hex(pool.captions[i].text.as_bytes()).as_str()
        );
        for j in 0..2 {
            let (bytes, ext) = pool.read_bytes(i, j).unwrap();
            assert_eq!(ext, "png");
            assert_eq!(
                fields[&format!("{j}.png")],
                hex(&bytes).as_str(),
                "sample {i} image {j}"
            );
        }
    }
    // A shard written by webdataset's own TarWriter (pax headers, its owner and mode) reads
    // as the same pool.
    let foreign = Pool::open(&fixtures().join("python")).unwrap();
    assert_eq!(foreign.captions.len(), pool.captions.len());
    for i in 0..pool.captions.len() {
        assert_eq!(foreign.captions[i], pool.captions[i]);
        for j in 0..2 {
            assert_eq!(
                foreign.read_bytes(i, j).unwrap(),
                pool.read_bytes(i, j).unwrap()
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn damaged_or_foreign_shards_get_clear_errors() {
    let dir = tmp("damaged");
    tiny_pool(&dir.join("folder"));
    let good = dir.join("good");
    convert(
        &Pool::open(&dir.join("folder")).unwrap(),
        &good,
        Format::WebDataset,
        3,
        |_, _| {},
    )
    .unwrap();
    let shard = std::fs::read(good.join("pool-000000.tar")).unwrap();
    let case = |name: &str, bytes: &[u8]| -> String {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("pool-000000.tar"), bytes).unwrap();
        let e = Pool::open(&d).unwrap_err().to_string();
        assert!(e.contains("pool-000000.tar"), "{name}: {e}");
        e
    };
    for cut in [shard.len() - 1024, shard.len() - 700, 1000] {
        let e = case(&format!("cut{cut}"), &shard[..cut]);
        assert!(e.contains("truncated"), "{e}");
    }
    let e = case("foreign", &[7u8; 4096]);
    assert!(e.contains("not a tar header"), "{e}");
    // Members missing or out of place.
    let write = |name: &str, members: &[(&str, &[u8])]| -> String {
        let d = dir.join(name);
        let mut w = TarWriter::create(&d.join("pool-000000.tar")).unwrap();
        for (n, b) in members {
            w.append(n, b).unwrap();
        }
        w.finish().unwrap();
        Pool::open(&d).unwrap_err().to_string()
    };
    let png = Pool::open(&good).unwrap().read_bytes(0, 0).unwrap().0;
    let e = write(
        "gap",
        &[("k.0.png", &png), ("k.2.png", &png), ("k.txt", b"x")],
    );
    assert!(e.contains("'k'") && e.contains("none missing"), "{e}");
    let e = write("notext", &[("k.0.png", &png)]);
    assert!(e.contains("no .txt"), "{e}");
    let e = write(
        "twice",
        &[
            ("k.0.png", &png),
            ("k.txt", b"x"),
            ("m.0.png", &png),
            ("m.txt", b"y"),
            ("k.1.png", &png),
        ],
    );
    assert!(e.contains("'k' appears twice"), "{e}");
    let e = write(
        "uneven",
        &[
            ("k.0.png", &png),
            ("k.txt", b"x"),
            ("m.0.png", &png),
            ("m.1.png", &png),
            ("m.txt", b"y"),
        ],
    );
    assert!(e.contains("2 images") && e.contains("has 1"), "{e}");
    // Training on a damaged pool fails before any step, naming the shard.
    let o = bin()
        .args(["train", "--pool"])
        .arg(dir.join("cut1000"))
        .args([
            "--captions-per-batch",
            "2",
            "--images-per-caption",
            "2",
            "--out",
        ])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let e = stderr_of(&o);
    assert!(
        e.contains("pool-000000.tar") && e.contains("truncated"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shard_generation_resumes_after_a_kill_to_the_same_bytes() {
    let dir = tmp("generate");
    let model = dir.join("model");
    common::tiny_sd_folder(&model);
    let caps = dir.join("captions.txt");
    let lines: Vec<String> = (0..12).map(|i| format!("caption number {i}")).collect();
    std::fs::write(&caps, lines.join("\n")).unwrap();
    let gen = |out: &str, extra: &[&str]| {
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&model);
        c.arg("--captions").arg(&caps);
        c.args(["--images-per-prompt", "2", "--steps", "2", "--size", "64"]);
        c.arg("--out").arg(dir.join(out));
        c.args(extra);
        c
    };
    let wds = ["--format", "webdataset", "--captions-per-shard", "2"];
    let o = gen("straight", &wds).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("24 images"));
    let straight = files(&dir.join("straight"));
    assert_eq!(straight.len(), 6, "{straight:?}");
    // The same images as the folder layout (the noise depends on seed, caption and image).
    let o = gen("folder", &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        Pool::open(&dir.join("straight")).unwrap(),
        Pool::open(&dir.join("folder")).unwrap(),
    );
    assert_eq!(a.captions, {
        let mut c = b.captions.clone();
        for (i, x) in c.iter_mut().enumerate() {
            x.relpath = format!("{i:010}");
        }
        c
    });
    for i in 0..12 {
        for j in 0..2 {
            assert_eq!(a.read_bytes(i, j).unwrap(), b.read_bytes(i, j).unwrap());
        }
    }
    // Killed while writing: at most a temporary file, never a half shard under its name.
    let killed = dir.join("killed");
    let mut child = gen("killed", &wds)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !killed.join("pool-000001.tar").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        assert!(t0.elapsed().as_secs() < 300, "the run never got going");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for f in files(&killed) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".tar") {
            let s = straight.iter().find(|p| p.ends_with(&name)).unwrap();
            assert_eq!(
                std::fs::read(&f).unwrap(),
                std::fs::read(s).unwrap(),
                "{name}"
            );
        } else {
            assert!(name.ends_with(".tar.tmp"), "{name}");
        }
    }
    // A shard cut short by hand (a bad copy) is generated again; complete ones are skipped.
    let first = killed.join("pool-000000.tar");
    let before = std::fs::metadata(&first).unwrap().modified().unwrap();
    let second = std::fs::read(killed.join("pool-000001.tar")).unwrap();
    std::fs::write(killed.join("pool-000001.tar"), &second[..second.len() / 2]).unwrap();
    let o = gen("killed", &[&wds[..], &["--resume"]].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        before
    );
    let after = files(&killed);
    assert_eq!(after.len(), 6, "{after:?}");
    for (x, y) in straight.iter().zip(&after) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{}",
            y.display()
        );
    }
    // Machines split shards, not captions: machine 1 of 2 writes shards 3 to 5.
    let o = gen("half", &[&wds[..], &["--shard", "1/2"]].concat())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let half: Vec<String> = files(&dir.join("half"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        half,
        ["pool-000003.tar", "pool-000004.tar", "pool-000005.tar"]
    );
    // Flags of the other layout are refused by name.
    let e = stderr_of(&gen("x", &["--captions-per-shard", "2"]).output().unwrap());
    assert!(
        e.contains("--captions-per-shard") && e.contains("webdataset"),
        "{e}"
    );
    let e = stderr_of(
        &bin()
            .args([
                "generate",
                "--prompt",
                "p",
                "--format",
                "webdataset",
                "--out",
                "x",
            ])
            .output()
            .unwrap(),
    );
    assert!(e.contains("--format"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn training_reads_both_layouts_alike() {
    let dir = tmp("train");
    let o = bin()
        .args(["world", "--world", "simple", "--captions", "8"])
        .args(["--images-per-caption", "2", "--size", "16", "--out"])
        .arg(dir.join("folder"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args(["pool", "convert", "--from"])
        .arg(dir.join("folder"))
        .arg("--to")
        .arg(dir.join("shards"))
        .args(["--format", "webdataset", "--captions-per-shard", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = |pool: &str| {
        let o = bin()
            .args(["train", "--pool"])
            .arg(dir.join(pool))
            .args([
                "--img-size",
                "16",
                "--patch",
                "8",
                "--width",
                "32",
                "--depth",
                "1",
            ])
            .args(["--heads", "2", "--head-hidden", "32", "--head-out", "16"])
            .args(["--captions-per-batch", "4", "--images-per-caption", "2"])
            .args(["--steps", "3", "--log-every", "1", "--out"])
            .arg(dir.join(format!("run-{pool}")))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stablerep::nn::checkpoint::Checkpoint::load(
            &dir.join(format!("run-{pool}/checkpoint-last.safetensors")),
        )
        .unwrap()
    };
    let (a, b) = (train("folder"), train("shards"));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        assert!(
            t.data == b.tensors[k].data,
            "{k} differs between the layouts"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
