//! The Evaluate panel: a checkpoint's frozen features scored on labelled folders (kNN, linear
//! probe, few-shot), nearest-neighbour retrieval with thumbnails, and the similarity matrix of
//! a pool batch as a heat map, where the caption blocks the loss creates show up.

use std::path::PathBuf;

use super::settings::{EvaluateSettings, Settings};
use super::widgets::{heat_map, off_diagonal_range, Notes, Pick, Running, Thumbnails};
use super::{Panel, Shell};
use crate::eval::knn::FewShot;
use crate::eval::linear::ProbeConfig;
use crate::eval::probe::{Method, Request};
use crate::worker::{Event, Job};

/// An accuracy result: the method, top-1 in [0, 1], and the linear probe's accuracy per base
/// learning rate.
pub type Accuracy = (String, f64, Vec<(f64, f64)>);

/// What the panel's last jobs found.
#[derive(Default)]
pub struct EvaluatePanel {
    /// The job in flight.
    pub running: Option<Running>,
    /// Last accuracy: (method, top-1, per-lr).
    pub accuracy: Option<Accuracy>,
    /// Last retrieval: query and matches with similarity.
    pub neighbours: Option<(PathBuf, Vec<(PathBuf, f32)>)>,
    /// Last similarity matrix: labels, values, images per caption.
    pub similarity: Option<(Vec<String>, Vec<f32>, usize)>,
    /// The method of the job in flight.
    method: String,
    /// Images per caption of the similarity job in flight.
    block: usize,
    thumbs: Thumbnails,
}

fn checkpoint(e: &EvaluateSettings) -> Result<PathBuf, String> {
    let c = e.checkpoint.trim();
    if c.is_empty() {
        return Err("choose a checkpoint".into());
    }
    Ok(PathBuf::from(c))
}

/// The accuracy job the form describes.
pub fn request(e: &EvaluateSettings) -> Result<Request, String> {
    let checkpoint = checkpoint(e)?;
    if e.test.trim().is_empty() {
        return Err("choose a labelled test folder (one sub-folder per class)".into());
    }
    let train = (!e.train.trim().is_empty()).then(|| PathBuf::from(e.train.trim()));
    let method = match e.method.as_str() {
        "linear" => Method::Linear(ProbeConfig {
            epochs: e.epochs,
            ..ProbeConfig::default()
        }),
        "fewshot" => Method::FewShot(FewShot {
            ways: e.ways,
            shots: e.shots,
            queries: 15,
            episodes: e.episodes,
            seed: 0,
        }),
        _ => Method::Knn {
            k: e.k,
            temperature: e.knn_temperature,
        },
    };
    if train.is_none() && !matches!(method, Method::FewShot(_)) {
        return Err(format!("{} needs a labelled train folder", e.method));
    }
    Ok(Request {
        checkpoint,
        head_dim: e.head_dim,
        train,
        test: PathBuf::from(e.test.trim()),
        method,
        features: None,
    })
}

impl EvaluatePanel {
    fn submit(&mut self, shell: &mut Shell, job: Result<Job, String>, method: &str) {
        match job {
            Ok(job) => {
                self.method = method.to_string();
                let id = shell.submit(Panel::Evaluate, job);
                self.running = Some(Running::new(id));
            }
            Err(e) => shell.notes.error(e),
        }
    }

    /// Starts the accuracy evaluation.
    pub fn start(&mut self, shell: &mut Shell, e: &EvaluateSettings) {
        let job = request(e).map(|r| Job::Evaluate {
            request: Box::new(r),
        });
        self.submit(shell, job, &e.method);
    }

    fn start_neighbours(&mut self, shell: &mut Shell, e: &EvaluateSettings) {
        let job = checkpoint(e).and_then(|checkpoint| {
            if e.test.trim().is_empty() {
                return Err("choose a labelled test folder to search".to_string());
            }
            Ok(Job::Neighbours {
                checkpoint,
                head_dim: e.head_dim,
                folder: PathBuf::from(e.test.trim()),
                query: e.query,
                k: e.matches,
            })
        });
        self.submit(shell, job, "retrieval");
    }

    fn start_similarity(&mut self, shell: &mut Shell, e: &EvaluateSettings) {
        let job = checkpoint(e).and_then(|checkpoint| {
            if e.pool.trim().is_empty() {
                return Err("choose a pool folder".to_string());
            }
            Ok(Job::Similarity {
                checkpoint,
                head_dim: e.head_dim,
                pool: PathBuf::from(e.pool.trim()),
                captions: e.batch_captions,
                images: e.batch_images,
            })
        });
        self.block = e.batch_images;
        self.submit(shell, job, "similarity");
        self.similarity = None;
    }

    /// Takes an event of the panel's job.
    pub fn on_event(&mut self, e: &Event, notes: &mut Notes) {
        match e {
            Event::Accuracy {
                accuracy, per_lr, ..
            } => {
                notes.info(format!(
                    "{}: top-1 accuracy {:.2} %",
                    self.method,
                    100.0 * accuracy
                ));
                self.accuracy = Some((self.method.clone(), *accuracy, per_lr.clone()));
            }
            Event::Neighbours { query, matches, .. } => {
                self.neighbours = Some((query.clone(), matches.clone()));
            }
            Event::Similarity { labels, matrix, .. } => {
                self.similarity = Some((labels.clone(), matrix.clone(), self.block));
            }
            Event::Finished { .. } | Event::Cancelled { .. } => self.running = None,
            Event::Failed { error, .. } => {
                self.running = None;
                notes.error(format!("{} failed: {error}", self.method));
            }
            _ => {}
        }
    }

    /// Draws the panel.
    pub fn ui(&mut self, ui: &mut egui::Ui, shell: &mut Shell, settings: &mut Settings) {
        ui.heading("Evaluate");
        if ui
            .button("Mini-world: labelled evaluation renders")
            .on_hover_text(
                "renders held-out labelled shape folders of the simple world and fills the \
                 form with them and the Train panel's checkpoint",
            )
            .clicked()
        {
            match super::miniworld::use_world_eval_sets(settings) {
                Ok((a, b)) => shell.notes.info(format!(
                    "evaluation renders in {} and {}",
                    a.display(),
                    b.display()
                )),
                Err(e) => shell.notes.error(e),
            }
        }
        let e = &mut settings.evaluate;
        let idle = self.running.is_none();
        egui::Grid::new("evaluate form")
            .num_columns(2)
            .show(ui, |ui| {
                ui.label("Checkpoint");
                shell
                    .browser
                    .field(ui, "eval checkpoint", Pick::File, &mut e.checkpoint);
                ui.end_row();
                ui.label("Head width");
                ui.add(egui::DragValue::new(&mut e.head_dim).range(1..=8192));
                ui.end_row();
                ui.label("Train folder (labelled)");
                shell
                    .browser
                    .field(ui, "eval train", Pick::Folder, &mut e.train);
                ui.end_row();
                ui.label("Test folder (labelled)");
                shell
                    .browser
                    .field(ui, "eval test", Pick::Folder, &mut e.test);
                ui.end_row();
            });
        ui.separator();
        ui.strong("Accuracy");
        let mut go = false;
        ui.horizontal(|ui| {
            for (k, name) in [
                ("knn", "kNN"),
                ("linear", "linear probe"),
                ("fewshot", "few-shot"),
            ] {
                ui.radio_value(&mut e.method, k.to_string(), name);
            }
            match e.method.as_str() {
                "linear" => {
                    ui.label("epochs");
                    ui.add(egui::DragValue::new(&mut e.epochs).range(1..=1000));
                }
                "fewshot" => {
                    ui.label("ways");
                    ui.add(egui::DragValue::new(&mut e.ways).range(2..=100));
                    ui.label("shots");
                    ui.add(egui::DragValue::new(&mut e.shots).range(1..=100));
                    ui.label("episodes");
                    ui.add(egui::DragValue::new(&mut e.episodes).range(1..=10_000));
                }
                _ => {
                    ui.label("k");
                    ui.add(egui::DragValue::new(&mut e.k).range(1..=1000));
                    ui.label("temperature");
                    ui.add(
                        egui::DragValue::new(&mut e.knn_temperature)
                            .speed(0.01)
                            .range(0.001..=10.0),
                    );
                }
            }
            go = ui
                .add_enabled(idle, egui::Button::new("Run evaluation"))
                .clicked();
        });
        if go {
            self.start(shell, e);
        }
        if let Some((method, acc, per_lr)) = &self.accuracy {
            ui.label(format!("{method}: top-1 {:.2} %", 100.0 * acc));
            for (lr, a) in per_lr {
                ui.label(format!("  base lr {lr}: {:.2} %", 100.0 * a));
            }
        }
        ui.separator();
        ui.strong("Nearest neighbours in the test folder");
        let mut go = false;
        ui.horizontal(|ui| {
            ui.label("query image #");
            ui.add(egui::DragValue::new(&mut e.query));
            ui.label("matches");
            ui.add(egui::DragValue::new(&mut e.matches).range(1..=64));
            go = ui.add_enabled(idle, egui::Button::new("Search")).clicked();
        });
        if go {
            self.start_neighbours(shell, e);
        }
        if let Some((query, matches)) = &self.neighbours {
            ui.horizontal_wrapped(|ui| {
                ui.vertical(|ui| {
                    self.thumbs.show(ui, query, 96.0);
                    ui.label("query");
                });
                ui.separator();
                for (p, s) in matches {
                    ui.vertical(|ui| {
                        self.thumbs
                            .show(ui, p, 96.0)
                            .on_hover_text(p.display().to_string());
                        ui.label(format!("{s:.3}"));
                    });
                }
            });
        }
        ui.separator();
        ui.strong("Similarity of a pool batch");
        let mut go = false;
        ui.horizontal(|ui| {
            ui.label("pool");
            shell
                .browser
                .field(ui, "eval pool", Pick::Folder, &mut e.pool);
        });
        ui.horizontal(|ui| {
            ui.label("captions");
            ui.add(egui::DragValue::new(&mut e.batch_captions).range(1..=32));
            ui.label("images each");
            ui.add(egui::DragValue::new(&mut e.batch_images).range(1..=16));
            go = ui
                .add_enabled(idle, egui::Button::new("Show matrix"))
                .clicked();
        });
        if go {
            self.start_similarity(shell, e);
        }
        if let Some((labels, matrix, block)) = &self.similarity {
            ui.label(format!(
                "cosine similarity of {} images (caption-major; blocks of {block} share a caption)",
                labels.len()
            ));
            let (lo, hi) = off_diagonal_range(matrix, labels.len());
            ui.label(format!(
                "colour: {lo:.3} (dark blue) to {hi:.3} (yellow); hover a cell for its pair"
            ));
            heat_map(ui, labels, matrix, *block, 320.0);
        }
        if let Some(r) = &self.running {
            if r.show(ui, Some("Cancel")) {
                shell.cancel(r.id);
            }
        }
    }
}
