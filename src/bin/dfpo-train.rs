//! `dfpo-train`: the DFPO trainer's command line.
//!
//! With no arguments it runs `train` on the built-in configuration: the arithmetic task, the
//! shipped SFT warm start, DFPO with reward-flip noise 0.2, evaluation before and after on the
//! in-domain and out-of-domain splits (CPU when there is no GPU).

use clap::{Parser, Subcommand};
use dfpo::train::config::{ConfigArgs, TrainConfig};

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

#[derive(Subcommand)]
enum Command {
    /// RL training (the default): rollouts, noisy rewards, critic, advantages, PPO updates.
    #[command(after_help = train_help())]
    Train(ConfigArgs),
    /// Supervised warm start on prompt/answer JSONL (or the built-in arithmetic task).
    Sft(dfpo::train::sft::SftArgs),
    /// Clean accuracy of `model.policy` on the eval splits (greedy, or pass@k with eval.greedy=false).
    #[command(after_help = train_help())]
    Eval(ConfigArgs),
    /// Per-token log-probs of each {"prompt","response"} JSONL line's response under a model.
    Score(dfpo::model::score::ScoreArgs),
    /// Prints every configuration key with its default and meaning.
    Config,
    /// Trains only a flow critic head on a synthetic noisy-reward task (a quick kernel check).
    CriticDemo(dfpo::demo::CriticDemoArgs),
}

fn train_help() -> String {
    format!(
        "Configuration: --config FILE.toml and --set section.key=value (applied in order).\nKeys and defaults:\n{}",
        TrainConfig::options_help()
    )
}

fn main() {
    let cli = Cli::parse();
    dfpo::train::interrupt::install();
    let result = match cli.command {
        None => train(&ConfigArgs::default()),
        Some(Command::Train(a)) => train(&a),
        Some(Command::Sft(a)) => dfpo::train::sft::run(&a),
        Some(Command::Eval(a)) => eval(&a),
        Some(Command::Score(a)) => dfpo::model::score::run(&a),
        Some(Command::Config) => {
            println!("{}", TrainConfig::options_help());
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

fn train(a: &ConfigArgs) -> dfpo::Result<()> {
    let cfg = a.resolve()?;
    dfpo::train::trainer::run(cfg).map(|_| ())
}

fn eval(a: &ConfigArgs) -> dfpo::Result<()> {
    let mut cfg = a.resolve()?;
    // Evaluation needs the policy only: no critic, no reference model.
    cfg.algo.name = dfpo::train::config::Algo::Grpo;
    cfg.kl.coef = 0.0;
    let t = dfpo::train::trainer::Trainer::new(cfg)?;
    for e in t.evaluate()? {
        println!(
            "{}: accuracy {:.4} unparsed {:.4} n {}",
            e.name, e.accuracy, e.unparsed, e.n
        );
    }
    Ok(())
}

fn critic_demo(a: &dfpo::demo::CriticDemoArgs) -> dfpo::Result<()> {
    let device = dfpo::model::score::parse_device(&a.device)?;
    dfpo::demo::run(a, device).map(|_| ())
}
