//! The Train panel: StableRep, its SimCLR control or StableRep+ on a pool, with start, pause,
//! stop and resume; live plots of the loss (with the multi-positive loss's floor ln(m-1)), the
//! learning rate and the throughput; the run's checkpoints.

use std::path::{Path, PathBuf};

use egui_plot::{HLine, Legend, Line, Plot, PlotPoints};

use super::settings::{Settings, TrainSettings};
use super::widgets::{Notes, Pick, Running};
use super::{Panel, Shell};
use crate::models::config::ModelConfig;
use crate::models::stablerep::{HeadConfig, PlusConfig};
use crate::models::text::TextConfig;
use crate::models::vit::{Stem, VitConfig};
use crate::nn::schedule::Schedule;
use crate::train::pool_run::PoolRun;
use crate::worker::{Event, Job};

/// ViT presets: (name, width, depth, heads).
pub const PRESETS: [(&str, usize, usize, usize); 4] = [
    ("ViT-Ti", 192, 12, 3),
    ("ViT-S", 384, 12, 6),
    ("ViT-B", 768, 12, 12),
    ("ViT-L", 1024, 24, 16),
];

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RunState {
    /// Nothing started.
    #[default]
    Idle,
    /// Training.
    Running,
    /// Paused: checkpointed, Resume continues.
    Paused,
    /// Stopped by the user (checkpointed).
    Stopped,
    /// Reached its last step.
    Finished,
    /// Ended with an error.
    Failed,
}

/// One logged step.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// Step.
    pub step: u64,
    /// Loss.
    pub loss: f32,
    /// Learning rate.
    pub lr: f64,
    /// Images per second.
    pub images_per_second: f64,
}

/// The Train panel's state.
#[derive(Default)]
pub struct TrainPanel {
    /// The job in flight.
    pub running: Option<Running>,
    /// Where the run stands.
    pub state: RunState,
    stop_requested: bool,
    /// Start was pressed while the output folder holds a checkpoint: ask first.
    confirm_restart: bool,
    /// Logged steps of the run (kept across pause and resume).
    pub metrics: Vec<Metric>,
    /// Checkpoints in the output folder: (file name, bytes).
    pub checkpoints: Vec<(String, u64)>,
    /// Images per caption of the run plotted (for the floor line).
    images_per_caption: usize,
}

/// The run the form describes, or what is wrong with it.
pub fn build_run(t: &TrainSettings, resume: bool) -> Result<PoolRun, String> {
    if t.pool.trim().is_empty() || t.out.trim().is_empty() {
        return Err("choose a pool (or image) folder and an output folder".into());
    }
    let simclr = t.method == "simclr";
    if t.labelled_folder && !simclr {
        return Err(
            "a labelled folder holds one image per caption: train it with SimCLR (StableRep \
             needs several images per caption, from a pool)"
                .into(),
        );
    }
    if t.captions == 0 || t.images < 2 {
        return Err("want at least 1 caption per batch and 2 images (or crops) per caption".into());
    }
    if t.steps == 0 {
        return Err("want at least one step".into());
    }
    let vit = VitConfig {
        img_size: t.img_size,
        patch: t.patch,
        width: t.width,
        depth: t.depth,
        heads: t.heads,
        mlp: 4 * t.width,
        stem: Stem::Patch,
    };
    vit.validate().map_err(|e| e.to_string())?;
    let plus = if t.method == "stablerep-plus" {
        let text = TextConfig {
            context: t.text_context,
            vocab: crate::text::tokenizer::VOCAB,
            width: t.text_width,
            layers: t.text_layers,
            heads: (t.text_width / 64).max(1),
            mlp: 4 * t.text_width,
        };
        text.validate().map_err(|e| e.to_string())?;
        Some(PlusConfig {
            text,
            embed: t.embed_dim,
        })
    } else {
        None
    };
    let labelled = t.labelled_folder;
    Ok(PoolRun {
        pool: PathBuf::from(t.pool.trim()),
        model: ModelConfig {
            vit,
            head: HeadConfig {
                hidden: t.head_hidden,
                out: t.head_out,
            },
            plus,
        },
        init: None,
        fresh_init: crate::models::stablerep::Init::Official,
        captions: t.captions,
        images_per_caption: t.images,
        steps: t.steps,
        lr: t.lr,
        schedule: Schedule::Cosine {
            warmup: t.warmup.min(t.steps),
            total: t.steps,
        },
        weight_decay: t.weight_decay,
        temperature: t.temperature,
        augment: t.augment,
        augment_config: None,
        simclr,
        seed: t.seed,
        checkpoint_every: t.checkpoint_every.max(1),
        log_every: t.log_every.max(1),
        out: PathBuf::from(t.out.trim()),
        resume,
        labelled_folder: labelled,
        source_size: labelled.then(|| (t.img_size * 8).div_ceil(7)),
        head_dim: 64,
        chunk: None,
    })
}

/// The `.safetensors` files of `dir` with their sizes, sorted by name.
pub fn list_checkpoints(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().to_string(),
                        e.metadata().map_or(0, |m| m.len()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl TrainPanel {
    /// Starts a run (`resume`: from the output folder's last checkpoint).
    pub fn start(&mut self, shell: &mut Shell, t: &TrainSettings, resume: bool) {
        match build_run(t, resume) {
            Ok(run) => {
                if !resume {
                    self.metrics.clear();
                }
                self.images_per_caption = run.images_per_caption;
                let id = shell.submit(Panel::Train, Job::Train { run: Box::new(run) });
                self.running = Some(Running::new(id));
                self.state = RunState::Running;
                self.stop_requested = false;
            }
            Err(e) => shell.notes.error(e),
        }
    }

    /// Takes an event of the panel's job.
    pub fn on_event(&mut self, e: &Event, t: &TrainSettings, notes: &mut Notes) {
        match e {
            Event::Progress {
                done, total, text, ..
            } => {
                if let Some(r) = &mut self.running {
                    r.progress(*done, *total, text);
                }
            }
            Event::Metric {
                step,
                loss,
                lr,
                images_per_second,
                ..
            } => {
                self.metrics.retain(|m| m.step < *step);
                self.metrics.push(Metric {
                    step: *step,
                    loss: *loss,
                    lr: *lr,
                    images_per_second: *images_per_second,
                });
            }
            Event::Finished { seconds, .. } => {
                self.running = None;
                self.state = RunState::Finished;
                notes.info(format!(
                    "training finished in {}: {}",
                    super::widgets::seconds(*seconds),
                    Path::new(t.out.trim())
                        .join("checkpoint-last.safetensors")
                        .display()
                ));
            }
            Event::Cancelled { .. } => {
                self.running = None;
                self.state = if self.stop_requested {
                    RunState::Stopped
                } else {
                    RunState::Paused
                };
                notes.info("training checkpointed and paused: Resume continues it");
            }
            Event::Failed { error, .. } => {
                self.running = None;
                self.state = RunState::Failed;
                notes.error(format!("training failed: {error}"));
            }
            _ => {}
        }
        if e.is_end() {
            self.checkpoints = list_checkpoints(Path::new(t.out.trim()));
        }
    }

    /// Draws the panel.
    pub fn ui(&mut self, ui: &mut egui::Ui, shell: &mut Shell, settings: &mut Settings) {
        ui.heading("Train");
        let t = &mut settings.train;
        form(ui, shell, t);
        let idle = self.running.is_none();
        let resumable = Path::new(t.out.trim())
            .join("checkpoint-last.safetensors")
            .is_file();
        let mut action = None;
        ui.horizontal(|ui| {
            if ui
                .add_enabled(idle, egui::Button::new("Start training"))
                .on_hover_text("a fresh run (asks before replacing a run in the output folder)")
                .clicked()
            {
                action = Some(false);
            }
            if ui
                .add_enabled(idle && resumable, egui::Button::new("Resume"))
                .on_hover_text("continue from checkpoint-last.safetensors")
                .clicked()
            {
                action = Some(true);
            }
            if let Some(r) = &self.running {
                if ui.button("Pause").clicked() {
                    shell.cancel(r.id);
                }
                if ui.button("Stop").clicked() {
                    self.stop_requested = true;
                    shell.cancel(r.id);
                }
            }
            ui.label(format!("{:?}", self.state));
        });
        match action {
            Some(false) if resumable => self.confirm_restart = true,
            Some(resume) => self.start(shell, t, resume),
            None => {}
        }
        if self.confirm_restart {
            ui.horizontal(|ui| {
                ui.colored_label(
                    egui::Color32::YELLOW,
                    "The output folder holds a run: starting over replaces its checkpoints.",
                );
                if ui.button("Start over").clicked() {
                    self.confirm_restart = false;
                    self.start(shell, t, false);
                }
                if ui.button("Keep it").clicked() {
                    self.confirm_restart = false;
                }
            });
        }
        if let Some(r) = &self.running {
            r.show(ui, None);
        }
        self.plots(ui);
        ui.separator();
        ui.horizontal(|ui| {
            ui.strong("Checkpoints");
            if ui.button("Refresh").clicked() {
                self.checkpoints = list_checkpoints(Path::new(settings.train.out.trim()));
            }
        });
        for (name, bytes) in &self.checkpoints {
            ui.horizontal(|ui| {
                ui.label(format!("{name} ({:.1} MB)", *bytes as f64 / 1e6));
                if ui.button("Evaluate this").clicked() {
                    settings.evaluate.checkpoint = Path::new(settings.train.out.trim())
                        .join(name)
                        .display()
                        .to_string();
                    settings.evaluate.head_dim = settings.train.attention_head_dim();
                    shell
                        .notes
                        .info(format!("{name} chosen on the Evaluate panel"));
                }
            });
        }
    }

    /// Loss (with the floor), learning rate and throughput.
    fn plots(&self, ui: &mut egui::Ui) {
        let loss: Vec<[f64; 2]> = self
            .metrics
            .iter()
            .map(|m| [m.step as f64, m.loss as f64])
            .collect();
        let lr: Vec<[f64; 2]> = self.metrics.iter().map(|m| [m.step as f64, m.lr]).collect();
        let ips: Vec<[f64; 2]> = self
            .metrics
            .iter()
            .map(|m| [m.step as f64, m.images_per_second])
            .collect();
        let m = self.images_per_caption;
        ui.strong(format!("Loss ({} points)", loss.len()));
        Plot::new("loss plot")
            .height(200.0)
            .legend(Legend::default())
            .x_axis_label("step")
            .show(ui, |p| {
                p.line(Line::new("loss", PlotPoints::from(loss)));
                if m >= 2 {
                    p.hline(HLine::new("floor ln(m-1)", ((m - 1) as f64).ln()));
                }
            });
        ui.columns(2, |cols| {
            cols[0].strong("Learning rate");
            Plot::new("lr plot")
                .height(140.0)
                .x_axis_label("step")
                .show(&mut cols[0], |p| {
                    p.line(Line::new("lr", PlotPoints::from(lr)))
                });
            cols[1].strong("Images / s");
            Plot::new("throughput plot")
                .height(140.0)
                .x_axis_label("step")
                .show(&mut cols[1], |p| {
                    p.line(Line::new("images/s", PlotPoints::from(ips)))
                });
        });
    }
}

/// The run's settings.
fn form(ui: &mut egui::Ui, shell: &mut Shell, t: &mut TrainSettings) {
    egui::Grid::new("train form").num_columns(4).show(ui, |ui| {
        ui.label("Pool folder");
        shell
            .browser
            .field(ui, "train pool", Pick::Folder, &mut t.pool);
        ui.checkbox(&mut t.labelled_folder, "labelled real images")
            .on_hover_text("a folder of class folders: every image is its own caption (SimCLR)");
        ui.end_row();
        ui.label("Output folder");
        shell
            .browser
            .field(ui, "train out", Pick::Folder, &mut t.out);
        ui.end_row();
        ui.label("Method");
        egui::ComboBox::from_id_salt("method")
            .selected_text(t.method.clone())
            .show_ui(ui, |ui| {
                for k in ["stablerep", "simclr", "stablerep-plus"] {
                    ui.selectable_value(&mut t.method, k.to_string(), k);
                }
            });
        ui.end_row();
        ui.label("Encoder");
        ui.horizontal(|ui| {
            let name = PRESETS
                .iter()
                .find(|p| (p.1, p.2, p.3) == (t.width, t.depth, t.heads))
                .map_or("custom", |p| p.0);
            egui::ComboBox::from_id_salt("preset")
                .selected_text(name)
                .show_ui(ui, |ui| {
                    for p in PRESETS {
                        if ui.selectable_label(name == p.0, p.0).clicked() {
                            (t.width, t.depth, t.heads) = (p.1, p.2, p.3);
                        }
                    }
                });
            ui.label("width");
            ui.add(egui::DragValue::new(&mut t.width).range(8..=2048));
            ui.label("depth");
            ui.add(egui::DragValue::new(&mut t.depth).range(1..=48));
            ui.label("heads");
            ui.add(egui::DragValue::new(&mut t.heads).range(1..=32));
        });
        ui.end_row();
        ui.label("Input");
        ui.horizontal(|ui| {
            ui.label("size");
            ui.add(egui::DragValue::new(&mut t.img_size).range(8..=512));
            ui.label("patch");
            ui.add(egui::DragValue::new(&mut t.patch).range(2..=32));
        });
        ui.end_row();
        ui.label("Head");
        ui.horizontal(|ui| {
            ui.label("hidden");
            ui.add(egui::DragValue::new(&mut t.head_hidden).range(8..=8192));
            ui.label("out");
            ui.add(egui::DragValue::new(&mut t.head_out).range(2..=4096));
        });
        ui.end_row();
        if t.method == "stablerep-plus" {
            ui.label("Text tower");
            ui.horizontal(|ui| {
                ui.label("width");
                ui.add(egui::DragValue::new(&mut t.text_width).range(64..=1024));
                ui.label("layers");
                ui.add(egui::DragValue::new(&mut t.text_layers).range(1..=24));
                ui.label("context");
                ui.add(egui::DragValue::new(&mut t.text_context).range(8..=77));
                ui.label("embed");
                ui.add(egui::DragValue::new(&mut t.embed_dim).range(8..=1024));
            });
            ui.end_row();
        }
        ui.label("Batch");
        ui.horizontal(|ui| {
            ui.label("n captions");
            ui.add(egui::DragValue::new(&mut t.captions).range(1..=1024));
            ui.label("m images");
            ui.add(egui::DragValue::new(&mut t.images).range(2..=16));
        });
        ui.end_row();
        ui.label("Optimizer");
        ui.horizontal(|ui| {
            ui.label("lr");
            ui.add(
                egui::DragValue::new(&mut t.lr)
                    .speed(1e-5)
                    .range(0.0..=1.0)
                    .max_decimals(6),
            );
            ui.label("steps");
            ui.add(egui::DragValue::new(&mut t.steps).range(1..=10_000_000));
            ui.label("warmup");
            ui.add(egui::DragValue::new(&mut t.warmup));
            ui.label("weight decay");
            ui.add(
                egui::DragValue::new(&mut t.weight_decay)
                    .speed(0.01)
                    .range(0.0..=1.0),
            );
        });
        ui.end_row();
        ui.label("Loss");
        ui.horizontal(|ui| {
            ui.label("temperature");
            ui.add(
                egui::DragValue::new(&mut t.temperature)
                    .speed(0.01)
                    .range(0.01..=1.0),
            );
            ui.checkbox(&mut t.augment, "augment");
            ui.label("seed");
            ui.add(egui::DragValue::new(&mut t.seed));
        });
        ui.end_row();
        ui.label("Every");
        ui.horizontal(|ui| {
            ui.label("checkpoint");
            ui.add(egui::DragValue::new(&mut t.checkpoint_every).range(1..=1_000_000));
            ui.label("log");
            ui.add(egui::DragValue::new(&mut t.log_every).range(1..=10_000));
            ui.label("steps");
        });
        ui.end_row();
    });
}
