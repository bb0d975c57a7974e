//! kNN (cosine similarity, k nearest, temperature-weighted votes as in DINO) and few-shot
//! (N-way K-shot nearest class prototype after centering on the support mean and
//! L2-normalizing) classification of frozen features. Features are small; this runs on the
//! CPU in f64.

use crate::error::{Error, Result};
use crate::util::rng::Rng;

fn normalize(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

fn rows(f: &[f32], dim: usize) -> Vec<Vec<f64>> {
    f.chunks(dim)
        .map(|r| {
            let mut v: Vec<f64> = r.iter().map(|&x| x as f64).collect();
            normalize(&mut v);
            v
        })
        .collect()
}

/// Top-1 accuracy of weighted kNN: each of the `k` most cosine-similar training features
/// votes for its label with weight exp(similarity / `temperature`).
pub fn knn_accuracy(
    train: &[f32],
    train_labels: &[usize],
    test: &[f32],
    test_labels: &[usize],
    dim: usize,
    k: usize,
    temperature: f64,
) -> Result<f64> {
    if k == 0 || !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Config(format!(
            "kNN needs k >= 1 and a positive temperature (got k {k}, temperature {temperature})"
        )));
    }
    let (tr, te) = (rows(train, dim), rows(test, dim));
    if tr.len() != train_labels.len()
        || te.len() != test_labels.len()
        || tr.is_empty()
        || te.is_empty()
    {
        return Err(Error::Config(
            "kNN: features and labels disagree in count (or are empty)".into(),
        ));
    }
    let classes = train_labels
        .iter()
        .chain(test_labels)
        .max()
        .map_or(0, |m| m + 1);
    let mut correct = 0;
    for (q, &label) in te.iter().zip(test_labels) {
        let mut sims: Vec<(f64, usize)> = tr
            .iter()
            .zip(train_labels)
            .map(|(t, &l)| (t.iter().zip(q).map(|(a, b)| a * b).sum(), l))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        // Weights relative to the nearest neighbour's: exp((s - s_max) / T) is at most 1, so
        // a small temperature cannot overflow to infinity (which made every vote equal).
        let top = sims.first().map_or(0.0, |s| s.0);
        let mut votes = vec![0.0; classes];
        for &(s, l) in sims.iter().take(k) {
            votes[l] += ((s - top) / temperature).exp();
        }
        let pred = (0..classes)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
            .unwrap_or(0);
        correct += (pred == label) as usize;
    }
    Ok(correct as f64 / te.len() as f64)
}

/// Few-shot protocol (the LGSSL stand-in: 5-way 5-shot, 6 queries, many episodes).
#[derive(Clone, Copy, Debug)]
pub struct FewShot {
    /// Classes per episode.
    pub ways: usize,
    /// Support images per class.
    pub shots: usize,
    /// Query images per class.
    pub queries: usize,
    /// Episodes averaged.
    pub episodes: usize,
    /// Seed of the episode draws.
    pub seed: u64,
}

/// Mean accuracy over `episodes` N-way K-shot episodes drawn from labelled features, with
/// `queries` queries per class: nearest prototype (class mean of the support) after centering
/// on the support mean and L2-normalizing.
pub fn fewshot_accuracy(feats: &[f32], labels: &[usize], dim: usize, cfg: &FewShot) -> Result<f64> {
    let FewShot {
        ways,
        shots,
        queries,
        episodes,
        seed,
    } = *cfg;
    if ways < 2 || shots == 0 || queries == 0 || episodes == 0 {
        return Err(Error::Config(format!(
            "few-shot needs at least 2 ways, 1 shot, 1 query and 1 episode (got {ways}-way \
             {shots}-shot, {queries} queries, {episodes} episodes)"
        )));
    }
    let classes = labels.iter().max().map_or(0, |m| m + 1);
    let by_class: Vec<Vec<usize>> = (0..classes)
        .map(|c| (0..labels.len()).filter(|&i| labels[i] == c).collect())
        .collect();
    let eligible: Vec<usize> = (0..classes)
        .filter(|&c| by_class[c].len() >= shots + queries)
        .collect();
    if eligible.len() < ways {
        return Err(Error::Config(format!(
            "{ways}-way {shots}-shot with {queries} queries (--ways, --shots, --queries) needs {ways} classes with at least {} images; {} have enough",
            shots + queries,
            eligible.len()
        )));
    }
    let feat = |i: usize| -> Vec<f64> {
        feats[i * dim..(i + 1) * dim]
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    let mut rng = Rng(seed);
    let mut total = 0.0;
    for _ in 0..episodes {
        let mut cls = eligible.clone();
        rng.shuffle(&mut cls);
        cls.truncate(ways);
        let mut support: Vec<Vec<Vec<f64>>> = Vec::new();
        let mut query: Vec<(Vec<f64>, usize)> = Vec::new();
        for (w, &c) in cls.iter().enumerate() {
            let mut idx = by_class[c].clone();
            rng.shuffle(&mut idx);
            support.push(idx[..shots].iter().map(|&i| feat(i)).collect());
            query.extend(idx[shots..shots + queries].iter().map(|&i| (feat(i), w)));
        }
        let mut mean = vec![0.0; dim];
        for s in support.iter().flatten() {
            mean.iter_mut()
                .zip(s)
                .for_each(|(m, x)| *m += x / (ways * shots) as f64);
        }
        let prep = |v: &[f64]| {
            let mut u: Vec<f64> = v.iter().zip(&mean).map(|(a, b)| a - b).collect();
            normalize(&mut u);
            u
        };
        let protos: Vec<Vec<f64>> = support
            .iter()
            .map(|s| {
                let mut p = vec![0.0; dim];
                for v in s {
                    p.iter_mut()
                        .zip(prep(v))
                        .for_each(|(a, b)| *a += b / shots as f64);
                }
                p
            })
            .collect();
        let mut correct = 0;
        for (q, label) in &query {
            let q = prep(q);
            let pred = (0..ways)
                .min_by(|&a, &b| {
                    let d =
                        |p: &Vec<f64>| p.iter().zip(&q).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
                    d(&protos[a]).total_cmp(&d(&protos[b]))
                })
                .unwrap_or(0);
            correct += (pred == *label) as usize;
        }
        total += correct as f64 / query.len() as f64;
    }
    Ok(total / episodes as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features clustered by class around random directions, plus noise.
    fn clusters(
        classes: usize,
        per: usize,
        dim: usize,
        noise: f64,
        seed: u64,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = Rng(seed);
        let mut unit = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let centers: Vec<Vec<f64>> = (0..classes)
            .map(|_| (0..dim).map(|_| unit()).collect())
            .collect();
        let mut f = Vec::new();
        let mut l = Vec::new();
        for (c, center) in centers.iter().enumerate() {
            for _ in 0..per {
                f.extend(center.iter().map(|x| (x + noise * unit()) as f32));
                l.push(c);
            }
        }
        (f, l)
    }

    #[test]
    fn separable_features_classify_and_noise_does_not() {
        let (f, l) = clusters(5, 20, 16, 0.1, 1);
        let (g, m) = clusters(5, 10, 16, 0.1, 1);
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 20, 0.07).unwrap() > 0.95);
        assert!(
            fewshot_accuracy(
                &f,
                &l,
                16,
                &FewShot {
                    ways: 5,
                    shots: 5,
                    queries: 6,
                    episodes: 50,
                    seed: 3
                }
            )
            .unwrap()
                > 0.95
        );
        let (f, l) = clusters(5, 20, 16, 50.0, 2);
        let acc = fewshot_accuracy(
            &f,
            &l,
            16,
            &FewShot {
                ways: 5,
                shots: 5,
                queries: 6,
                episodes: 200,
                seed: 3,
            },
        )
        .unwrap();
        assert!(
            acc < 0.5,
            "noise features should be near chance (0.2), got {acc}"
        );
        assert!(fewshot_accuracy(
            &f,
            &l,
            16,
            &FewShot {
                ways: 6,
                shots: 5,
                queries: 6,
                episodes: 1,
                seed: 0
            }
        )
        .is_err());
    }

    #[test]
    fn a_tiny_temperature_does_not_overflow_the_votes() {
        // exp(s / 0.001) is infinite for any similarity above 0.71; with the largest
        // similarity subtracted first the nearest neighbours still win.
        // A shared direction makes every pair similar (cosine above 0.9), classes still
        // nearest to themselves.
        let shift = |v: Vec<f32>| v.into_iter().map(|x| x + 1.5).collect::<Vec<f32>>();
        let (f, l) = clusters(5, 20, 16, 0.1, 1);
        let (g, m) = clusters(5, 10, 16, 0.1, 1);
        let (f, g) = (shift(f), shift(g));
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 60, 0.07).unwrap() > 0.95);
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 60, 0.001).unwrap() > 0.95);
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 0, 0.07).is_err());
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 5, 0.0).is_err());
        assert!(knn_accuracy(&f, &l, &g, &m, 16, 5, f64::NAN).is_err());
    }

    #[test]
    fn few_shot_without_episodes_shots_or_queries_is_an_error_not_nan() {
        let (f, l) = clusters(5, 20, 16, 0.1, 1);
        for (ways, shots, queries, episodes) in
            [(5, 5, 6, 0), (5, 0, 6, 10), (5, 5, 0, 10), (1, 5, 6, 10)]
        {
            let cfg = FewShot {
                ways,
                shots,
                queries,
                episodes,
                seed: 0,
            };
            let e = fewshot_accuracy(&f, &l, 16, &cfg).unwrap_err().to_string();
            assert!(e.contains("few-shot needs"), "{e}");
        }
    }
}
