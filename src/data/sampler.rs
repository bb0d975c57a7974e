//! Batches of the official recipe: each epoch shuffles the captions (seeded per epoch) and
//! drops the incomplete last batch; each time a caption is drawn, m of its K images are chosen
//! uniformly without replacement. Batches are view-major: row v * n + i is image v of caption i.

use crate::util::rng::Rng;

/// One batch: `picks[v * n + i] = (caption, image index)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Captions in the batch (n).
    pub captions: Vec<usize>,
    /// (caption, image) per row, view-major.
    pub picks: Vec<(usize, usize)>,
}

/// Draws batches of `n` captions x `m` images from a pool of `captions` captions with `k`
/// images each.
#[derive(Clone, Debug)]
pub struct Sampler {
    captions: usize,
    k: usize,
    n: usize,
    m: usize,
    seed: u64,
}

impl Sampler {
    /// A sampler; fails when the pool cannot supply a batch.
    pub fn new(captions: usize, k: usize, n: usize, m: usize, seed: u64) -> crate::Result<Sampler> {
        if n == 0 || m == 0 || n > captions || m > k {
            return Err(crate::Error::Config(format!(
                "cannot draw {n} captions x {m} images (--captions-per-batch x --images-per-caption) from a pool of {captions} captions x {k} images"
            )));
        }
        Ok(Sampler {
            captions,
            k,
            n,
            m,
            seed,
        })
    }

    /// Full batches per epoch (drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        self.captions / self.n
    }

    /// Batch `b` of epoch `e` (deterministic in the seed, epoch and batch).
    pub fn batch(&self, epoch: u64, b: usize) -> Batch {
        let mut order: Vec<usize> = (0..self.captions).collect();
        Rng(self.seed ^ epoch.wrapping_mul(0xA24BAED4963EE407)).shuffle(&mut order);
        let caps: Vec<usize> = order[b * self.n..(b + 1) * self.n].to_vec();
        let mut rng = Rng(self.seed ^ (epoch << 32) ^ (b as u64).wrapping_mul(0x9FB21C651E98DF25));
        let mut picks = vec![(0, 0); self.n * self.m];
        for (i, &c) in caps.iter().enumerate() {
            let mut imgs: Vec<usize> = (0..self.k).collect();
            rng.shuffle(&mut imgs);
            for v in 0..self.m {
                picks[v * self.n + i] = (c, imgs[v]);
            }
        }
        Batch {
            captions: caps,
            picks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_the_recipe() {
        let s = Sampler::new(10, 5, 3, 4, 7).unwrap();
        assert_eq!(s.batches_per_epoch(), 3);
        let mut seen = std::collections::HashSet::new();
        for b in 0..3 {
            let batch = s.batch(0, b);
            assert_eq!(batch, s.batch(0, b), "deterministic");
            for (i, &c) in batch.captions.iter().enumerate() {
                assert!(seen.insert(c), "caption {c} twice in one epoch");
                let imgs: std::collections::HashSet<usize> =
                    (0..4).map(|v| batch.picks[v * 3 + i].1).collect();
                assert_eq!(imgs.len(), 4, "images of one caption must be distinct");
                assert!(
                    (0..4).all(|v| batch.picks[v * 3 + i].0 == c),
                    "view-major layout"
                );
            }
        }
        assert_ne!(
            s.batch(0, 0).captions,
            s.batch(1, 0).captions,
            "epochs reshuffle"
        );
        assert!(Sampler::new(10, 5, 3, 6, 0).is_err());
        assert!(Sampler::new(2, 5, 3, 2, 0).is_err());
    }
}
