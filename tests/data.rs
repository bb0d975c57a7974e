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
    let (h, w, px) = load_rgb(&pool.image_path(2, 1)).unwrap();
    assert_eq!((h, w), (s, s));
    let expect = (5 * 7 + 2 * 13 + 29) as f32 / 255.0;
    assert!((px[5] - expect).abs() < 1e-6, "{} vs {expect}", px[5]);
    let sampler = Sampler::new(pool.captions.len(), k, 2, 3, 1).unwrap();
    for (c, j) in sampler.batch(0, 1).picks {
        assert!(pool.image_path(c, j).exists());
    }
    std::fs::remove_file(dir.join("captions.csv")).unwrap();
    assert!(Pool::open(&dir)
        .unwrap_err()
        .to_string()
        .contains("captions.csv"));
    std::fs::remove_dir_all(&dir).ok();
}
