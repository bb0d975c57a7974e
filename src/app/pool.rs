//! The Pool panel: a synthetic training pool from a captions file (several images per caption
//! at a low guidance scale, in the official layout), resumable, and a browser that shows each
//! caption with its images in a row.

use std::path::{Path, PathBuf};

use super::generate::{model_form, model_path, options, sampling_form};
use super::settings::{PoolSettings, Settings};
use super::widgets::{Notes, Pick, Running, Thumbnails};
use super::{Panel, Shell};
use crate::data::pool::{read_captions, Pool};
use crate::worker::{Event, Job};

/// Captions shown per page of the browser.
pub const PAGE: usize = 8;

/// The Pool panel's state.
#[derive(Default)]
pub struct PoolPanel {
    /// The job in flight.
    pub running: Option<Running>,
    /// The pool being browsed.
    pub browsing: Option<Pool>,
    /// First caption shown.
    pub page: usize,
    thumbs: Thumbnails,
}

impl PoolPanel {
    /// Starts building the pool.
    pub fn start(&mut self, shell: &mut Shell, settings: &Settings) {
        let p = &settings.pool;
        let built = model_path(settings).and_then(|(model, config)| {
            if p.captions.trim().is_empty() {
                return Err("choose a captions file (one caption per line)".to_string());
            }
            if p.out.trim().is_empty() {
                return Err("choose a pool folder to write".to_string());
            }
            let captions =
                read_captions(Path::new(p.captions.trim())).map_err(|e| e.to_string())?;
            let mut options = options(&p.sampling, "", "", p.images)?;
            options.save_size = (p.save_size > 0).then_some(p.save_size);
            Ok(Job::Pool {
                model,
                config,
                options,
                captions,
                shard: (0, 1),
                resume: p.resume,
                out: PathBuf::from(p.out.trim()),
            })
        });
        match built {
            Ok(job) => {
                let id = shell.submit(Panel::Pool, job);
                self.running = Some(Running::new(id));
            }
            Err(e) => shell.notes.error(e),
        }
    }

    /// Opens the pool in `dir` for browsing.
    pub fn open(&mut self, dir: &Path, notes: &mut Notes) {
        self.thumbs.clear();
        match Pool::open(dir) {
            Ok(p) => {
                self.browsing = Some(p);
                self.page = 0;
            }
            Err(e) => {
                self.browsing = None;
                notes.error(format!("cannot open the pool: {e}"));
            }
        }
    }

    /// Takes an event of the panel's job.
    pub fn on_event(&mut self, e: &Event, settings: &PoolSettings, notes: &mut Notes) {
        match e {
            Event::Progress {
                done, total, text, ..
            } => {
                if let Some(r) = &mut self.running {
                    r.progress(*done, *total, text);
                }
            }
            Event::Finished { seconds, .. } => {
                self.running = None;
                notes.info(format!(
                    "pool written to {} in {}",
                    settings.out,
                    super::widgets::seconds(*seconds)
                ));
                self.open(Path::new(settings.out.trim()), notes);
            }
            Event::Cancelled { .. } => {
                self.running = None;
                notes.info("pool building paused: Build again with Resume continues it");
            }
            Event::Failed { error, .. } => {
                self.running = None;
                notes.error(format!("pool building failed: {error}"));
            }
            _ => {}
        }
    }

    /// Draws the panel.
    pub fn ui(&mut self, ui: &mut egui::Ui, shell: &mut Shell, settings: &mut Settings) {
        ui.heading("Build a synthetic pool");
        if ui
            .button("Mini-world: the built-in model and world captions")
            .on_hover_text(
                "writes the simple world's captions (an object, sometimes its background) \
                 beside the pool folder and fills this form and the Train panel for the \
                 StableRep experiment in miniature",
            )
            .clicked()
        {
            match crate::world::builtin_model()
                .map_err(|e| e.to_string())
                .and_then(|m| super::miniworld::use_world_captions(settings, &m))
            {
                Ok(f) => shell
                    .notes
                    .info(format!("mini-world captions in {}", f.display())),
                Err(e) => shell.notes.error(e),
            }
        }
        model_form(ui, shell, settings);
        let p = &mut settings.pool;
        egui::Grid::new("pool form").num_columns(2).show(ui, |ui| {
            ui.label("Captions file");
            shell
                .browser
                .field(ui, "pool captions", Pick::File, &mut p.captions);
            ui.end_row();
            ui.label("Pool folder");
            shell
                .browser
                .field(ui, "pool out", Pick::Folder, &mut p.out);
            ui.end_row();
            ui.label("Images per caption");
            ui.add(egui::Slider::new(&mut p.images, 1..=16));
            ui.end_row();
            ui.label("Saved size (0: as generated)");
            ui.add(egui::DragValue::new(&mut p.save_size).range(0..=1024));
            ui.end_row();
            ui.label("Resume");
            ui.checkbox(&mut p.resume, "skip captions whose images exist");
            ui.end_row();
        });
        sampling_form(ui, "pool sampling", &mut p.sampling);
        let idle = self.running.is_none();
        let mut build = false;
        let mut open = false;
        ui.horizontal(|ui| {
            build = ui
                .add_enabled(idle, egui::Button::new("Build pool"))
                .clicked();
            open = ui.button("Browse pool").clicked();
        });
        if build {
            self.start(shell, settings);
        }
        if open {
            self.open(Path::new(settings.pool.out.trim()), shell.notes);
        }
        if let Some(r) = &self.running {
            if r.show(ui, Some("Pause")) {
                shell.cancel(r.id);
            }
        }
        ui.separator();
        self.browser(ui);
    }

    /// Captions with their images, a page at a time.
    fn browser(&mut self, ui: &mut egui::Ui) {
        let Some(pool) = &self.browsing else {
            return;
        };
        let n = pool.captions.len();
        ui.horizontal(|ui| {
            ui.strong(format!(
                "{}: {n} captions × {} images",
                pool.dir.display(),
                pool.images_per_caption()
            ));
            if ui
                .add_enabled(self.page > 0, egui::Button::new("< Previous"))
                .clicked()
            {
                self.page = self.page.saturating_sub(PAGE);
            }
            if ui
                .add_enabled(self.page + PAGE < n, egui::Button::new("Next >"))
                .clicked()
            {
                self.page += PAGE;
            }
        });
        for i in self.page..(self.page + PAGE).min(n) {
            ui.horizontal(|ui| {
                ui.add_sized(
                    [220.0, 64.0],
                    egui::Label::new(format!("{}. {}", i + 1, pool.captions[i].text)).wrap(),
                );
                for j in 0..pool.images_per_caption() {
                    self.thumbs.show_with(ui, &pool.image_name(i, j), 64.0, || {
                        pool.read_bytes(i, j).ok().map(|(b, _)| b)
                    });
                }
            });
        }
    }
}
