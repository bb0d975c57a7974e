//! The mini-world path through the app: captions of the simple world with the built-in model
//! for the Pool panel, the demo's encoder and batch for the Train panel, and labelled
//! evaluation renders for the Evaluate panel, so a new user runs StableRep's experiment in a
//! few clicks.

use std::path::{Path, PathBuf};

use super::settings::Settings;
use crate::world::export::{write_labelled, LabelKind};
use crate::world::World;

/// Captions written by [`use_world_captions`].
pub const CAPTIONS: usize = 216;
/// Labelled renders per evaluation split.
pub const EVAL_IMAGES: usize = 480;

/// The folder the mini-world files go to: beside the pool folder when one is set, else
/// `mini-world` in the working folder.
pub fn folder(settings: &Settings) -> PathBuf {
    let out = settings.pool.out.trim();
    match Path::new(out).parent() {
        Some(p) if !out.is_empty() => p.to_path_buf(),
        _ => PathBuf::from("mini-world"),
    }
}

/// Writes the simple world's captions next to the pool folder and points the Pool panel at
/// them and at the built-in model (4 images per caption, guidance 2), and the Train panel at
/// that pool with the demo's encoder and batch.
pub fn use_world_captions(settings: &mut Settings, builtin: &Path) -> Result<PathBuf, String> {
    let dir = folder(settings);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join("mini-world-captions.txt");
    let text: String = World::Simple
        .descriptions(CAPTIONS, 0)
        .iter()
        .map(|d| d.caption() + "\n")
        .collect();
    crate::nn::checkpoint::write_atomic(&file, text.as_bytes()).map_err(|e| e.to_string())?;
    super::generate::use_builtin(settings, &builtin.display().to_string());
    let p = &mut settings.pool;
    p.captions = file.display().to_string();
    if p.out.trim().is_empty() {
        p.out = dir.join("pool").display().to_string();
    }
    p.images = 4;
    p.save_size = 0;
    let t = &mut settings.train;
    t.pool = p.out.clone();
    t.labelled_folder = false;
    if t.out.trim().is_empty() {
        t.out = dir.join("run").display().to_string();
    }
    (t.img_size, t.patch, t.width, t.depth, t.heads) = (32, 4, 96, 3, 3);
    (t.head_hidden, t.head_out, t.captions, t.images) = (256, 64, 8, 4);
    Ok(file)
}

/// Renders labelled shape folders of the simple world (other seeds than any pool) next to
/// the pool folder and points the Evaluate panel at them and at the Train panel's checkpoint.
pub fn use_world_eval_sets(settings: &mut Settings) -> Result<(PathBuf, PathBuf), String> {
    let dir = folder(settings).join("eval");
    let mut made = Vec::new();
    for (split, seed) in [("shape-train", 1_000u64), ("shape-test", 2_000)] {
        let target = dir.join(split);
        if !target.is_dir() {
            let tmp = dir.join(format!("{split}.partial"));
            let _ = std::fs::remove_dir_all(&tmp);
            let d = World::Simple.descriptions(EVAL_IMAGES, seed);
            write_labelled(&tmp, &d, LabelKind::Shape, 32, seed, |_, _| {})
                .map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        }
        made.push(target);
    }
    let e = &mut settings.evaluate;
    e.train = made[0].display().to_string();
    e.test = made[1].display().to_string();
    let ck = Path::new(settings.train.out.trim()).join("checkpoint-last.safetensors");
    if e.checkpoint.trim().is_empty() && !settings.train.out.trim().is_empty() {
        e.checkpoint = ck.display().to_string();
    }
    Ok((made[0].clone(), made[1].clone()))
}
