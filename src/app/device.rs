//! The Device panel: every adapter wgpu sees, the one in use with its limits and features, the
//! memory the worker holds, and a way to switch adapters.

use super::widgets::{Level, Notes};
use super::Shell;
use crate::gpu::{adapter, AdapterSummary, DeviceReport};
use crate::worker::Event;

/// What the panel asks the app to do.
pub enum Action {
    /// Restart the worker on the adapter matching this filter ("" = the best one).
    Use(String),
    /// Ask for a new report.
    Refresh,
}

/// The Device panel's state.
#[derive(Default)]
pub struct DevicePanel {
    /// Every adapter, best first (listed when the panel is first drawn).
    pub adapters: Option<Vec<AdapterSummary>>,
    /// The worker's device, once it reported.
    pub report: Option<DeviceReport>,
    /// The last error opening the device.
    pub error: Option<String>,
}

/// The filter that picks exactly this adapter: its name and backend.
pub fn filter_for(a: &AdapterSummary) -> String {
    format!("{} {}", a.name, a.backend)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl DevicePanel {
    /// Takes an event of one of the panel's jobs.
    pub fn on_event(&mut self, e: &Event, notes: &mut Notes) {
        match e {
            Event::Device { report, .. } => {
                self.report = Some((**report).clone());
                self.error = None;
            }
            Event::Failed { error, .. } => {
                if self.error.as_deref() != Some(error) {
                    notes.push(Level::Error, format!("device: {error}"));
                }
                self.error = Some(error.clone());
            }
            _ => {}
        }
    }

    /// Draws the panel; returns what the app should do.
    pub fn ui(&mut self, ui: &mut egui::Ui, _shell: &mut Shell, chosen: &str) -> Option<Action> {
        let mut action = None;
        ui.heading("Adapters");
        let adapters = self.adapters.get_or_insert_with(|| {
            let mut all: Vec<AdapterSummary> = adapter::enumerate()
                .iter()
                .map(|a| adapter::summarize(&a.get_info()))
                .collect();
            all.sort_by_key(|a| std::cmp::Reverse(a.score));
            all
        });
        if adapters.is_empty() {
            ui.colored_label(
                egui::Color32::LIGHT_RED,
                "No adapter found. Install a GPU driver, or Mesa's software Vulkan driver \
                 (mesa-vulkan-drivers).",
            );
        }
        egui::Grid::new("adapters")
            .striped(true)
            .num_columns(5)
            .show(ui, |ui| {
                ui.strong("adapter");
                ui.strong("backend");
                ui.strong("type");
                ui.strong("driver");
                ui.label("");
                ui.end_row();
                let using = self
                    .report
                    .as_ref()
                    .map(|r| filter_for(&r.adapter))
                    .unwrap_or_else(|| chosen.to_string());
                for a in adapters.iter() {
                    ui.label(&a.name);
                    ui.label(&a.backend);
                    ui.label(&a.device_type);
                    ui.label(&a.driver);
                    let f = filter_for(a);
                    if f == using {
                        ui.label("in use");
                    } else if ui.button("Use").clicked() {
                        action = Some(Action::Use(f));
                    }
                    ui.end_row();
                }
            });
        ui.horizontal(|ui| {
            if !chosen.is_empty() && ui.button("Use the best adapter").clicked() {
                action = Some(Action::Use(String::new()));
            }
            if ui.button("Rescan adapters").clicked() {
                self.adapters = None;
            }
            if ui.button("Refresh").clicked() {
                action = Some(Action::Refresh);
            }
        });
        ui.separator();
        ui.heading("Device in use");
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::LIGHT_RED, e);
        }
        let Some(r) = &self.report else {
            ui.label("opening the device…");
            return action;
        };
        ui.label(format!(
            "{} · {} · {} · {}",
            r.adapter.name, r.adapter.backend, r.adapter.device_type, r.adapter.driver
        ));
        if r.adapter.device_type == "Cpu" {
            ui.label(
                "A software adapter: everything works, slowly. Small models and tiny images \
                 are the way to try things here.",
            );
        }
        ui.columns(2, |cols| {
            cols[0].strong("Limits");
            egui::Grid::new("limits")
                .striped(true)
                .show(&mut cols[0], |ui| {
                    for (k, v) in &r.limits {
                        ui.label(k);
                        ui.label(v);
                        ui.end_row();
                    }
                });
            cols[1].strong("Memory held by the worker");
            egui::Grid::new("memory")
                .striped(true)
                .show(&mut cols[1], |ui| {
                    ui.label("allocated by the driver");
                    ui.label(r.allocated_bytes.map_or("not reported".into(), mib));
                    ui.end_row();
                    ui.label("reserved from the driver");
                    ui.label(r.reserved_bytes.map_or("not reported".into(), mib));
                    ui.end_row();
                    ui.label("pooled buffers in use");
                    ui.label(mib(r.pool.live_bytes));
                    ui.end_row();
                    ui.label("pooled buffers free");
                    ui.label(mib(r.pool.free_bytes));
                    ui.end_row();
                });
        });
        ui.strong("Features");
        ui.label(if r.features.is_empty() {
            "none".to_string()
        } else {
            r.features.join(", ")
        });
        action
    }
}
