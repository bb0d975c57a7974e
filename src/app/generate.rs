//! The Generate panel: a Stable Diffusion model, a prompt and the sampler's settings; images
//! appear in a grid as they finish, enlarge on click and save as PNGs. One click compares
//! guidance scales side by side for the same prompt and seed.

use std::path::PathBuf;

use super::settings::{Sampling, Settings};
use super::widgets::{Gallery, Notes, Pick, Running, Shot};
use super::{Panel, Shell};
use crate::diffusion::model::GenerateOptions;
use crate::diffusion::sampler::Kind;
use crate::worker::{Event, Job};

/// Sampler names the panels offer.
pub const SAMPLERS: [&str; 6] = [
    "ddim",
    "pndm",
    "euler",
    "euler-a",
    "dpmpp-2m",
    "dpmpp-2m-karras",
];

/// Image sizes the panels offer (multiples of 8; SD 1.x is trained at 512).
pub const SIZES: [usize; 8] = [32, 64, 128, 256, 384, 512, 640, 768];

/// The Generate panel's state.
#[derive(Default)]
pub struct GeneratePanel {
    /// The images of the last run.
    pub gallery: Gallery,
    /// The job in flight.
    pub running: Option<Running>,
    /// Prompt and seed of the last run (for file names).
    last: Option<(String, u64)>,
    /// The model of the last run (remembered once it worked).
    model: String,
}

/// Sampling options from the form.
pub fn options(
    s: &Sampling,
    prompt: &str,
    negative: &str,
    images: usize,
) -> Result<GenerateOptions, String> {
    let sampler = Kind::parse(&s.sampler, s.eta).map_err(|e| e.to_string())?;
    let half_weights = match s.weights.as_str() {
        "f16" => Some(true),
        "f32" => Some(false),
        _ => None,
    };
    let half_activations = match s.precision.as_str() {
        "f16" => Some(true),
        "f32" => Some(false),
        _ => None,
    };
    if s.size == 0 || !s.size.is_multiple_of(8) {
        return Err(format!("size {} is not a positive multiple of 8", s.size));
    }
    if s.steps == 0 || images == 0 {
        return Err("steps and images must be at least 1".into());
    }
    Ok(GenerateOptions {
        prompt: prompt.to_string(),
        negative: negative.to_string(),
        images,
        guidance: s.guidance,
        steps: s.steps,
        sampler,
        seed: s.seed,
        caption: 0,
        size: s.size,
        half_weights,
        half_activations,
        save_size: None,
        init_noise: None,
    })
}

/// The model row: path (with browser and recent models) and the single-file config folder.
pub fn model_form(ui: &mut egui::Ui, shell: &mut Shell, settings: &mut Settings) {
    egui::Grid::new("model form").num_columns(2).show(ui, |ui| {
        ui.label("Model");
        ui.vertical(|ui| {
            shell
                .browser
                .field(ui, "model", Pick::Any, &mut settings.model);
            if !settings.recent_models.is_empty() {
                let mut pick = None;
                egui::ComboBox::from_id_salt("recent models")
                    .selected_text("recent models")
                    .show_ui(ui, |ui| {
                        for m in &settings.recent_models {
                            if ui.selectable_label(false, m).clicked() {
                                pick = Some(m.clone());
                            }
                        }
                    });
                if let Some(m) = pick {
                    settings.model = m;
                }
            }
            if ui
                .button("Use the built-in model")
                .on_hover_text(
                    "the mini-world model shipped in assets/world-sd (32 x 32 images of \
                     coloured shapes; docs/world.md)",
                )
                .clicked()
            {
                match crate::world::builtin_model() {
                    Ok(p) => use_builtin(settings, &p.display().to_string()),
                    Err(e) => shell.notes.error(e.to_string()),
                }
            }
        });
        ui.end_row();
        ui.label("Config (single file)").on_hover_text(
            "a diffusers folder whose configs describe a single-file checkpoint; empty: SD 1.5's",
        );
        shell
            .browser
            .field(ui, "model config", Pick::Folder, &mut settings.model_config);
        ui.end_row();
    });
}

/// The sampler's fields (guidance, steps, sampler, seed, size, weights).
pub fn sampling_form(ui: &mut egui::Ui, id: &str, s: &mut Sampling) {
    egui::Grid::new(id).num_columns(2).show(ui, |ui| {
        ui.label("Guidance scale");
        ui.add(egui::Slider::new(&mut s.guidance, 0.0..=20.0).step_by(0.5));
        ui.end_row();
        ui.label("Steps");
        ui.add(egui::Slider::new(&mut s.steps, 1..=150));
        ui.end_row();
        ui.label("Sampler");
        egui::ComboBox::from_id_salt(format!("{id} sampler"))
            .selected_text(s.sampler.clone())
            .show_ui(ui, |ui| {
                for k in SAMPLERS {
                    ui.selectable_value(&mut s.sampler, k.to_string(), k);
                }
            });
        ui.end_row();
        if s.sampler == "ddim" {
            ui.label("DDIM eta");
            ui.add(egui::Slider::new(&mut s.eta, 0.0..=1.0));
            ui.end_row();
        }
        ui.label("Seed");
        ui.horizontal(|ui| {
            ui.add(egui::DragValue::new(&mut s.seed));
            if ui.button("Random").on_hover_text("a random seed").clicked() {
                s.seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64 % 1_000_000);
            }
        });
        ui.end_row();
        ui.label("Size");
        egui::ComboBox::from_id_salt(format!("{id} size"))
            .selected_text(format!("{0} × {0}", s.size))
            .show_ui(ui, |ui| {
                for k in SIZES {
                    ui.selectable_value(&mut s.size, k, format!("{k} × {k}"));
                }
            });
        ui.end_row();
        ui.label("UNet weights");
        egui::ComboBox::from_id_salt(format!("{id} weights"))
            .selected_text(s.weights.clone())
            .show_ui(ui, |ui| {
                for k in ["auto", "f16", "f32"] {
                    ui.selectable_value(&mut s.weights, k.to_string(), k);
                }
            })
            .response
            .on_hover_text("f16 halves the UNet's memory; arithmetic stays f32");
        ui.end_row();
        ui.label("Activations");
        egui::ComboBox::from_id_salt(format!("{id} precision"))
            .selected_text(s.precision.clone())
            .show_ui(ui, |ui| {
                for k in ["auto", "f16", "f32"] {
                    ui.selectable_value(&mut s.precision, k.to_string(), k);
                }
            })
            .response
            .on_hover_text(
                "f16 stores convolution patches and attention in half precision (needs \
                 shader-f16; auto: on GPUs that have it); arithmetic stays f32",
            );
        ui.end_row();
    });
}

/// Guidance scales from "1 2 4, 8".
pub fn parse_scales(text: &str) -> Result<Vec<f64>, String> {
    let v: Result<Vec<f64>, _> = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(str::parse::<f64>)
        .collect();
    match v {
        Ok(v) if !v.is_empty() && v.iter().all(|w| w.is_finite() && *w >= 0.0) => Ok(v),
        _ => Err(format!(
            "guidance scales '{text}': want numbers >= 0 separated by spaces"
        )),
    }
}

/// Points the forms at the built-in model (`path`) with settings that suit it: its 32 x 32
/// size, guidance 2, 20 DPM-Solver++ steps, and a caption of its world as the prompt.
pub fn use_builtin(settings: &mut Settings, path: &str) {
    settings.model = path.to_string();
    settings.model_config.clear();
    settings.remember_model(path);
    for s in [&mut settings.generate.sampling, &mut settings.pool.sampling] {
        s.size = 32;
        s.guidance = 2.0;
        s.steps = 20;
        s.sampler = "dpmpp-2m-karras".into();
    }
    settings.generate.prompt = "a red star on a beige background".into();
}

/// A model path from the form, or an error to show.
pub fn model_path(settings: &Settings) -> Result<(PathBuf, Option<PathBuf>), String> {
    let m = settings.model.trim();
    if m.is_empty() {
        return Err(
            "choose a model first: a diffusers folder, a .safetensors file, or the built-in model"
                .into(),
        );
    }
    let c = settings.model_config.trim();
    Ok((PathBuf::from(m), (!c.is_empty()).then(|| PathBuf::from(c))))
}

impl GeneratePanel {
    /// Starts a generation (or, with `sweep`, the guidance comparison).
    pub fn start(&mut self, shell: &mut Shell, settings: &Settings, sweep: bool) {
        let g = &settings.generate;
        let built = model_path(settings).and_then(|(model, config)| {
            let images = if sweep { 1 } else { g.images };
            let options = options(&g.sampling, &g.prompt, &g.negative, images)?;
            Ok(if sweep {
                Job::GuidanceSweep {
                    model,
                    config,
                    options,
                    scales: parse_scales(&g.sweep)?,
                }
            } else {
                Job::Generate {
                    model,
                    config,
                    options,
                }
            })
        });
        match built {
            Ok(job) => {
                self.last = Some((g.prompt.clone(), g.sampling.seed));
                self.model = settings.model.clone();
                self.gallery.clear();
                let id = shell.submit(Panel::Generate, job);
                self.running = Some(Running::new(id));
            }
            Err(e) => shell.notes.error(e),
        }
    }

    /// Takes an event of the panel's job.
    pub fn on_event(&mut self, e: &Event, settings: &mut Settings, notes: &mut Notes) {
        match e {
            Event::Progress {
                done, total, text, ..
            } => {
                if let Some(r) = &mut self.running {
                    r.progress(*done, *total, text);
                }
            }
            Event::Image {
                label, size, rgb, ..
            } => self
                .gallery
                .shots
                .push(Shot::new(label.clone(), *size, rgb.clone())),
            Event::Finished { seconds, .. } => {
                self.running = None;
                settings.remember_model(&self.model);
                notes.info(format!(
                    "generated {} images in {}",
                    self.gallery.shots.len(),
                    super::widgets::seconds(*seconds)
                ));
            }
            Event::Cancelled { .. } => {
                self.running = None;
                notes.info("generation cancelled");
            }
            Event::Failed { error, .. } => {
                self.running = None;
                notes.error(format!("generation failed: {error}"));
            }
            _ => {}
        }
    }

    /// Draws the panel.
    pub fn ui(&mut self, ui: &mut egui::Ui, shell: &mut Shell, settings: &mut Settings) {
        ui.heading("Generate");
        model_form(ui, shell, settings);
        let g = &mut settings.generate;
        egui::Grid::new("prompt form")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("Prompt");
                ui.add(egui::TextEdit::multiline(&mut g.prompt).desired_rows(2));
                ui.end_row();
                ui.label("Negative prompt");
                ui.text_edit_singleline(&mut g.negative);
                ui.end_row();
                ui.label("Images per prompt");
                ui.add(egui::Slider::new(&mut g.images, 1..=16));
                ui.end_row();
            });
        sampling_form(ui, "generate sampling", &mut g.sampling);
        ui.horizontal(|ui| {
            ui.label("Compare guidance scales");
            ui.add(egui::TextEdit::singleline(&mut g.sweep).desired_width(140.0));
        });
        let idle = self.running.is_none();
        let mut action = None;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(idle, egui::Button::new("Generate images"))
                .clicked()
            {
                action = Some(false);
            }
            if ui
                .add_enabled(idle, egui::Button::new("Compare guidance"))
                .on_hover_text("one image per scale, same prompt and seed")
                .clicked()
            {
                action = Some(true);
            }
            if !self.gallery.shots.is_empty() && ui.button("Save all").clicked() {
                for i in 0..self.gallery.shots.len() {
                    self.save(i, &settings.generate.save_dir, shell.notes);
                }
            }
        });
        if let Some(sweep) = action {
            self.start(shell, settings, sweep);
        }
        ui.horizontal(|ui| {
            ui.label("Save to");
            shell.browser.field(
                ui,
                "generate save dir",
                Pick::Folder,
                &mut settings.generate.save_dir,
            );
        });
        if let Some(r) = &self.running {
            if r.show(ui, Some("Cancel")) {
                shell.cancel(r.id);
            }
        }
        ui.separator();
        self.gallery.grid(ui, 160.0);
    }

    /// The enlarged-image window.
    pub fn windows(&mut self, ctx: &egui::Context, settings: &Settings, notes: &mut Notes) {
        if let Some(i) = self.gallery.enlarged(ctx) {
            self.save(i, &settings.generate.save_dir, notes);
        }
    }

    /// Saves image `i` under `dir`, named after the prompt, seed and index.
    fn save(&self, i: usize, dir: &str, notes: &mut Notes) {
        let (prompt, seed) = self.last.clone().unwrap_or_default();
        let slug: String = prompt
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(48)
            .collect();
        let path = PathBuf::from(dir).join(format!("{slug}-seed{seed}-{i:02}.png"));
        match self.gallery.shots[i].save(&path) {
            Ok(()) => notes.info(format!("saved {}", path.display())),
            Err(e) => notes.error(format!("cannot save: {e}")),
        }
    }
}
