//! The GPU worker behind the app: jobs run on their own thread and report progress, images,
//! training metrics and their end through events; a cancelled job stops at its next sampler or
//! training step (training checkpoints first, so it resumes) and the worker takes the next
//! job; errors arrive as events.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

use stablerep::diffusion::model::GenerateOptions;
use stablerep::diffusion::sampler::Kind;
use stablerep::gpu::GpuOptions;
use stablerep::worker::{Event, Job, Worker};

/// Events of job `id` until its end (Finished, Cancelled or Failed), within two minutes.
fn until_end(w: &Worker, id: u64) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(e) = w.recv_timeout(Duration::from_millis(200)) {
            assert_eq!(e.job(), id, "an event of another job: {e:?}");
            let end = matches!(
                e,
                Event::Finished { .. } | Event::Cancelled { .. } | Event::Failed { .. }
            );
            out.push(e);
            if end {
                return out;
            }
        }
    }
    panic!("job {id} did not end: {out:?}");
}

fn options(steps: usize, images: usize) -> GenerateOptions {
    GenerateOptions {
        prompt: "a red cube on a table".into(),
        negative: String::new(),
        images,
        guidance: 7.5,
        steps,
        sampler: Kind::Ddim { eta: 0.0 },
        seed: 3,
        caption: 0,
        size: 64,
        save_size: None,
        half_weights: None,
        half_activations: None,
        init_noise: None,
    }
}

#[test]
fn worker_runs_generation_sweeps_and_training_cancels_and_reports_errors() {
    let dir = std::env::temp_dir().join(format!("stablerep-worker-{}", std::process::id()));
    let model = dir.join("model");
    common::tiny_sd_folder(&model);
    let mut w = Worker::spawn(GpuOptions::default());
    // Two images: progress for every step, then the images, then Finished.
    let id = w.submit(Job::Generate {
        model: model.clone(),
        config: None,
        options: options(3, 2),
    });
    let ev = until_end(&w, id);
    assert!(matches!(ev[0], Event::Started { .. }), "{ev:?}");
    let progress: Vec<(u64, u64)> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Progress { done, total, .. } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    // A small model denoises both images together: 3 evaluations of 2 images each.
    assert_eq!(progress, [(2, 6), (4, 6), (6, 6)], "{ev:?}");
    let images: Vec<&Event> = ev
        .iter()
        .filter(|e| matches!(e, Event::Image { .. }))
        .collect();
    assert_eq!(images.len(), 2);
    if let Event::Image { size, rgb, .. } = images[0] {
        assert_eq!(rgb.len(), 3 * size * size);
    }
    // The images arrive after the batch's last step, before Finished.
    let first_image = ev
        .iter()
        .position(|e| matches!(e, Event::Image { .. }))
        .unwrap();
    let last_step = ev
        .iter()
        .position(|e| matches!(e, Event::Progress { done: 6, .. }))
        .unwrap();
    assert!(last_step < first_image, "{ev:?}");
    assert!(matches!(ev.last(), Some(Event::Finished { .. })));
    // A guidance sweep: the same seed at two scales, labelled.
    let id = w.submit(Job::GuidanceSweep {
        model: model.clone(),
        config: None,
        options: options(2, 1),
        scales: vec![1.0, 4.0],
    });
    let ev = until_end(&w, id);
    let labels: Vec<String> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Image { label, .. } => Some(label.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(labels, ["w = 1, image 1", "w = 4, image 1"], "{ev:?}");
    // Cancel a long job once it reports progress: it ends Cancelled before its last step.
    let id = w.submit(Job::Generate {
        model: model.clone(),
        config: None,
        options: options(200, 1),
    });
    let mut seen = Vec::new();
    loop {
        let e = w.recv_timeout(Duration::from_secs(60)).expect("an event");
        if matches!(e, Event::Progress { .. }) {
            w.cancel(id);
            seen.push(e);
            break;
        }
        seen.push(e);
    }
    seen.extend(until_end(&w, id));
    assert!(
        matches!(seen.last(), Some(Event::Cancelled { .. })),
        "{seen:?}"
    );
    let last_done = seen
        .iter()
        .filter_map(|e| match e {
            Event::Progress { done, .. } => Some(*done),
            _ => None,
        })
        .max()
        .unwrap();
    assert!(last_done < 200, "ran to the end: {last_done}");
    // A bad model path fails with the path in the message; the worker goes on.
    let id = w.submit(Job::Generate {
        model: PathBuf::from("/nonexistent/model"),
        config: None,
        options: options(1, 1),
    });
    let ev = until_end(&w, id);
    match ev.last() {
        Some(Event::Failed { error, .. }) => {
            assert!(error.contains("/nonexistent/model"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    let id = w.submit(Job::Generate {
        model: model.clone(),
        config: None,
        options: options(1, 1),
    });
    assert!(matches!(
        until_end(&w, id).last(),
        Some(Event::Finished { .. })
    ));
    // A pool from captions, in the official layout that training reads.
    let id = w.submit(Job::Pool {
        model: model.clone(),
        config: None,
        options: options(1, 2),
        captions: vec!["a red cube".into(), "a blue sphere".into()],
        shard: (0, 1),
        resume: false,
        out: dir.join("gen-pool"),
    });
    assert!(matches!(
        until_end(&w, id).last(),
        Some(Event::Finished { .. })
    ));
    let p = stablerep::data::pool::Pool::open(&dir.join("gen-pool")).unwrap();
    assert_eq!((p.captions.len(), p.images_per_caption()), (2, 2));
    // Training: metrics for the live plots; pause (cancel: the steps done are checkpointed)
    // and resume from there.
    let pool = dir.join("pool");
    common::make_pool(&pool);
    let out = dir.join("run");
    let id = w.submit(Job::Train {
        run: Box::new(common::settings(&pool, out.clone(), 400, 400)),
    });
    let mut steps = Vec::new();
    let mut seen = Vec::new();
    loop {
        let e = w.recv_timeout(Duration::from_secs(60)).expect("an event");
        if let Event::Metric {
            step,
            loss,
            images_per_second,
            ..
        } = e
        {
            assert!(loss.is_finite() && images_per_second > 0.0);
            steps.push(step);
            if steps.len() == 3 {
                w.cancel(id);
            }
        }
        let end = matches!(
            e,
            Event::Cancelled { .. } | Event::Finished { .. } | Event::Failed { .. }
        );
        seen.push(e);
        if end {
            break;
        }
    }
    assert!(
        matches!(seen.last(), Some(Event::Cancelled { .. })),
        "{seen:?}"
    );
    let done = *steps.last().unwrap();
    assert!((3..400).contains(&done), "{steps:?}");
    let saved =
        stablerep::nn::checkpoint::Checkpoint::load(&out.join("checkpoint-last.safetensors"))
            .unwrap();
    assert_eq!(
        saved.metadata.get("step").map(String::as_str),
        Some(done.to_string().as_str())
    );
    let id = w.submit(Job::Train {
        run: Box::new(common::settings(&pool, out, done + 2, 400)),
    });
    let ev = until_end(&w, id);
    let resumed: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Metric { step, .. } => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(resumed, [done + 1, done + 2], "{ev:?}");
    // Evaluation of that checkpoint on a labelled folder: kNN accuracy arrives as an event; a
    // method that needs a train folder without one fails with the reason.
    let labelled = dir.join("labelled");
    common::make_labelled(&labelled);
    let request = |train: Option<PathBuf>| stablerep::eval::probe::Request {
        checkpoint: dir.join("run/checkpoint-last.safetensors"),
        head_dim: 16,
        train,
        test: labelled.clone(),
        method: stablerep::eval::probe::Method::Knn {
            k: 3,
            temperature: 0.07,
        },
        features: None,
    };
    let id = w.submit(Job::Evaluate {
        request: Box::new(request(Some(labelled.clone()))),
    });
    let ev = until_end(&w, id);
    let acc = ev.iter().find_map(|e| match e {
        Event::Accuracy { accuracy, .. } => Some(*accuracy),
        _ => None,
    });
    assert!(acc.is_some_and(|a| (0.0..=1.0).contains(&a)), "{ev:?}");
    let id = w.submit(Job::Evaluate {
        request: Box::new(request(None)),
    });
    match until_end(&w, id).last() {
        Some(Event::Failed { error, .. }) => assert!(error.contains("--train"), "{error}"),
        other => panic!("{other:?}"),
    }
    // Retrieval in the labelled folder (image 0 is class0/0.png; matches best first, never the
    // query itself), and the similarity matrix of a pool batch (2 captions x 3 images,
    // caption-major labels, unit diagonal, symmetric).
    let ck = dir.join("run/checkpoint-last.safetensors");
    let id = w.submit(Job::Neighbours {
        checkpoint: ck.clone(),
        head_dim: 16,
        folder: labelled.clone(),
        query: 0,
        k: 3,
    });
    let ev = until_end(&w, id);
    let found = ev.iter().find_map(|e| match e {
        Event::Neighbours { query, matches, .. } => Some((query.clone(), matches.clone())),
        _ => None,
    });
    let (query, matches) = found.unwrap_or_else(|| panic!("{ev:?}"));
    assert!(query.ends_with("class0/0.png"), "{query:?}");
    assert_eq!(matches.len(), 3);
    assert!(matches.windows(2).all(|p| p[0].1 >= p[1].1));
    assert!(matches.iter().all(|(p, _)| p != &query));
    let id = w.submit(Job::Similarity {
        checkpoint: ck,
        head_dim: 16,
        pool: pool.clone(),
        captions: 2,
        images: 3,
    });
    let ev = until_end(&w, id);
    let (labels, m) = ev
        .iter()
        .find_map(|e| match e {
            Event::Similarity { labels, matrix, .. } => Some((labels.clone(), matrix.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!((labels.len(), m.len()), (6, 36));
    assert_eq!(labels[3], "pattern 1 #0");
    for i in 0..6 {
        assert!((m[i * 6 + i] - 1.0).abs() < 1e-4);
        for j in 0..6 {
            assert!((m[i * 6 + j] - m[j * 6 + i]).abs() < 1e-5);
        }
    }
    drop(w);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_panicking_job_fails_with_its_message_and_the_worker_takes_the_next_job() {
    let mut w = Worker::spawn(GpuOptions::default());
    let id = w.submit(Job::PanicForTest {
        message: "boom in a kernel launch".into(),
    });
    let events = until_end(&w, id);
    match events.last() {
        Some(Event::Failed { error, .. }) => {
            assert!(error.contains("boom in a kernel launch"), "{error}");
            assert!(error.contains("internal error"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.is_alive());
    assert!(!w.respawn_if_dead());
    // The next job runs normally.
    let id = w.submit(Job::Device);
    let events = until_end(&w, id);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{events:?}"
    );
}
