//! Noise schedules as diffusers builds them: betas, cumulative alphas, the sigma table, the
//! timestep spacings (`leading`, `trailing`, `linspace`) and Karras sigmas. Tables are computed
//! in f32 in the same order of operations as diffusers (torch float32), coefficients in f64.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The fields of a diffusers `scheduler_config.json` that the samplers read. Missing keys take
/// diffusers' defaults; `timestep_spacing` missing means each sampler's own default.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// `scaled_linear` (SD) or `linear`.
    pub beta_schedule: String,
    /// Training timesteps (1000).
    pub num_train_timesteps: usize,
    /// DDIM/PNDM: the final alpha is 1 (else alphas_cumprod[0]).
    pub set_alpha_to_one: bool,
    /// Offset added to `leading` timesteps.
    pub steps_offset: usize,
    /// `leading`, `trailing` or `linspace`; None = the sampler's default.
    pub timestep_spacing: Option<String>,
    /// Only `epsilon` is supported (SD 1.x).
    pub prediction_type: String,
}

impl Default for SchedulerConfig {
    /// Stable Diffusion 1.5's `scheduler_config.json`.
    fn default() -> Self {
        SchedulerConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            num_train_timesteps: 1000,
            set_alpha_to_one: false,
            steps_offset: 1,
            timestep_spacing: None,
            prediction_type: "epsilon".into(),
        }
    }
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<SchedulerConfig> {
        let c: SchedulerConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: not a scheduler config: {e}")))?;
        if c.prediction_type != "epsilon" {
            return Err(Error::Config(format!(
                "{origin}: prediction_type '{}' is not supported (only 'epsilon', as in SD 1.x)",
                c.prediction_type
            )));
        }
        if !matches!(c.beta_schedule.as_str(), "scaled_linear" | "linear") {
            return Err(Error::Config(format!(
                "{origin}: beta_schedule '{}' is not supported (scaled_linear or linear)",
                c.beta_schedule
            )));
        }
        // beta_start 0 makes sigma 0 at t = 0 (Euler divides by it); beta 1 zeroes alpha.
        if !(c.beta_start > 0.0 && c.beta_start <= c.beta_end && c.beta_end < 1.0) {
            return Err(Error::Config(format!(
                "{origin}: want 0 < beta_start <= beta_end < 1, got beta_start {} and beta_end {}",
                c.beta_start, c.beta_end
            )));
        }
        if c.num_train_timesteps < 2 || c.num_train_timesteps > 100_000 {
            return Err(Error::Config(format!(
                "{origin}: num_train_timesteps must be 2 to 100000, got {}",
                c.num_train_timesteps
            )));
        }
        Ok(c)
    }

    /// The spacing in force for a sampler whose own default is `default`.
    pub fn spacing<'a>(&'a self, default: &'a str) -> &'a str {
        self.timestep_spacing.as_deref().unwrap_or(default)
    }
}

/// The training tables of a config.
#[derive(Clone, Debug)]
pub struct Tables {
    /// Cumulative products of 1 - beta (f32, as torch.cumprod).
    pub alphas_cumprod: Vec<f32>,
    /// sqrt((1 - acp) / acp) per training timestep.
    pub sigmas: Vec<f32>,
}

/// torch.linspace(start, end, n) in float32: start + i * step, the second half from the end.
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let step = ((end - start) / (n - 1) as f64) as f32;
    let (s, e) = (start as f32, end as f32);
    (0..n)
        .map(|i| {
            if i < n / 2 {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl Tables {
    /// Betas, cumulative alphas and sigmas of `c`.
    pub fn new(c: &SchedulerConfig) -> Tables {
        let t = c.num_train_timesteps;
        let betas: Vec<f32> = if c.beta_schedule == "linear" {
            linspace_f32(c.beta_start, c.beta_end, t)
        } else {
            linspace_f32(c.beta_start.sqrt(), c.beta_end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect()
        };
        let mut acc = 1.0f32;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        Tables {
            alphas_cumprod,
            sigmas,
        }
    }

    /// alphas_cumprod at an integer timestep.
    pub fn acp(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] as f64
    }

    /// The sigma table linearly interpolated at a (float) timestep, as numpy.interp.
    pub fn sigma_at(&self, t: f64) -> f64 {
        let n = self.sigmas.len();
        if t <= 0.0 {
            return self.sigmas[0] as f64;
        }
        if t >= (n - 1) as f64 {
            return self.sigmas[n - 1] as f64;
        }
        let i = t.floor() as usize;
        let w = t - i as f64;
        let (a, b) = (self.sigmas[i] as f64, self.sigmas[i + 1] as f64);
        a + (b - a) * w
    }

    /// The (float) timestep of a sigma by log-sigma interpolation (diffusers' `_sigma_to_t`).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let logs: Vec<f64> = self.sigmas.iter().map(|&s| (s as f64).ln()).collect();
        let ls = sigma.max(1e-10).ln();
        let n = logs.len();
        // The last index whose log sigma is <= ls (cumsum(dists >= 0).argmax()).
        let count = logs.iter().filter(|&&l| ls - l >= 0.0).count();
        let low = count.saturating_sub(1).min(n - 2);
        let (lo, hi) = (logs[low], logs[low + 1]);
        let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f64 + w * (low + 1) as f64
    }
}

/// Inference timesteps (descending) for `n` steps under a spacing.
pub fn timesteps(c: &SchedulerConfig, spacing: &str, n: usize) -> Result<Vec<f64>> {
    let t = c.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::Config(format!(
            "the number of steps must be 1..={t}, got {n}"
        )));
    }
    Ok(match spacing {
        "leading" => {
            let ratio = t / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as f64)
                .collect()
        }
        "trailing" => {
            let ratio = t as f64 / n as f64;
            (0..n)
                .map(|i| (t as f64 - i as f64 * ratio).round() - 1.0)
                .collect()
        }
        "linspace" => linspace_f64(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        other => {
            return Err(Error::Config(format!(
                "timestep_spacing '{other}' is not one of leading, trailing, linspace"
            )))
        }
    })
}

/// numpy.linspace in f64.
pub fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                end
            } else {
                start + step * i as f64
            }
        })
        .collect()
}

/// numpy's round half to even.
pub fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Karras et al. (2022) sigmas between `sigma_min` and `sigma_max`, rho 7, descending.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace_f64(0.0, 1.0, n)
        .into_iter()
        .map(|r| (hi + r * (lo - hi)).powf(rho))
        .collect()
}
