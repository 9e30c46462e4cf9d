//! `dfpo-train`: the DFPO trainer's command line.
//!
//! With no arguments it runs `train` on the built-in configuration: the arithmetic task, the
//! shipped SFT warm start, DFPO with reward-flip noise 0.2, evaluation before and after on the
//! in-domain and out-of-domain splits (CPU when there is no GPU).
//!
//! Every subcommand reads one configuration (`--config FILE.toml`, the shortcut flags, then
//! `--set section.key=value`); results go to stdout (`--json` for machine-readable ones), logs
//! and progress to stderr.

use clap::{Parser, Subcommand};
use dfpo::train::config::{Command as Cmd, ConfigArgs, TrainConfig};

#[derive(Parser)]
#[command(
    name = "dfpo-train",
    version,
    about = "DFPO post-training (distributional value-flow PPO) and its baselines (ppo, grpo, quantile)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// The flags every subcommand takes.
#[derive(clap::Args, Default)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Also print the resolved configuration (stderr).
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// RL training (the default): rollouts, noisy rewards, critic, advantages, PPO updates.
    #[command(after_help = help())]
    Train(Args),
    /// Supervised fine-tuning on prompt/answer JSONL or the built-in task (the [sft] section).
    #[command(after_help = help())]
    Sft(Args),
    /// Clean accuracy of model.policy on the eval splits (greedy, or pass@k with
    /// eval.greedy=false); --data FILE evaluates on one JSONL file.
    #[command(after_help = help())]
    Eval(Args),
    /// Per-token log-probs of each {"prompt","response"} JSONL line under a model (the [score]
    /// section).
    #[command(after_help = help())]
    Score(Args),
    /// Writes a checkpoint's policy and critic as HF folders (the [export] section).
    #[command(after_help = help())]
    Export {
        #[command(flatten)]
        args: Args,
        /// A checkpoint (RUN/checkpoints/step-N) or a run folder (its newest checkpoint).
        #[arg(long)]
        checkpoint: Option<String>,
    },
    /// Prints every configuration key with its default and meaning, as a valid TOML file.
    Config,
    /// Trains only a flow critic head on a synthetic noisy-reward task (a quick kernel check).
    CriticDemo(dfpo::demo::CriticDemoArgs),
}

fn help() -> String {
    "Configuration: --config FILE.toml, then --model/--data/--out/--overwrite (shortcuts for \
     the command's keys), then each --set section.key=value. `dfpo-train config` lists every key."
        .into()
}

fn main() {
    let cli = Cli::parse();
    dfpo::train::interrupt::install();
    let result = match cli.command {
        None => train(&Args::default()),
        Some(Command::Train(a)) => train(&a),
        Some(Command::Sft(a)) => sft(&a),
        Some(Command::Eval(a)) => eval(&a),
        Some(Command::Score(a)) => score(&a),
        Some(Command::Export { args, checkpoint }) => export(&args, checkpoint),
        Some(Command::Config) => {
            print!("{}", TrainConfig::options_help());
            Ok(())
        }
        Some(Command::CriticDemo(a)) => critic_demo(&a),
    };
    match result {
        Ok(()) => {}
        Err(dfpo::Error::Interrupted { signal, msg }) => {
            eprintln!("dfpo-train: {msg}");
            std::process::exit(128 + signal);
        }
        Err(e) => {
            eprintln!("dfpo-train: error: {e}");
            std::process::exit(1);
        }
    }
}

fn resolve(a: &Args, cmd: Cmd) -> dfpo::Result<TrainConfig> {
    let cfg = a.config.resolve_for(cmd)?;
    if a.verbose {
        eprintln!("dfpo-train: resolved configuration:\n{}", cfg.to_toml());
    }
    Ok(cfg)
}

fn json_line<T: serde::Serialize>(v: &T) -> dfpo::Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| dfpo::Error::Invalid(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn train(a: &Args) -> dfpo::Result<()> {
    let cfg = resolve(a, Cmd::Train)?;
    let s = dfpo::train::trainer::run(cfg)?;
    if a.json {
        json_line(&s)
    } else {
        print!("{}", dfpo::train::trainer::summary_table(&s));
        Ok(())
    }
}

fn sft(a: &Args) -> dfpo::Result<()> {
    let cfg = resolve(a, Cmd::Sft)?;
    dfpo::train::sft::run(&cfg.sft, a.json)
}

fn score(a: &Args) -> dfpo::Result<()> {
    let cfg = resolve(a, Cmd::Score)?;
    let n = dfpo::model::score::run(&cfg.score)?;
    let out = cfg.score.out.display().to_string();
    if a.json {
        json_line(&serde_json::json!({"records": n, "out": out}))
    } else {
        println!("score: {n} records -> {out}");
        Ok(())
    }
}

fn export(a: &Args, checkpoint: Option<String>) -> dfpo::Result<()> {
    let mut args = a.config.clone();
    if let Some(c) = checkpoint {
        args.sets.insert(0, format!("export.checkpoint={c}"));
    }
    let cfg = resolve(
        &Args {
            config: args,
            json: a.json,
            verbose: a.verbose,
        },
        Cmd::Export,
    )?;
    let done = dfpo::train::export::run(&cfg.export)?;
    if a.json {
        json_line(&done)
    } else {
        println!("{}", done.describe());
        Ok(())
    }
}

fn eval(a: &Args) -> dfpo::Result<()> {
    let cfg = resolve(a, Cmd::Eval)?;
    let r = dfpo::train::eval::run_command(cfg)?;
    if a.json {
        json_line(&r)
    } else {
        print!("{}", r.table());
        Ok(())
    }
}

fn critic_demo(a: &dfpo::demo::CriticDemoArgs) -> dfpo::Result<()> {
    let device = dfpo::model::score::parse_device("--device", &a.device)?;
    dfpo::demo::run(a, device).map(|_| ())
}
