//! Regenerates the shipped warm start `assets/arith-sft` (see tools/make-builtin-sft):
//! SFT of a random init of the built-in model on the arithmetic task, then the measurements
//! recorded in its README (greedy accuracy per split, sampling at temperature 1).
//!
//!     cargo run --release --example make_builtin_sft [-- --out DIR --steps N ...]

use clap::Parser;
use dfpo::model::decoder::Decoder;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{arith, Checker};
use dfpo::train::eval::{evaluate, EvalOpts};
use dfpo::train::sft::{self, SftArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    sft: SftArgs,
    /// Skip the temperature-1 sampling measurements.
    #[arg(long)]
    no_sampling_stats: bool,
}

fn main() {
    let mut cli = Cli::parse();
    if !std::env::args().any(|a| a == "--out") {
        cli.sft.out = dfpo::model::builtin::assets_dir();
        // assets/arith-sft holds the previous output (and its README, which is kept).
        cli.sft.overwrite = true;
    }
    if let Err(e) = run(&cli) {
        eprintln!("make_builtin_sft: error: {e}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> dfpo::Result<()> {
    let report = sft::train(&cli.sft)?;
    println!(
        "sft done in {:.1} s -> {}",
        report.seconds,
        cli.sft.out.display()
    );
    if cli.no_sampling_stats {
        return Ok(());
    }
    let dec = Decoder::load(&cli.sft.out)?;
    let tok = Tokenizer::from_dir(&cli.sft.out)?;
    let n = cli.sft.eval_size;
    for (name, ex) in [
        ("in_domain", arith::in_domain(n, cli.sft.seed)),
        ("out_of_domain", arith::out_of_domain(n, cli.sft.seed)),
    ] {
        for k in [1usize, 4] {
            let opts = EvalOpts {
                greedy: false,
                pass_k: k,
                temperature: 1.0,
                seed: 7,
                ..EvalOpts::default()
            };
            let r = evaluate(&dec, &tok, name, &ex, Checker::Arith, &opts)?;
            println!(
                "T=1 {name}: pass@{k} {:.3} unparsed {:.3} (n = {})",
                r.accuracy, r.unparsed, r.n
            );
        }
    }
    Ok(())
}
