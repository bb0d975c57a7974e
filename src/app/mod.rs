//! The desktop app (`stablerep app`): egui panels for the device, generation, pool building,
//! training and evaluation. All GPU work runs on a [`Worker`] thread; the UI only sends jobs
//! and draws the events that come back, so it never waits on the GPU, and every long job can be
//! cancelled. Settings persist between runs ([`settings`]); errors appear as toasts and in the
//! log panel.
//!
//! [`App::ui`] draws everything into one `egui::Ui`, so the same state runs in the eframe
//! window ([`run`]) and headless under egui_kittest (`tests/app.rs`).

pub mod device;
pub mod evaluate;
pub mod generate;
pub mod miniworld;
pub mod pool;
pub mod settings;
pub mod train;
pub mod widgets;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::gpu::GpuOptions;
use crate::worker::{Event, Job, Worker};
pub use settings::Settings;
use widgets::{Browser, Notes};

/// The panels, in tab order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Panel {
    /// Adapters, limits, features, memory.
    Device,
    /// Text-to-image.
    Generate,
    /// Synthetic pools.
    Pool,
    /// StableRep training.
    Train,
    /// Frozen-feature evaluation.
    Evaluate,
}

impl Panel {
    /// Every panel.
    pub const ALL: [Panel; 5] = [
        Panel::Device,
        Panel::Generate,
        Panel::Pool,
        Panel::Train,
        Panel::Evaluate,
    ];

    /// Tab title.
    pub fn title(self) -> &'static str {
        match self {
            Panel::Device => "Device",
            Panel::Generate => "Generate",
            Panel::Pool => "Pool",
            Panel::Train => "Train",
            Panel::Evaluate => "Evaluate",
        }
    }

    /// The panel titled `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Panel> {
        Panel::ALL
            .into_iter()
            .find(|p| p.title().eq_ignore_ascii_case(name))
    }
}

/// What panels use to reach the worker and the user.
pub struct Shell<'a> {
    worker: &'a mut Worker,
    owners: &'a mut HashMap<u64, Panel>,
    /// Notifications.
    pub notes: &'a mut Notes,
    /// The file browser.
    pub browser: &'a mut Browser,
}

impl Shell<'_> {
    /// Sends `job` for `panel`; returns its id.
    pub fn submit(&mut self, panel: Panel, job: Job) -> u64 {
        let id = self.worker.submit(job);
        self.owners.insert(id, panel);
        id
    }

    /// Cancels job `id`.
    pub fn cancel(&self, id: u64) {
        self.worker.cancel(id);
    }
}

/// Where the app starts: CLI options of `stablerep app`.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Settings file (default: [`Settings::default_path`]); `None` and no default: not saved.
    pub settings_path: Option<PathBuf>,
    /// Panel to show first.
    pub panel: Option<Panel>,
    /// Model to use (overrides the remembered one).
    pub model: Option<String>,
    /// Prompt (overrides the remembered one).
    pub prompt: Option<String>,
    /// Start the panel's main action at once (Generate, Build pool, Start training, Evaluate).
    pub start: bool,
    /// Device choice.
    pub gpu: GpuOptions,
}

/// The app's whole state.
pub struct App {
    /// Remembered values (panels edit them in place).
    pub settings: Settings,
    saved: Settings,
    settings_path: Option<PathBuf>,
    last_save: Instant,
    /// The panel shown.
    pub panel: Panel,
    worker: Worker,
    gpu: GpuOptions,
    owners: HashMap<u64, Panel>,
    /// Notifications.
    pub notes: Notes,
    browser: Browser,
    start: bool,
    /// The Device panel.
    pub device: device::DevicePanel,
    /// The Generate panel.
    pub generate: generate::GeneratePanel,
    /// The Pool panel.
    pub pool: pool::PoolPanel,
    /// The Train panel.
    pub train: train::TrainPanel,
    /// The Evaluate panel.
    pub evaluate: evaluate::EvaluatePanel,
}

impl App {
    /// The app as `launch` says: settings read from disk, the worker started (its device opens
    /// with the first job, a device report).
    pub fn new(launch: Launch) -> App {
        let settings_path = launch.settings_path.clone().or_else(Settings::default_path);
        let mut notes = Notes::default();
        let (mut settings, warning) = match &settings_path {
            Some(p) => Settings::load(p),
            None => (Settings::default(), None),
        };
        if let Some(w) = warning {
            notes.error(w);
        }
        let saved = settings.clone();
        if let Some(m) = &launch.model {
            settings.model = m.clone();
        }
        if let Some(p) = &launch.prompt {
            settings.generate.prompt = p.clone();
        }
        let mut gpu = launch.gpu.clone();
        if gpu.adapter.is_none() && !settings.adapter.is_empty() {
            gpu.adapter = Some(settings.adapter.clone());
        }
        let panel = launch
            .panel
            .or_else(|| Panel::parse(&settings.panel))
            .unwrap_or(Panel::Generate);
        let mut app = App {
            settings,
            saved,
            settings_path,
            last_save: Instant::now(),
            panel,
            worker: Worker::spawn(gpu.clone()),
            gpu,
            owners: HashMap::new(),
            notes,
            browser: Browser::default(),
            start: launch.start,
            device: device::DevicePanel::default(),
            generate: generate::GeneratePanel::default(),
            pool: pool::PoolPanel::default(),
            train: train::TrainPanel::default(),
            evaluate: evaluate::EvaluatePanel::default(),
        };
        app.refresh_device();
        app
    }

    /// Asks the worker for a device report.
    pub fn refresh_device(&mut self) {
        let id = self.worker.submit(Job::Device);
        self.owners.insert(id, Panel::Device);
    }

    /// Restarts the worker on the adapter matching `filter` ("" = the best one); refused while
    /// a job runs.
    pub fn use_adapter(&mut self, filter: String) {
        if self.busy() {
            self.notes
                .error("wait for the running jobs to end before switching adapters");
            return;
        }
        self.settings.adapter = filter.clone();
        self.gpu.adapter = (!filter.is_empty()).then_some(filter);
        self.worker = Worker::spawn(self.gpu.clone());
        self.owners.clear();
        self.device.report = None;
        self.refresh_device();
    }

    /// Cancels every queued or running job (the window closes: a training run checkpoints the
    /// steps it did, so nothing is lost and closing waits only for the current step).
    pub fn cancel_all(&mut self) {
        for id in self.owners.keys() {
            self.worker.cancel(*id);
        }
    }

    /// True while any job is queued or running.
    pub fn busy(&self) -> bool {
        self.owners.values().any(|p| *p != Panel::Device)
    }

    /// Takes every event the worker has sent and hands it to the panel that owns the job.
    pub fn pump(&mut self) {
        let mut events: Vec<Event> = std::iter::from_fn(|| self.worker.try_recv()).collect();
        // A worker thread that died takes its queued jobs with it: they fail, and a fresh
        // worker takes the next ones (the app never waits on a dead thread).
        if self.worker.respawn_if_dead() {
            let mut lost: Vec<u64> = self.owners.keys().copied().collect();
            lost.retain(|id| !events.iter().any(|e| e.is_end() && e.job() == *id));
            lost.sort();
            events.extend(lost.into_iter().map(|job| Event::Failed {
                job,
                error: "the GPU worker stopped unexpectedly; it was restarted".into(),
            }));
        }
        for e in events {
            let id = e.job();
            let Some(&panel) = self.owners.get(&id) else {
                continue;
            };
            let end = e.is_end();
            match panel {
                Panel::Device => self.device.on_event(&e, &mut self.notes),
                Panel::Generate => self
                    .generate
                    .on_event(&e, &mut self.settings, &mut self.notes),
                Panel::Pool => self.pool.on_event(&e, &self.settings.pool, &mut self.notes),
                Panel::Train => self
                    .train
                    .on_event(&e, &self.settings.train, &mut self.notes),
                Panel::Evaluate => self.evaluate.on_event(&e, &mut self.notes),
            }
            if end {
                self.owners.remove(&id);
                if panel != Panel::Device {
                    self.refresh_device();
                }
            }
        }
    }

    /// Writes the settings now if they changed (the window does it at most once a second and
    /// on exit).
    pub fn save_settings(&mut self) {
        self.persist(true);
    }

    /// Writes the settings when they changed (at most once a second).
    fn persist(&mut self, force: bool) {
        self.settings.panel = self.panel.title().to_string();
        if self.settings == self.saved || (!force && self.last_save.elapsed().as_secs_f64() < 1.0) {
            return;
        }
        self.last_save = Instant::now();
        self.saved = self.settings.clone();
        if let Some(p) = &self.settings_path {
            if let Err(e) = self.settings.save(p) {
                self.notes
                    .error(format!("{}: cannot save settings: {e}", p.display()));
            }
        }
    }

    /// Draws the whole app into `ui` (the window's root), after taking the worker's events.
    pub fn ui(&mut self, ui: &mut egui::Ui) {
        self.pump();
        if std::mem::take(&mut self.start) {
            self.start_main_action();
        }
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("StableRep");
                ui.separator();
                for p in Panel::ALL {
                    let busy = self.owners.values().any(|o| *o == p && p != Panel::Device);
                    let title = if busy {
                        format!("{} (busy)", p.title())
                    } else {
                        p.title().to_string()
                    };
                    if ui.selectable_label(self.panel == p, title).clicked() {
                        self.panel = p;
                    }
                }
            });
        });
        let n = self.notes.log.len();
        let log_title = format!("Log ({n} message{})", if n == 1 { "" } else { "s" });
        egui::Panel::bottom("log").show(ui, |ui| {
            egui::CollapsingHeader::new(log_title)
                .id_salt("log")
                .show(ui, |ui| self.notes.show_log(ui));
        });
        let mut switch = None;
        egui::CentralPanel::default().show(ui, |ui| {
            egui::ScrollArea::vertical()
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    let mut shell = Shell {
                        worker: &mut self.worker,
                        owners: &mut self.owners,
                        notes: &mut self.notes,
                        browser: &mut self.browser,
                    };
                    match self.panel {
                        Panel::Device => {
                            switch = self.device.ui(ui, &mut shell, &self.settings.adapter)
                        }
                        Panel::Generate => self.generate.ui(ui, &mut shell, &mut self.settings),
                        Panel::Pool => self.pool.ui(ui, &mut shell, &mut self.settings),
                        Panel::Train => self.train.ui(ui, &mut shell, &mut self.settings),
                        Panel::Evaluate => self.evaluate.ui(ui, &mut shell, &mut self.settings),
                    }
                });
        });
        let ctx = ui.ctx().clone();
        self.browser.show(&ctx);
        self.generate.windows(&ctx, &self.settings, &mut self.notes);
        self.notes.show_toasts(&ctx);
        match switch {
            Some(device::Action::Use(filter)) => self.use_adapter(filter),
            Some(device::Action::Refresh) => self.refresh_device(),
            None => {}
        }
        if !self.owners.is_empty() {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        self.persist(false);
    }

    /// The shown panel's main action, as if its button was pressed.
    fn start_main_action(&mut self) {
        let mut shell = Shell {
            worker: &mut self.worker,
            owners: &mut self.owners,
            notes: &mut self.notes,
            browser: &mut self.browser,
        };
        match self.panel {
            Panel::Device => {}
            Panel::Generate => self.generate.start(&mut shell, &self.settings, false),
            Panel::Pool => self.pool.start(&mut shell, &self.settings),
            Panel::Train => self.train.start(&mut shell, &self.settings.train, false),
            Panel::Evaluate => self.evaluate.start(&mut shell, &self.settings.evaluate),
        }
    }

    /// Waits up to `timeout` for the worker to finish every job, taking events as they come
    /// (for scripts and tests; the window never calls it).
    pub fn wait_idle(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump();
            if self.owners.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        App::ui(self, ui);
    }

    fn on_exit(&mut self) {
        self.persist(true);
        self.cancel_all();
    }
}

/// Opens the app window and runs until it is closed.
pub fn run(launch: Launch) -> crate::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("StableRep")
            .with_inner_size([1200.0, 820.0])
            .with_min_inner_size([720.0, 480.0]),
        ..Default::default()
    };
    eframe::run_native(
        "stablerep",
        options,
        Box::new(move |_cc| Ok(Box::new(App::new(launch)))),
    )
    .map_err(|e| crate::Error::Config(format!("cannot open the app window: {e}")))
}
