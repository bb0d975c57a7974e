//! Learning-rate rule and schedule of the official recipe: peak lr = base lr x images per step
//! / 256 x crops / 2; linear warmup from 0, then a half-cycle cosine to 0, updated every
//! iteration.

use serde::{Deserialize, Serialize};

/// The paper's rule: `blr * captions * images_per_caption / 256 * crops / 2`
/// (e.g. 2e-4 x 8256 / 512 = 3.225e-3 for the README's ViT-B run).
pub fn peak_lr(base_lr: f64, captions: usize, images_per_caption: usize, crops: usize) -> f64 {
    base_lr * (captions * images_per_caption) as f64 / 256.0 * crops as f64 / 2.0
}

/// How the learning rate moves over the run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Linear warmup over `warmup` steps, then half-cycle cosine to 0 at `total` steps.
    Cosine {
        /// Warmup steps.
        warmup: u64,
        /// Total steps.
        total: u64,
    },
    /// The same value every step (parity runs).
    Constant,
}

impl Schedule {
    /// Learning rate for step `step` (0-based) given the peak.
    pub fn lr(&self, peak: f64, step: u64) -> f64 {
        match *self {
            Schedule::Constant => peak,
            Schedule::Cosine { warmup, total } => {
                if step < warmup {
                    peak * step as f64 / warmup as f64
                } else if total <= warmup {
                    peak
                } else {
                    let t = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
                    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_lr_follows_the_readme_run() {
        // 4 nodes x 8 GPUs x 43 captions x 6 images, blr 2e-4, one crop.
        let lr = peak_lr(2e-4, 4 * 8 * 43, 6, 1);
        assert!((lr - 3.225e-3).abs() < 1e-9, "{lr}");
        // SimCLR control: one image, two crops.
        assert!((peak_lr(2e-4, 256, 1, 2) - 2e-4).abs() < 1e-12);
    }

    #[test]
    fn cosine_warms_up_linearly_then_decays_to_zero() {
        let s = Schedule::Cosine {
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.lr(1.0, 0), 0.0);
        assert!((s.lr(1.0, 5) - 0.5).abs() < 1e-12);
        assert!((s.lr(1.0, 10) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 60) - 0.5).abs() < 1e-12);
        assert!(s.lr(1.0, 110).abs() < 1e-12);
        assert!(s.lr(1.0, 500).abs() < 1e-12);
        let mut last = f64::INFINITY;
        for step in 10..=110 {
            let v = s.lr(1.0, step);
            assert!(v <= last + 1e-15);
            last = v;
        }
        assert_eq!(Schedule::Constant.lr(0.3, 77), 0.3);
    }
}
