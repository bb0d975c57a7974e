//! The samplers of diffusers' Stable Diffusion pipelines as step programs.
//!
//! A step reads the latent `X`, the guided model output `Eps` (the noise prediction for the
//! scaled input), optionally fresh standard-normal `Noise`, and history buffers `Hist(k)`, and
//! rewrites some of them through a list of linear combinations ([`Assign`]) applied in order.
//! The coefficients come from the schedule in f64; the host executor ([`HostState`]) is the
//! reference the GPU plan follows.

use super::schedule::{self, karras, round_even, SchedulerConfig, Tables};
use crate::error::{Error, Result};

/// Which sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// DDIM with `eta` (0 = deterministic). Default spacing `leading`.
    Ddim {
        /// Noise weight (0..=1).
        eta: f64,
    },
    /// PNDM in its PLMS form (`skip_prk_steps`), SD 1.5's default: N + 1 model evaluations.
    Pndm,
    /// Euler (k-diffusion), default spacing `linspace`.
    Euler,
    /// Euler ancestral: fresh noise every step.
    EulerAncestral,
    /// DPM-Solver++(2M), midpoint, lower order at the first and last step.
    DpmPP2M {
        /// Karras sigmas instead of the table's.
        karras: bool,
    },
}

impl Kind {
    /// Parses a CLI name: ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras.
    pub fn parse(name: &str, eta: f64) -> Result<Kind> {
        Ok(match name {
            "ddim" => Kind::Ddim { eta },
            "pndm" | "plms" => Kind::Pndm,
            "euler" => Kind::Euler,
            "euler-a" | "euler_a" => Kind::EulerAncestral,
            "dpmpp-2m" => Kind::DpmPP2M { karras: false },
            "dpmpp-2m-karras" => Kind::DpmPP2M { karras: true },
            other => {
                return Err(Error::Config(format!(
                "unknown sampler '{other}' (ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras)"
            )))
            }
        })
    }
}

/// A buffer a step program reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The latent being denoised.
    X,
    /// The (guided) model output of this evaluation.
    Eps,
    /// Standard-normal noise drawn for this step.
    Noise,
    /// History buffer k (sampler-specific).
    Hist(usize),
}

/// `dst = sum(coef * src)`, evaluated after every earlier assignment of the same step.
#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    /// Written buffer.
    pub dst: Slot,
    /// Terms (coefficient, source).
    pub terms: Vec<(f64, Slot)>,
}

fn set(dst: Slot, terms: &[(f64, Slot)]) -> Assign {
    Assign {
        dst,
        terms: terms.to_vec(),
    }
}

/// A configured sampler for a given number of steps.
#[derive(Clone, Debug)]
pub struct Sampler {
    kind: Kind,
    tables: Tables,
    config: SchedulerConfig,
    steps: usize,
    /// The timestep the model sees at each evaluation.
    timesteps: Vec<f64>,
    /// Euler / DPM: sigma per evaluation, plus the final one.
    sigmas: Vec<f64>,
    init_sigma: f64,
}

impl Sampler {
    /// Sets up `kind` for `steps` inference steps under `config`.
    pub fn new(kind: Kind, config: &SchedulerConfig, steps: usize) -> Result<Sampler> {
        if let Kind::Ddim { eta } = kind {
            if !(0.0..=1.0).contains(&eta) || eta.is_nan() {
                return Err(Error::Config(format!(
                    "DDIM eta must be in [0, 1], got {eta}"
                )));
            }
        }
        let tables = Tables::new(config);
        let t = config.num_train_timesteps;
        let mut s = Sampler {
            kind,
            tables,
            config: config.clone(),
            steps,
            timesteps: vec![],
            sigmas: vec![],
            init_sigma: 1.0,
        };
        match kind {
            Kind::Ddim { .. } | Kind::Pndm => {
                let spacing = config.spacing("leading");
                let mut ts = schedule::timesteps(config, spacing, steps)?;
                if spacing == "linspace" {
                    ts.iter_mut().for_each(|x| *x = round_even(*x));
                }
                if kind == Kind::Pndm {
                    // Ascending grid g -> g[:-1] ++ g[-2] ++ g[-1], reversed: the second-highest
                    // timestep is evaluated twice.
                    let mut g: Vec<f64> = ts.iter().rev().copied().collect();
                    if g.len() >= 2 {
                        g.insert(g.len() - 1, g[g.len() - 2]);
                    }
                    ts = g.into_iter().rev().collect();
                }
                s.timesteps = ts;
            }
            Kind::Euler | Kind::EulerAncestral => {
                let spacing = config.spacing("linspace");
                let ts = schedule::timesteps(config, spacing, steps)?;
                s.sigmas = ts.iter().map(|&x| f32r(s.tables.sigma_at(x))).collect();
                s.sigmas.push(0.0);
                let max = s.sigmas.iter().cloned().fold(0.0, f64::max);
                s.init_sigma = if matches!(spacing, "linspace" | "trailing") {
                    max
                } else {
                    (max * max + 1.0).sqrt()
                };
                s.timesteps = ts;
            }
            Kind::DpmPP2M { karras: k } => {
                let spacing = config.spacing("linspace");
                let ts: Vec<f64> = match spacing {
                    "linspace" => schedule::linspace_f64(0.0, (t - 1) as f64, steps + 1)
                        .into_iter()
                        .map(round_even)
                        .rev()
                        .take(steps)
                        .collect(),
                    other => schedule::timesteps(config, other, steps)?
                        .into_iter()
                        .map(round_even)
                        .collect(),
                };
                if k {
                    let (lo, hi) = (s.tables.sigmas[0] as f64, s.tables.sigmas[t - 1] as f64);
                    s.sigmas = karras(lo, hi, steps).into_iter().map(f32r).collect();
                    s.timesteps = s
                        .sigmas
                        .iter()
                        .map(|&x| round_even(s.tables.sigma_to_t(x)))
                        .collect();
                } else {
                    s.sigmas = ts.iter().map(|&x| f32r(s.tables.sigma_at(x))).collect();
                    s.timesteps = ts;
                }
                s.sigmas.push(0.0);
            }
        }
        Ok(s)
    }

    /// The sampler.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The timestep passed to the model at each evaluation (PNDM has steps + 1).
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Model evaluations in a run.
    pub fn evaluations(&self) -> usize {
        self.timesteps.len()
    }

    /// The factor of the initial standard-normal noise (diffusers' `init_noise_sigma`).
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    /// The factor applied to the latent before evaluation `i` (`scale_model_input`).
    pub fn input_scale(&self, i: usize) -> f64 {
        match self.kind {
            Kind::Euler | Kind::EulerAncestral => {
                1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt()
            }
            _ => 1.0,
        }
    }

    /// True when step `i` reads fresh noise.
    pub fn needs_noise(&self, _i: usize) -> bool {
        match self.kind {
            Kind::Ddim { eta } => eta > 0.0,
            Kind::EulerAncestral => true,
            _ => false,
        }
    }

    /// History buffers the programs use.
    pub fn history_slots(&self) -> usize {
        match self.kind {
            Kind::Pndm => 4,
            Kind::DpmPP2M { .. } => 2,
            _ => 0,
        }
    }

    fn final_acp(&self) -> f64 {
        if self.config.set_alpha_to_one {
            1.0
        } else {
            self.tables.acp(0)
        }
    }

    fn acp_or_final(&self, t: i64) -> f64 {
        if t >= 0 {
            self.tables.acp(t as usize)
        } else {
            self.final_acp()
        }
    }

    /// The program of evaluation `i`.
    pub fn program(&self, i: usize) -> Vec<Assign> {
        use Slot::*;
        let delta = (self.config.num_train_timesteps / self.steps) as i64;
        match self.kind {
            Kind::Ddim { eta } => {
                let t = self.timesteps[i] as i64;
                let (at, ap) = (self.tables.acp(t as usize), self.acp_or_final(t - delta));
                let var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap);
                let std = eta * var.sqrt();
                let dir = (1.0 - ap - std * std).max(0.0).sqrt();
                let mut terms = vec![
                    (ap.sqrt() / at.sqrt(), X),
                    (dir - ap.sqrt() * (1.0 - at).sqrt() / at.sqrt(), Eps),
                ];
                if eta > 0.0 {
                    terms.push((std, Noise));
                }
                vec![set(X, &terms)]
            }
            Kind::Pndm => {
                let t = self.timesteps[i] as i64;
                // Evaluation 1 repeats timestep t but transfers from t + delta to t.
                let (from, to) = if i == 1 {
                    (t + delta, t)
                } else {
                    (t, t - delta)
                };
                let (at, ap) = (self.tables.acp(from as usize), self.acp_or_final(to));
                let a = (ap / at).sqrt();
                let b = -(ap - at) / (at * (1.0 - ap).sqrt() + (at * (1.0 - at) * ap).sqrt());
                // Hist(0): the sample at evaluation 0; Hist(1..=3): earlier outputs, newest first.
                match i {
                    0 => vec![
                        set(Hist(0), &[(1.0, X)]),
                        set(Hist(1), &[(1.0, Eps)]),
                        set(X, &[(a, X), (b, Eps)]),
                    ],
                    1 => vec![set(X, &[(a, Hist(0)), (0.5 * b, Eps), (0.5 * b, Hist(1))])],
                    _ => {
                        let w: Vec<(f64, Slot)> = match i.min(4) {
                            2 => vec![(1.5, Eps), (-0.5, Hist(1))],
                            3 => vec![
                                (23.0 / 12.0, Eps),
                                (-16.0 / 12.0, Hist(1)),
                                (5.0 / 12.0, Hist(2)),
                            ],
                            _ => vec![
                                (55.0 / 24.0, Eps),
                                (-59.0 / 24.0, Hist(1)),
                                (37.0 / 24.0, Hist(2)),
                                (-9.0 / 24.0, Hist(3)),
                            ],
                        };
                        let mut terms = vec![(a, X)];
                        terms.extend(w.iter().map(|&(c, s)| (b * c, s)));
                        vec![
                            set(X, &terms),
                            set(Hist(3), &[(1.0, Hist(2))]),
                            set(Hist(2), &[(1.0, Hist(1))]),
                            set(Hist(1), &[(1.0, Eps)]),
                        ]
                    }
                }
            }
            Kind::Euler => {
                let (s, n) = (self.sigmas[i], self.sigmas[i + 1]);
                vec![set(X, &[(1.0, X), (n - s, Eps)])]
            }
            Kind::EulerAncestral => {
                let (s, n) = (self.sigmas[i], self.sigmas[i + 1]);
                let up = (n * n * (s * s - n * n) / (s * s)).sqrt();
                let down = (n * n - up * up).max(0.0).sqrt();
                vec![set(X, &[(1.0, X), (down - s, Eps), (up, Noise)])]
            }
            Kind::DpmPP2M { .. } => {
                let ab = |sig: f64| {
                    let a = 1.0 / (sig * sig + 1.0).sqrt();
                    (a, sig * a, a.ln() - (sig * a).ln())
                };
                let (a0, s0, l0) = ab(self.sigmas[i]);
                let (a1, s1, l1) = ab(self.sigmas[i + 1]);
                let h = l1 - l0;
                let phi = a1 * ((-h).exp() - 1.0);
                let ratio = if s1 == 0.0 { 0.0 } else { s1 / s0 };
                // Hist(1) = m_i = (X - s0 Eps) / a0, the data prediction; Hist(0) = m_{i-1}.
                let m = set(Hist(1), &[(1.0 / a0, X), (-s0 / a0, Eps)]);
                let last = i + 1 == self.timesteps.len();
                let update = if i == 0 || last {
                    set(X, &[(ratio, X), (-phi, Hist(1))])
                } else {
                    let (_, _, lp) = ab(self.sigmas[i - 1]);
                    let r = (l0 - lp) / h;
                    set(
                        X,
                        &[
                            (ratio, X),
                            (-phi * (1.0 + 0.5 / r), Hist(1)),
                            (phi * 0.5 / r, Hist(0)),
                        ],
                    )
                };
                vec![m, update, set(Hist(0), &[(1.0, Hist(1))])]
            }
        }
    }
}

/// Rounds to f32 (diffusers stores sigmas as float32).
fn f32r(x: f64) -> f64 {
    x as f32 as f64
}

/// Host buffers of one sampling run: the reference executor of step programs.
pub struct HostState {
    /// The latent.
    pub x: Vec<f32>,
    /// History buffers.
    pub hist: Vec<Vec<f32>>,
}

impl HostState {
    /// Starts from standard-normal `noise` scaled by the sampler's initial sigma.
    pub fn new(sampler: &Sampler, noise: &[f32]) -> HostState {
        let s = sampler.init_noise_sigma();
        HostState {
            x: noise.iter().map(|&v| (v as f64 * s) as f32).collect(),
            hist: vec![vec![0.0; noise.len()]; sampler.history_slots()],
        }
    }

    /// Applies one program given this evaluation's model output and noise.
    pub fn apply(&mut self, program: &[Assign], eps: &[f32], noise: Option<&[f32]>) -> Result<()> {
        for a in program {
            let mut out = vec![0.0f64; self.x.len()];
            for &(c, src) in &a.terms {
                let v: &[f32] = match src {
                    Slot::X => &self.x,
                    Slot::Eps => eps,
                    Slot::Noise => noise.ok_or_else(|| {
                        Error::Config("this sampler step needs noise and none was given".into())
                    })?,
                    Slot::Hist(k) => &self.hist[k],
                };
                if v.len() != out.len() {
                    return Err(Error::shape(
                        "sampler step",
                        format!("a buffer has {} values, the latent {}", v.len(), out.len()),
                    ));
                }
                for (o, &x) in out.iter_mut().zip(v) {
                    *o += c * x as f64;
                }
            }
            let out: Vec<f32> = out.into_iter().map(|v| v as f32).collect();
            match a.dst {
                Slot::X => self.x = out,
                Slot::Hist(k) => self.hist[k] = out,
                Slot::Eps | Slot::Noise => {
                    return Err(Error::Graph(
                        "a step program may not write Eps or Noise".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}
