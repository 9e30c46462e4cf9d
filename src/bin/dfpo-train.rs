//! `dfpo-train`: the DFPO trainer's command line.
//!
//! Until the full trainer (rollouts, policy, PPO; issue 4) lands, the default command is the
//! critic demo (`dfpo::demo`): it trains a DFPO flow critic head on a synthetic noisy-reward
//! return distribution through the graph runtime and reports how well its readout matches the
//! true distribution's risk statistics.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dfpo-train",
    version,
    about = "DFPO post-training (distributional value-flow PPO)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a flow critic head on a synthetic noisy-reward task and check its readout (default).
    CriticDemo(dfpo::demo::CriticDemoArgs),
    /// Per-token log-probs of each {"prompt","response"} JSONL line's response under a model.
    Score(dfpo::model::score::ScoreArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CriticDemo(a)) => critic_demo(&a),
        Some(Command::Score(a)) => dfpo::model::score::run(&a),
        None => critic_demo(&dfpo::demo::CriticDemoArgs::parse_defaults()),
    };
    if let Err(e) = result {
        eprintln!("dfpo-train: error: {e}");
        std::process::exit(1);
    }
}

fn critic_demo(a: &dfpo::demo::CriticDemoArgs) -> dfpo::Result<()> {
    let device = dfpo::model::score::parse_device(&a.device)?;
    dfpo::demo::run(a, device).map(|_| ())
}
