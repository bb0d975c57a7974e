//! Widgets the panels share: path fields with a file browser, image galleries and thumbnails,
//! job progress with cancel, the similarity heat map, and notifications (toasts and a log).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui::{Color32, ColorImage, TextureHandle, TextureOptions, Vec2};

/// What a path field wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// A file.
    File,
    /// A folder.
    Folder,
    /// Either (a model: diffusers folder or single file).
    Any,
}

/// The in-app file browser (a window listing one folder), shared by every path field.
#[derive(Default)]
pub struct Browser {
    /// The field being browsed for, and what it wants.
    target: Option<(String, Pick)>,
    dir: PathBuf,
    picked: Option<(String, String)>,
}

impl Browser {
    /// A text field for a path with a "Browse" button; returns true when the path changed.
    pub fn field(&mut self, ui: &mut egui::Ui, id: &str, pick: Pick, path: &mut String) -> bool {
        let mut changed = false;
        if let Some((target, p)) = &self.picked {
            if target == id {
                *path = p.clone();
                self.picked = None;
                changed = true;
            }
        }
        ui.horizontal(|ui| {
            let w = (ui.available_width() - 100.0).max(120.0);
            changed |= ui
                .add(egui::TextEdit::singleline(path).desired_width(w))
                .changed();
            if ui.button("Browse…").clicked() {
                let start = PathBuf::from(path.as_str());
                self.dir = if start.is_dir() {
                    start
                } else {
                    start
                        .parent()
                        .filter(|p| p.is_dir())
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| std::env::current_dir().unwrap_or_default())
                };
                self.target = Some((id.to_string(), pick));
            }
        });
        changed
    }

    /// Draws the browser window when a field asked for it.
    pub fn show(&mut self, ctx: &egui::Context) {
        let Some((target, pick)) = self.target.clone() else {
            return;
        };
        let mut open = true;
        let mut chosen: Option<PathBuf> = None;
        egui::Window::new("Choose a path")
            .open(&mut open)
            .default_size([480.0, 360.0])
            .show(ctx, |ui| {
                ui.horizontal(|ui| {
                    if ui.button("Up").clicked() {
                        if let Some(p) = self.dir.parent() {
                            self.dir = p.to_path_buf();
                        }
                    }
                    ui.label(self.dir.display().to_string());
                });
                if pick != Pick::File && ui.button("Use this folder").clicked() {
                    chosen = Some(self.dir.clone());
                }
                ui.separator();
                let mut entries: Vec<(bool, PathBuf)> = std::fs::read_dir(&self.dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .map(|e| (e.path().is_dir(), e.path()))
                            .collect()
                    })
                    .unwrap_or_default();
                entries.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
                egui::ScrollArea::vertical().show(ui, |ui| {
                    for (is_dir, p) in entries {
                        let name = p
                            .file_name()
                            .map(|n| n.to_string_lossy().to_string())
                            .unwrap_or_default();
                        if name.starts_with('.') {
                            continue;
                        }
                        let text = if is_dir { format!("{name}/") } else { name };
                        let r = ui.selectable_label(false, text);
                        if r.double_clicked() || (r.clicked() && is_dir) {
                            if is_dir {
                                self.dir = p;
                            } else if pick != Pick::Folder {
                                chosen = Some(p);
                            }
                        } else if r.clicked() && pick != Pick::Folder {
                            chosen = Some(p);
                        }
                    }
                });
            });
        if let Some(p) = chosen {
            self.picked = Some((target, p.display().to_string()));
            self.target = None;
        } else if !open {
            self.target = None;
        }
    }
}

/// An image the app holds in memory (8-bit RGB) with its texture once shown.
pub struct Shot {
    /// Caption for display.
    pub label: String,
    /// Side in pixels.
    pub size: usize,
    /// Pixels.
    pub rgb: Vec<u8>,
    texture: Option<TextureHandle>,
}

impl Shot {
    /// A new image.
    pub fn new(label: String, size: usize, rgb: Vec<u8>) -> Shot {
        Shot {
            label,
            size,
            rgb,
            texture: None,
        }
    }

    fn texture(&mut self, ctx: &egui::Context) -> &TextureHandle {
        let (size, rgb, label) = (self.size, &self.rgb, &self.label);
        self.texture.get_or_insert_with(|| {
            ctx.load_texture(
                label.clone(),
                ColorImage::from_rgb([size, size], rgb),
                TextureOptions::LINEAR,
            )
        })
    }

    /// Writes the image as a PNG.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        image::RgbImage::from_raw(self.size as u32, self.size as u32, self.rgb.clone())
            .ok_or_else(|| "image buffer has the wrong size".to_string())?
            .save(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// A grid of images; a click opens one enlarged with a Save button.
#[derive(Default)]
pub struct Gallery {
    /// The images, in arrival order.
    pub shots: Vec<Shot>,
    enlarged: Option<usize>,
}

impl Gallery {
    /// Draws the grid with thumbnails of side `thumb` points, labels below.
    pub fn grid(&mut self, ui: &mut egui::Ui, thumb: f32) {
        let ctx = ui.ctx().clone();
        ui.horizontal_wrapped(|ui| {
            for (i, shot) in self.shots.iter_mut().enumerate() {
                ui.vertical(|ui| {
                    let tex = shot.texture(&ctx);
                    let r = ui.add(
                        egui::Image::new((tex.id(), Vec2::splat(thumb)))
                            .sense(egui::Sense::click()),
                    );
                    if r.on_hover_text("click to enlarge").clicked() {
                        self.enlarged = Some(i);
                    }
                    ui.label(egui::RichText::new(&shot.label).small());
                });
            }
        });
    }

    /// Draws the enlarged image, if any; returns the index whose Save was pressed.
    pub fn enlarged(&mut self, ctx: &egui::Context) -> Option<usize> {
        let i = self.enlarged?;
        let mut open = true;
        let mut save = None;
        if let Some(shot) = self.shots.get_mut(i) {
            let title = shot.label.clone();
            egui::Window::new(title)
                .id(egui::Id::unique("enlarged image"))
                .open(&mut open)
                .show(ctx, |ui| {
                    let side = (shot.size as f32).clamp(256.0, 512.0);
                    let tex = shot.texture(ctx);
                    ui.add(egui::Image::new((tex.id(), Vec2::splat(side))));
                    if ui.button("Save").clicked() {
                        save = Some(i);
                    }
                });
        } else {
            open = false;
        }
        if !open {
            self.enlarged = None;
        }
        save
    }

    /// Forgets every image.
    pub fn clear(&mut self) {
        self.shots.clear();
        self.enlarged = None;
    }
}

/// Thumbnails of images, decoded once (at most `side` pixels) and kept by name.
#[derive(Default)]
pub struct Thumbnails {
    cache: HashMap<String, Option<TextureHandle>>,
}

impl Thumbnails {
    /// Draws the thumbnail of the image file `path` (a placeholder when it cannot be read).
    pub fn show(&mut self, ui: &mut egui::Ui, path: &Path, side: f32) -> egui::Response {
        self.show_with(ui, &path.display().to_string(), side, || {
            std::fs::read(path).ok()
        })
    }

    /// Draws the thumbnail of the image called `name`, whose encoded bytes `read` gives the
    /// first time (a placeholder when it gives none or they do not decode).
    pub fn show_with(
        &mut self,
        ui: &mut egui::Ui,
        name: &str,
        side: f32,
        read: impl FnOnce() -> Option<Vec<u8>>,
    ) -> egui::Response {
        let ctx = ui.ctx().clone();
        let tex = self
            .cache
            .entry(name.to_string())
            .or_insert_with(|| {
                let bytes = read()?;
                let img = image::load_from_memory(&bytes)
                    .ok()?
                    .thumbnail(128, 128)
                    .to_rgb8();
                let (w, h) = (img.width() as usize, img.height() as usize);
                Some(ctx.load_texture(
                    name.to_string(),
                    ColorImage::from_rgb([w, h], img.as_raw()),
                    TextureOptions::LINEAR,
                ))
            })
            .clone();
        match tex {
            Some(t) => ui.add(egui::Image::new((t.id(), Vec2::splat(side)))),
            None => ui.add_sized([side, side], egui::Label::new("missing")),
        }
    }

    /// Forgets every thumbnail (files may have changed).
    pub fn clear(&mut self) {
        self.cache.clear();
    }
}

/// A job the panel started, with its latest progress.
pub struct Running {
    /// Job id.
    pub id: u64,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// What is being done.
    pub text: String,
    started: Instant,
    first: Option<(Instant, u64)>,
}

impl Running {
    /// A job just submitted.
    pub fn new(id: u64) -> Running {
        Running {
            id,
            done: 0,
            total: 0,
            text: "waiting for the GPU…".into(),
            started: Instant::now(),
            first: None,
        }
    }

    /// Records a progress event.
    pub fn progress(&mut self, done: u64, total: u64, text: &str) {
        if self.first.is_none() {
            self.first = Some((Instant::now(), done));
        }
        self.done = done;
        self.total = total;
        self.text = text.to_string();
    }

    /// Seconds left at the rate seen since the first progress event.
    pub fn eta(&self) -> Option<f64> {
        let (t, d0) = self.first?;
        let rate = (self.done.saturating_sub(d0)) as f64 / t.elapsed().as_secs_f64();
        (rate > 0.0 && self.total >= self.done).then(|| (self.total - self.done) as f64 / rate)
    }

    /// Draws the bar (step text, ETA) with a `cancel` button if given; returns true when it
    /// was pressed.
    pub fn show(&self, ui: &mut egui::Ui, cancel: Option<&str>) -> bool {
        let frac = if self.total > 0 {
            self.done as f32 / self.total as f32
        } else {
            0.0
        };
        let eta = self
            .eta()
            .map_or(String::new(), |s| format!(" — {} left", seconds(s)));
        let mut cancelled = false;
        ui.horizontal(|ui| {
            let w = (ui.available_width() - 90.0).max(100.0);
            ui.add(
                egui::ProgressBar::new(frac)
                    .desired_width(w)
                    .text(format!("{}{eta}", self.text)),
            );
            if let Some(c) = cancel {
                cancelled = ui.button(c).clicked();
            }
        });
        ui.ctx().request_repaint_after(Duration::from_millis(250));
        cancelled
    }

    /// Seconds since the job was submitted.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// "12 s", "3 min 05 s", "1 h 02 min".
pub fn seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// A colour for `t` in [0, 1]: dark blue through teal and green to yellow (viridis-like).
pub fn heat_colour(t: f32) -> Color32 {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let c: Vec<u8> = (0..3)
        .map(|k| (STOPS[i][k] + f * (STOPS[i + 1][k] - STOPS[i][k])).round() as u8)
        .collect();
    Color32::from_rgb(c[0], c[1], c[2])
}

/// The smallest and largest off-diagonal values of an `n` x `n` matrix (the diagonal of a
/// similarity matrix is 1 and would flatten the colour scale).
pub fn off_diagonal_range(matrix: &[f32], n: usize) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                lo = lo.min(matrix[i * n + j]);
                hi = hi.max(matrix[i * n + j]);
            }
        }
    }
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// The similarity matrix as a heat map coloured from its smallest to its largest off-diagonal
/// value, `block` images per caption outlined along the diagonal; hovering a cell shows its two
/// labels and value.
pub fn heat_map(ui: &mut egui::Ui, labels: &[String], matrix: &[f32], block: usize, side: f32) {
    let n = labels.len();
    if n == 0 || matrix.len() != n * n {
        return;
    }
    let (rect, response) = ui.allocate_exact_size(Vec2::splat(side), egui::Sense::hover());
    let cell = side / n as f32;
    let painter = ui.painter_at(rect);
    let (lo, hi) = off_diagonal_range(matrix, n);
    for i in 0..n {
        for j in 0..n {
            let min = rect.min + Vec2::new(j as f32 * cell, i as f32 * cell);
            painter.rect_filled(
                egui::Rect::from_min_size(min, Vec2::splat(cell)),
                0.0,
                heat_colour((matrix[i * n + j] - lo) / (hi - lo)),
            );
        }
    }
    if block > 0 {
        for b in 0..n.div_ceil(block) {
            let min = rect.min + Vec2::splat(b as f32 * block as f32 * cell);
            let len = (block.min(n - b * block)) as f32 * cell;
            painter.rect_stroke(
                egui::Rect::from_min_size(min, Vec2::splat(len)),
                0.0,
                egui::Stroke::new(1.5, Color32::WHITE),
                egui::StrokeKind::Inside,
            );
        }
    }
    if let Some(p) = response.hover_pos() {
        let (j, i) = (
            ((p.x - rect.min.x) / cell) as usize,
            ((p.y - rect.min.y) / cell) as usize,
        );
        if i < n && j < n {
            response.on_hover_text(format!(
                "{} vs {}: {:.3}",
                labels[i],
                labels[j],
                matrix[i * n + j]
            ));
        }
    }
}

/// How serious a note is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something finished.
    Info,
    /// Something went wrong.
    Error,
}

/// One note.
#[derive(Clone, Debug)]
pub struct Note {
    /// Seriousness.
    pub level: Level,
    /// Text.
    pub text: String,
    /// Seconds since the app started.
    pub at: f64,
}

/// Notifications: short-lived toasts in the corner and a log that keeps everything.
pub struct Notes {
    started: Instant,
    /// Everything noted, oldest first.
    pub log: Vec<Note>,
    /// Toasts on screen with their expiry.
    pub toasts: Vec<(Note, Instant)>,
}

impl Default for Notes {
    fn default() -> Self {
        Notes {
            started: Instant::now(),
            log: Vec::new(),
            toasts: Vec::new(),
        }
    }
}

impl Notes {
    /// Notes `text`; errors stay 12 s on screen, others 5 s.
    pub fn push(&mut self, level: Level, text: impl Into<String>) {
        let note = Note {
            level,
            text: text.into(),
            at: self.started.elapsed().as_secs_f64(),
        };
        match level {
            Level::Error => log::error!("{}", note.text),
            Level::Info => log::info!("{}", note.text),
        }
        let keep = if level == Level::Error { 12 } else { 5 };
        self.toasts
            .push((note.clone(), Instant::now() + Duration::from_secs(keep)));
        self.log.push(note);
    }

    /// An error.
    pub fn error(&mut self, text: impl Into<String>) {
        self.push(Level::Error, text);
    }

    /// An information.
    pub fn info(&mut self, text: impl Into<String>) {
        self.push(Level::Info, text);
    }

    /// Draws the toasts (bottom right), dropping expired ones; each has a close button.
    pub fn show_toasts(&mut self, ctx: &egui::Context) {
        let now = Instant::now();
        self.toasts.retain(|(_, until)| *until > now);
        if self.toasts.is_empty() {
            return;
        }
        let mut close = None;
        egui::Area::new(egui::Id::unique("toasts"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -40.0])
            .show(ctx, |ui| {
                for (i, (note, _)) in self.toasts.iter().enumerate() {
                    let fill = match note.level {
                        Level::Error => Color32::from_rgb(120, 30, 30),
                        Level::Info => Color32::from_rgb(30, 70, 40),
                    };
                    egui::Frame::popup(ui.style()).fill(fill).show(ui, |ui| {
                        ui.set_max_width(420.0);
                        ui.horizontal(|ui| {
                            ui.label(egui::RichText::new(&note.text).color(Color32::WHITE));
                            if ui.small_button("x").clicked() {
                                close = Some(i);
                            }
                        });
                    });
                }
            });
        if let Some(i) = close {
            self.toasts.remove(i);
        }
        ctx.request_repaint_after(Duration::from_millis(500));
    }

    /// Draws the log, newest last.
    pub fn show_log(&self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical()
            .max_height(140.0)
            .stick_to_bottom(true)
            .show(ui, |ui| {
                for n in &self.log {
                    let text = format!("[{}] {}", seconds(n.at), n.text);
                    match n.level {
                        Level::Error => ui.colored_label(Color32::LIGHT_RED, text),
                        Level::Info => ui.label(text),
                    };
                }
            });
    }
}
