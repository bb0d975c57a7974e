//! The `stablerep` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stablerep::demo::{train_mlp, DemoConfig};
use stablerep::gpu::{adapter, Gpu, GpuOptions};

/// StableRep on WebGPU.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Use the adapter whose name, backend or driver contains this text (also STABLEREP_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List every GPU adapter, then the chosen one with its limits and features.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train a small MLP on three spirals through the graph executor (engine smoke test).
    Demo {
        /// Optimizer steps.
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Hidden width.
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        /// Learning rate.
        #[arg(long, default_value_t = 1e-2)]
        lr: f32,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> stablerep::Result<()> {
    let opts = GpuOptions {
        adapter: cli.adapter.clone(),
        ..Default::default()
    };
    match cli.cmd {
        Cmd::Info { json } => info(&opts, json),
        Cmd::Demo {
            steps,
            hidden,
            lr,
            seed,
        } => {
            let gpu = Gpu::new(&opts)?;
            println!("device: {}", gpu.describe());
            let cfg = DemoConfig {
                steps,
                hidden,
                lr,
                seed,
                ..Default::default()
            };
            let r = train_mlp(&gpu, &cfg, (steps / 10).max(1), |step, loss| {
                println!("step {step:>5}  loss {loss:.4}");
            })?;
            println!(
                "trained: loss {:.4} -> {:.4}, training accuracy {:.1}%, {:.2} ms/step",
                r.first_loss,
                r.final_loss,
                r.accuracy * 100.0,
                r.ms_per_step
            );
            println!(
                "plan: {} nodes, {} dispatches in {} submit per step, intermediates {} KiB planned vs {} KiB unplanned",
                r.plan.nodes,
                r.plan.dispatches,
                r.plan.submits_per_run,
                r.plan.peak_bytes / 1024,
                r.plan.tensor_bytes / 1024
            );
            Ok(())
        }
    }
}

fn info(opts: &GpuOptions, json: bool) -> stablerep::Result<()> {
    let all: Vec<_> = adapter::enumerate()
        .iter()
        .map(|a| adapter::summarize(&a.get_info()))
        .collect();
    let gpu = Gpu::new(opts)?;
    let limits = &gpu.limits;
    let features: Vec<String> = gpu
        .features
        .iter_names()
        .map(|(n, _)| n.to_string())
        .collect();
    if json {
        let v = serde_json::json!({
            "adapters": all,
            "chosen": adapter::summarize(&gpu.info),
            "caps": gpu.caps,
            "features": features,
            "limits": format!("{limits:?}"),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("adapters (best first):");
    for a in &all {
        println!(
            "  [{:>2}] {} | {} | {} | {}",
            a.score, a.name, a.backend, a.device_type, a.driver
        );
    }
    println!("chosen: {}", gpu.describe());
    let c = &gpu.caps;
    println!("  max storage binding     {} MiB", c.max_binding >> 20);
    println!("  max buffer              {} MiB", c.max_buffer >> 20);
    println!("  workgroups / dimension  {}", c.max_workgroups);
    println!(
        "  invocations / workgroup {}",
        limits.max_compute_invocations_per_workgroup
    );
    println!(
        "  workgroup memory        {} KiB",
        limits.max_compute_workgroup_storage_size >> 10
    );
    println!(
        "  storage buffers / stage {}",
        limits.max_storage_buffers_per_shader_stage
    );
    println!("  storage offset align    {} B", c.storage_align);
    println!(
        "  subgroup size           {}",
        c.subgroup_size
            .map_or("varies or none".into(), |s| s.to_string())
    );
    println!(
        "  features: {}",
        if features.is_empty() {
            "none".into()
        } else {
            features.join(", ")
        }
    );
    Ok(())
}
