//! The GPU worker behind interactive front ends (the desktop app): one thread owns the device
//! and runs jobs sent to it as messages, reporting [`Event`]s back, so a UI thread never waits
//! on the GPU. Any job can be cancelled; it stops at its next progress point (a sampler step,
//! a training step, which is checkpointed first) and the worker stays ready for the next job. The device opens with the first job (errors
//! arrive as [`Event::Failed`]), and a loaded model is kept while jobs use the same path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::data::folder::LabelledFolder;
use crate::diffusion::model::{generate_pool, GenerateOptions, Generator, SdModel};
use crate::error::{Error, Result};
use crate::eval::{probe, retrieval};
use crate::gpu::{DeviceReport, Gpu, GpuOptions};
use crate::nn::checkpoint::Checkpoint;
use crate::train::pool_run::{self, PoolRun};

/// Work for the worker.
#[derive(Clone, Debug)]
pub enum Job {
    /// Images of `options.prompt` with a Stable Diffusion model (folder or single file; `config`
    /// as `SdModel::load_with_config`).
    Generate {
        /// Model folder or file.
        model: PathBuf,
        /// Configs for a single file.
        config: Option<PathBuf>,
        /// What to generate.
        options: GenerateOptions,
    },
    /// The same prompt and seed at several guidance scales, for side-by-side comparison (the
    /// paper's key knob): `options.images` images per scale, labelled with the scale.
    GuidanceSweep {
        /// Model folder or file.
        model: PathBuf,
        /// Configs for a single file.
        config: Option<PathBuf>,
        /// What to generate (its guidance is replaced by each scale).
        options: GenerateOptions,
        /// Guidance scales.
        scales: Vec<f64>,
    },
    /// A synthetic pool from captions in the official layout (as `generate --captions`), one
    /// shard; with `resume`, captions whose images exist are skipped.
    Pool {
        /// Model folder or file.
        model: PathBuf,
        /// Configs for a single file.
        config: Option<PathBuf>,
        /// Sampling settings (`images` per caption; the prompt is ignored).
        options: GenerateOptions,
        /// The captions.
        captions: Vec<String>,
        /// Shard (i, n).
        shard: (usize, usize),
        /// Skip finished captions.
        resume: bool,
        /// Pool folder.
        out: PathBuf,
    },
    /// Accuracy of a checkpoint on labelled folders (kNN, linear probe or few-shot).
    Evaluate {
        /// The evaluation.
        request: Box<probe::Request>,
    },
    /// The `k` images of a labelled folder nearest to image `query` (its index in the folder's
    /// sorted listing) in a checkpoint's feature space.
    Neighbours {
        /// Encoder checkpoint.
        checkpoint: PathBuf,
        /// Its head width (to read its config).
        head_dim: usize,
        /// Labelled image folder.
        folder: PathBuf,
        /// Query image index.
        query: usize,
        /// Matches wanted.
        k: usize,
    },
    /// The cosine similarity matrix of `captions` x `images` images of a pool (caption-major),
    /// for a heat map of the caption blocks.
    Similarity {
        /// Encoder checkpoint.
        checkpoint: PathBuf,
        /// Its head width.
        head_dim: usize,
        /// Pool folder.
        pool: PathBuf,
        /// Captions in the batch.
        captions: usize,
        /// Images per caption.
        images: usize,
    },
    /// A report on the device (adapter, limits, features, memory in use); opens it if needed.
    Device,
    /// Panics inside the worker with `message` (tests of the panic guard; not for users).
    #[doc(hidden)]
    PanicForTest {
        /// The panic message.
        message: String,
    },
    /// Training from a pool (StableRep, its SimCLR control or StableRep+, as `run` says); a
    /// cancelled run checkpoints the steps done, so the same job with `resume` continues it
    /// (pause and resume).
    Train {
        /// The run.
        run: Box<PoolRun>,
    },
}

/// What the worker reports. Every job ends with exactly one of `Finished`, `Cancelled` or
/// `Failed`.
#[derive(Clone, Debug)]
pub enum Event {
    /// Job `job` started.
    Started {
        /// Job id.
        job: u64,
    },
    /// Progress: `done` of `total` units (sampler evaluations), with a short description.
    Progress {
        /// Job id.
        job: u64,
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
        /// What is being done ("image 1/4, step 12/51").
        text: String,
    },
    /// A finished image, 8-bit RGB, row-major, `size` x `size`.
    Image {
        /// Job id.
        job: u64,
        /// Index within the job.
        index: usize,
        /// A caption for display ("seed 3, image 2", "w = 7.5").
        label: String,
        /// Side in pixels.
        size: usize,
        /// Pixels, 3 bytes each.
        rgb: Vec<u8>,
    },
    /// A training step's logged loss, learning rate and throughput (for live plots).
    Metric {
        /// Job id.
        job: u64,
        /// Step (1-based).
        step: u64,
        /// Loss.
        loss: f32,
        /// Learning rate.
        lr: f64,
        /// Images per second since the job started.
        images_per_second: f64,
    },
    /// An evaluation's result.
    Accuracy {
        /// Job id.
        job: u64,
        /// Top-1 accuracy in [0, 1].
        accuracy: f64,
        /// The linear probe's accuracy per base learning rate.
        per_lr: Vec<(f64, f64)>,
    },
    /// Retrieval results: the query image and its matches with their cosine similarity.
    Neighbours {
        /// Job id.
        job: u64,
        /// The query image.
        query: PathBuf,
        /// Matches, best first.
        matches: Vec<(PathBuf, f32)>,
    },
    /// A similarity matrix [labels.len(), labels.len()], row-major.
    Similarity {
        /// Job id.
        job: u64,
        /// One label per row ("caption #image").
        labels: Vec<String>,
        /// Cosine similarities.
        matrix: Vec<f32>,
    },
    /// The device's report.
    Device {
        /// Job id.
        job: u64,
        /// The report.
        report: Box<DeviceReport>,
    },
    /// The job completed.
    Finished {
        /// Job id.
        job: u64,
        /// Wall time.
        seconds: f64,
    },
    /// The job was cancelled.
    Cancelled {
        /// Job id.
        job: u64,
    },
    /// The job failed; `error` says why.
    Failed {
        /// Job id.
        job: u64,
        /// The error, for display.
        error: String,
    },
}

impl Event {
    /// True for the events that end a job (`Finished`, `Cancelled`, `Failed`).
    pub fn is_end(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Cancelled { .. } | Event::Failed { .. }
        )
    }

    /// The job an event belongs to.
    pub fn job(&self) -> u64 {
        match self {
            Event::Started { job }
            | Event::Progress { job, .. }
            | Event::Image { job, .. }
            | Event::Metric { job, .. }
            | Event::Accuracy { job, .. }
            | Event::Neighbours { job, .. }
            | Event::Similarity { job, .. }
            | Event::Device { job, .. }
            | Event::Finished { job, .. }
            | Event::Cancelled { job }
            | Event::Failed { job, .. } => *job,
        }
    }
}

/// A handle to the worker thread; dropping it stops the thread after the current job.
pub struct Worker {
    jobs: Option<Sender<(u64, Job)>>,
    events: Receiver<Event>,
    cancelled: Arc<Mutex<HashSet<u64>>>,
    next: u64,
    thread: Option<JoinHandle<()>>,
    opts: GpuOptions,
}

impl Worker {
    /// Starts the worker thread; the device (chosen by `opts`) opens with the first job.
    pub fn spawn(opts: GpuOptions) -> Worker {
        let (jobs, job_rx) = channel::<(u64, Job)>();
        let (event_tx, events) = channel();
        let cancelled = Arc::new(Mutex::new(HashSet::new()));
        let flags = cancelled.clone();
        let keep = opts.clone();
        let thread = std::thread::Builder::new()
            .name("stablerep-gpu".into())
            .spawn(move || run(opts, job_rx, event_tx, flags))
            .expect("spawning the GPU worker thread");
        Worker {
            jobs: Some(jobs),
            events,
            cancelled,
            next: 1,
            thread: Some(thread),
            opts: keep,
        }
    }

    /// Whether the worker thread is running. A job's panic is caught and reported as
    /// `Failed` (the thread lives on), so this is false only after something worse.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Starts a fresh worker thread if the old one is gone (queued jobs are lost: the caller
    /// reports them failed); returns whether it did. Job ids keep counting.
    pub fn respawn_if_dead(&mut self) -> bool {
        if self.is_alive() {
            return false;
        }
        let next = self.next;
        let fresh = Worker::spawn(self.opts.clone());
        let mut old = std::mem::replace(self, fresh);
        old.thread.take();
        self.next = next;
        true
    }

    /// Queues a job; returns its id.
    pub fn submit(&mut self, job: Job) -> u64 {
        let id = self.next;
        self.next += 1;
        if let Some(tx) = &self.jobs {
            // A send fails only when the thread is gone; recv then reports nothing more.
            let _ = tx.send((id, job));
        }
        id
    }

    /// Cancels job `id` (running or queued).
    pub fn cancel(&self, id: u64) {
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The worker's state: the device and the last model.
struct State {
    opts: GpuOptions,
    gpu: Option<Arc<Gpu>>,
    model: Option<(PathBuf, Option<PathBuf>, SdModel)>,
}

impl State {
    fn gpu(&mut self) -> Result<Arc<Gpu>> {
        if self.gpu.is_none() {
            self.gpu = Some(Gpu::new(&self.opts)?);
        }
        Ok(self.gpu.clone().expect("opened above"))
    }

    /// CLS features of image files under a checkpoint.
    fn features(
        &mut self,
        checkpoint: &Path,
        head_dim: usize,
        paths: &[PathBuf],
    ) -> Result<(Vec<f32>, usize)> {
        let gpu = self.gpu()?;
        let ck = Checkpoint::load(checkpoint)?;
        retrieval::image_features(&gpu, &ck, head_dim, paths)
    }

    fn model(&mut self, path: &PathBuf, config: &Option<PathBuf>) -> Result<&SdModel> {
        let same = matches!(&self.model, Some((p, c, _)) if p == path && c == config);
        if !same {
            self.model = None;
            let m = SdModel::load_with_config(path, config.as_deref())?;
            self.model = Some((path.clone(), config.clone(), m));
        }
        Ok(&self.model.as_ref().expect("loaded above").2)
    }
}

fn run(
    opts: GpuOptions,
    jobs: Receiver<(u64, Job)>,
    events: Sender<Event>,
    cancelled: Arc<Mutex<HashSet<u64>>>,
) {
    let mut state = State {
        opts,
        gpu: None,
        model: None,
    };
    for (id, job) in jobs {
        let is_cancelled = || {
            cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
        };
        let send = |e: Event| {
            let _ = events.send(e);
        };
        let t0 = Instant::now();
        let outcome = if is_cancelled() {
            Err(Error::Cancelled)
        } else {
            send(Event::Started { job: id });
            // A panic (a bug) fails the job, not the worker: the device and model are dropped
            // (they may be mid-update) and the next job opens them afresh.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_job(&mut state, id, &job, &send, &is_cancelled)
            }));
            r.unwrap_or_else(|p| {
                state.gpu = None;
                state.model = None;
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(Error::Config(format!(
                    "internal error (a bug; please report it): {msg}; the worker was restarted"
                )))
            })
        };
        send(match outcome {
            Ok(()) => Event::Finished {
                job: id,
                seconds: t0.elapsed().as_secs_f64(),
            },
            Err(Error::Cancelled) => Event::Cancelled { job: id },
            Err(e) => Event::Failed {
                job: id,
                error: e.to_string(),
            },
        });
        cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Runs one job, reporting progress and images through `send`.
fn run_job(
    state: &mut State,
    id: u64,
    job: &Job,
    send: &dyn Fn(Event),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let (model, config, options, scales) = match job {
        Job::Train { run } => return train(state, id, run, send, is_cancelled),
        Job::PanicForTest { message } => panic!("{message}"),
        Job::Device => {
            let gpu = state.gpu()?;
            send(Event::Device {
                job: id,
                report: Box::new(gpu.report()),
            });
            return Ok(());
        }
        Job::Neighbours {
            checkpoint,
            head_dim,
            folder,
            query,
            k,
        } => {
            let f = LabelledFolder::open(folder)?;
            let paths: Vec<PathBuf> = f.items.iter().map(|(p, _)| p.clone()).collect();
            let (feats, dim) = state.features(checkpoint, *head_dim, &paths)?;
            let found = retrieval::nearest(&feats, dim, *query, *k)?;
            send(Event::Neighbours {
                job: id,
                query: paths[*query].clone(),
                matches: found
                    .into_iter()
                    .map(|(i, s)| (paths[i].clone(), s))
                    .collect(),
            });
            return Ok(());
        }
        Job::Similarity {
            checkpoint,
            head_dim,
            pool,
            captions,
            images,
        } => {
            let (paths, labels) = retrieval::pool_batch(pool, *captions, *images)?;
            let (feats, dim) = state.features(checkpoint, *head_dim, &paths)?;
            send(Event::Similarity {
                job: id,
                labels,
                matrix: retrieval::cosine_matrix(&feats, dim),
            });
            return Ok(());
        }
        Job::Evaluate { request } => {
            let gpu = state.gpu()?;
            let out = probe::run(&gpu, request)?;
            send(Event::Accuracy {
                job: id,
                accuracy: out.accuracy,
                per_lr: out.per_lr,
            });
            return Ok(());
        }
        Job::Pool {
            model,
            config,
            options,
            captions,
            shard,
            resume,
            out,
        } => {
            let gpu = state.gpu()?;
            let m = state.model(model, config)?;
            generate_pool(&gpu, m, options, captions, *shard, *resume, out, |p| {
                if is_cancelled() {
                    return Err(Error::Cancelled);
                }
                send(Event::Progress {
                    job: id,
                    done: p.done(),
                    total: p.total(),
                    text: p.to_string(),
                });
                Ok(())
            })?;
            return Ok(());
        }
        Job::Generate {
            model,
            config,
            options,
        } => (model, config, options, vec![(options.guidance, None)]),
        Job::GuidanceSweep {
            model,
            config,
            options,
            scales,
        } => (
            model,
            config,
            options,
            scales.iter().map(|&w| (w, Some(w))).collect(),
        ),
    };
    let gpu = state.gpu()?;
    let m = state.model(model, config)?;
    let mut index = 0;
    for (k, &(w, label)) in scales.iter().enumerate() {
        let o = GenerateOptions {
            guidance: w,
            ..options.clone()
        };
        let generator = Generator::new(&gpu, m, &o)?;
        generator.run_each(
            &o.prompt,
            o.caption,
            |p| {
                if is_cancelled() {
                    return Err(Error::Cancelled);
                }
                let per = p.total();
                send(Event::Progress {
                    job: id,
                    done: k as u64 * per + p.done(),
                    total: scales.len() as u64 * per,
                    text: format!(
                        "{}{p}",
                        label.map_or(String::new(), |w| format!("w = {w}: "))
                    ),
                });
                Ok(())
            },
            |j, img, _| {
                send(Event::Image {
                    job: id,
                    index,
                    label: match label {
                        Some(w) => format!("w = {w}, image {}", j + 1),
                        None => format!("seed {}, image {}", o.seed, j + 1),
                    },
                    size: o.size,
                    rgb: to_rgb8(&img, o.size),
                });
                index += 1;
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// A training job: metrics and progress at every logged step.
fn train(
    state: &mut State,
    id: u64,
    run: &PoolRun,
    send: &dyn Fn(Event),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let gpu = state.gpu()?;
    let t0 = Instant::now();
    let per_step = (run.captions * run.images_per_caption) as f64;
    let mut first: Option<u64> = None;
    pool_run::run(
        &gpu,
        run,
        |step, loss, lr| {
            let from = *first.get_or_insert(step.saturating_sub(1));
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            send(Event::Metric {
                job: id,
                step,
                loss,
                lr,
                images_per_second: (step - from) as f64 * per_step / secs,
            });
            send(Event::Progress {
                job: id,
                done: step,
                total: run.steps,
                text: format!("step {step}/{}, loss {loss:.4}", run.steps),
            });
        },
        is_cancelled,
    )?;
    Ok(())
}

/// [3, size, size] in [0, 1] -> interleaved 8-bit RGB.
pub fn to_rgb8(planar: &[f32], size: usize) -> Vec<u8> {
    let plane = size * size;
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| (c, i)))
        .map(|(c, i)| (planar[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}
