//! Synthetic pools in the official layout: written with procedural images, read back, decoded.

use stablerep::data::csv;
use stablerep::data::pool::{relpath, Pool};
use stablerep::data::sampler::Sampler;
use stablerep::util::image::{load_rgb, save_rgb};

#[test]
fn a_pool_in_the_official_layout_reads_back() {
    let dir = std::env::temp_dir().join(format!("stablerep-pool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (captions, k, s) = (5u64, 3usize, 8usize);
    let mut index = String::new();
    for c in 0..captions {
        let text = format!("a shape, number {c}");
        index += &csv::row(&[&relpath(c), &text]);
        for j in 0..k {
            let img: Vec<f32> = (0..3 * s * s)
                .map(|i| ((i as u64 * 7 + c * 13 + j as u64 * 29) % 256) as f32 / 255.0)
                .collect();
            save_rgb(&dir.join(format!("seed_{j}")).join(relpath(c)), s, s, &img).unwrap();
        }
    }
    std::fs::write(dir.join("captions.csv"), index).unwrap();
    let pool = Pool::open(&dir).unwrap();
    assert_eq!(pool.images_per_caption(), k);
    assert_eq!(pool.captions.len(), captions as usize);
    assert_eq!(pool.captions[3].text, "a shape, number 3");
    assert_eq!(relpath(1_234_567), "000001/000234/00567.png");
    let (h, w, px) = load_rgb(&pool.image_path(2, 1).unwrap()).unwrap();
    assert_eq!((h, w), (s, s));
    let expect = (5 * 7 + 2 * 13 + 29) as f32 / 255.0;
    assert!((px[5] - expect).abs() < 1e-6, "{} vs {expect}", px[5]);
    let sampler = Sampler::new(pool.captions.len(), k, 2, 3, 1).unwrap();
    for (c, j) in sampler.batch(0, 1).picks {
        assert!(pool.image_path(c, j).unwrap().exists());
    }
    std::fs::remove_file(dir.join("captions.csv")).unwrap();
    assert!(Pool::open(&dir)
        .unwrap_err()
        .to_string()
        .contains("captions.csv"));
    std::fs::remove_dir_all(&dir).ok();
}

/// tools/make_fixtures.py's `resize_pattern`, channel-major in [0, 1].
fn resize_pattern(h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            let rgb = [
                (x * 37 + y * 11) % 256,
                ((x / 3 + y / 2) % 2) * 255,
                (x * 255) / (w - 1).max(1),
            ];
            for c in 0..3 {
                out[c * h * w + y * w + x] = rgb[c] as f32 / 255.0;
            }
        }
    }
    out
}

/// The evaluation resize and crop match torchvision's `Resize(37)` + `CenterCrop(32)` on PIL
/// images (antialiased bilinear when shrinking), landscape and portrait.
#[test]
fn evaluation_resize_matches_torchvision() {
    let fx = stablerep::nn::checkpoint::Checkpoint::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/eval_resize.safetensors"),
    )
    .unwrap();
    for (name, h, w) in [("landscape", 120, 200), ("portrait", 90, 41)] {
        let want = &fx.get(name, Some(&[3, 32, 32])).unwrap().data;
        let got = stablerep::util::image::resize_center_crop(&resize_pattern(h, w), h, w, 37, 32);
        let mut worst = 0.0f32;
        let mut mean = 0.0f32;
        for (a, b) in got.iter().zip(want) {
            worst = worst.max((a - b).abs());
            mean += (a - b).abs() / want.len() as f32;
        }
        eprintln!("{name}: worst {worst}, mean {mean} against torchvision");
        // PIL works in 8 bits with its own rounding: within about one level.
        assert!(
            worst <= 1.5 / 255.0 && mean <= 0.5 / 255.0,
            "{name}: worst {worst}, mean {mean}"
        );
    }
}
