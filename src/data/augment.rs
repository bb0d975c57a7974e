//! Per-image augmentation parameters of StableRep's strong pipeline, sampled on the host from
//! a seed (the GPU applies them, `Graph::augment`): RandomResizedCrop (scale 0.08-1, ratio
//! 3/4-4/3, torchvision's 10 tries then a center-crop fallback), ColorJitter with p 0.8
//! (brightness, contrast, saturation 0.4, hue 0.1, random order), grayscale p 0.2, Gaussian
//! blur p 0.5 with sigma in [0.1, 2], horizontal flip p 0.5.

use crate::util::rng::Rng;

/// Augmentation strengths (the paper's defaults via `Default`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentConfig {
    /// RandomResizedCrop area range.
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect-ratio range.
    pub ratio: (f64, f64),
    /// Probability of color jitter.
    pub jitter_p: f64,
    /// Brightness, contrast, saturation strength (factor in [1 - s, 1 + s]).
    pub bcs: (f64, f64, f64),
    /// Hue strength (shift in [-h, h] of the circle).
    pub hue: f64,
    /// Probability of grayscale.
    pub gray_p: f64,
    /// Probability of blur.
    pub blur_p: f64,
    /// Blur sigma range.
    pub sigma: (f64, f64),
    /// Probability of a horizontal flip.
    pub flip_p: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            scale: (0.08, 1.0),
            ratio: (0.75, 4.0 / 3.0),
            jitter_p: 0.8,
            bcs: (0.4, 0.4, 0.4),
            hue: 0.1,
            gray_p: 0.2,
            blur_p: 0.5,
            sigma: (0.1, 2.0),
            flip_p: 0.5,
        }
    }
}

impl AugmentConfig {
    /// No augmentation: the whole image resized (scale 1 means no crop); normalization only.
    pub fn none() -> Self {
        AugmentConfig {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            jitter_p: 0.0,
            bcs: (0.0, 0.0, 0.0),
            hue: 0.0,
            gray_p: 0.0,
            blur_p: 0.0,
            sigma: (0.0, 0.0),
            flip_p: 0.0,
        }
    }
}

fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.unit()
}

/// The 16 parameters of one image of size `h` x `w` (layout in `shaders/augment.wgsl`).
pub fn sample(cfg: &AugmentConfig, h: usize, w: usize, rng: &mut Rng) -> [f32; 16] {
    let (hf, wf) = (h as f64, w as f64);
    let area = hf * wf;
    let mut crop = (cfg.scale.0 >= 1.0).then_some((0.0, 0.0, wf, hf));
    for _ in 0..if crop.is_some() { 0 } else { 10 } {
        let target = area * uniform(rng, cfg.scale.0, cfg.scale.1);
        let r = uniform(rng, cfg.ratio.0.ln(), cfg.ratio.1.ln()).exp();
        let cw = (target * r).sqrt().round();
        let ch = (target / r).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= wf && ch <= hf {
            let y0 = rng.below((hf - ch) as usize + 1) as f64;
            let x0 = rng.below((wf - cw) as usize + 1) as f64;
            crop = Some((x0, y0, cw, ch));
            break;
        }
    }
    let (x0, y0, cw, ch) = crop.unwrap_or_else(|| {
        // Center crop at the nearest allowed aspect ratio.
        let ar = wf / hf;
        let (cw, ch) = if ar < cfg.ratio.0 {
            (wf, (wf / cfg.ratio.0).round())
        } else if ar > cfg.ratio.1 {
            ((hf * cfg.ratio.1).round(), hf)
        } else {
            (wf, hf)
        };
        ((wf - cw) / 2.0, (hf - ch) / 2.0, cw, ch)
    });
    let flip = (rng.unit() < cfg.flip_p) as u8 as f64;
    let jitter = rng.unit() < cfg.jitter_p;
    let b = uniform(rng, 1.0 - cfg.bcs.0, 1.0 + cfg.bcs.0);
    let c = uniform(rng, 1.0 - cfg.bcs.1, 1.0 + cfg.bcs.1);
    let s = uniform(rng, 1.0 - cfg.bcs.2, 1.0 + cfg.bcs.2);
    let hue = uniform(rng, -cfg.hue, cfg.hue);
    let mut order = [0.0, 1.0, 2.0, 3.0];
    rng.shuffle(&mut order);
    let gray = (rng.unit() < cfg.gray_p) as u8 as f64;
    let sigma = if rng.unit() < cfg.blur_p {
        uniform(rng, cfg.sigma.0, cfg.sigma.1)
    } else {
        0.0
    };
    [
        x0,
        y0,
        cw,
        ch,
        flip,
        jitter as u8 as f64,
        b,
        c,
        s,
        hue,
        order[0],
        order[1],
        order[2],
        order[3],
        gray,
        sigma,
    ]
    .map(|v| v as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_parameters_follow_the_recipe() {
        let cfg = AugmentConfig::default();
        let mut rng = Rng(5);
        let n = 4000;
        let (mut jit, mut gray, mut blur, mut flip) = (0, 0, 0, 0);
        for _ in 0..n {
            let p = sample(&cfg, 256, 256, &mut rng);
            let (x0, y0, cw, ch) = (p[0], p[1], p[2], p[3]);
            assert!(x0 >= 0.0 && y0 >= 0.0 && x0 + cw <= 256.0 && y0 + ch <= 256.0);
            let frac = (cw * ch) as f64 / 65536.0;
            assert!(
                (0.07..=1.0).contains(&frac) || (cw == 256.0 && ch == 256.0),
                "{frac}"
            );
            for f in [p[6], p[7], p[8]] {
                assert!((0.6..=1.4).contains(&f));
            }
            assert!(p[9].abs() <= 0.1);
            let mut order: Vec<u32> = p[10..14].iter().map(|&v| v as u32).collect();
            order.sort();
            assert_eq!(order, vec![0, 1, 2, 3]);
            jit += (p[5] > 0.5) as usize;
            gray += (p[14] > 0.5) as usize;
            flip += (p[4] > 0.5) as usize;
            if p[15] > 0.0 {
                blur += 1;
                assert!((0.1..=2.0).contains(&p[15]));
            }
        }
        let near = |k: usize, p: f64| ((k as f64 / n as f64) - p).abs() < 0.03;
        assert!(
            near(jit, 0.8) && near(gray, 0.2) && near(blur, 0.5) && near(flip, 0.5),
            "{jit} {gray} {blur} {flip}"
        );
        let none = sample(&AugmentConfig::none(), 100, 60, &mut rng);
        assert_eq!(&none[..6], &[0.0, 0.0, 60.0, 100.0, 0.0, 0.0]);
    }
}
