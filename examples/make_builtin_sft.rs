//! Regenerates the shipped warm start `assets/arith-sft` (see tools/make-builtin-sft):
//! SFT of a random init of the built-in model on the arithmetic task, then the measurements
//! recorded in its README (greedy accuracy per split, sampling at temperature 1).
//!
//!     cargo run --release --example make_builtin_sft [-- --out DIR --steps N ...]

use clap::Parser;
use dfpo::model::decoder::Decoder;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{arith, Checker};
use dfpo::train::config::{Command, ConfigArgs};
use dfpo::train::eval::{evaluate, EvalOpts};
use dfpo::train::sft::{self, SftArgs};

#[derive(Parser)]
struct Cli {
    /// --set sft.key=value, --out DIR ... as for `dfpo-train sft`, applied after the recipe.
    #[command(flatten)]
    config: ConfigArgs,
    /// Skip the temperature-1 sampling measurements.
    #[arg(long)]
    no_sampling_stats: bool,
}

/// The recipe of the shipped warm start: SFT of a random init at a high learning rate into
/// assets/arith-sft (which holds the previous output, and its README, which is kept).
fn recipe(out_given: bool) -> Vec<String> {
    let mut v = vec![
        "sft.model=builtin-init".into(),
        format!("sft.lr={}", sft::RECIPE_LR),
    ];
    if !out_given {
        v.push(format!(
            "sft.out={}",
            dfpo::model::builtin::assets_dir().display()
        ));
        v.push("sft.overwrite=true".into());
    }
    v
}

fn main() {
    let mut cli = Cli::parse();
    let mut sets = recipe(cli.config.out.is_some());
    sets.append(&mut cli.config.sets);
    cli.config.sets = sets;
    let args = match cli.config.resolve_for(Command::Sft) {
        Ok(c) => c.sft,
        Err(e) => {
            eprintln!("make_builtin_sft: error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&args, cli.no_sampling_stats) {
        eprintln!("make_builtin_sft: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &SftArgs, no_sampling_stats: bool) -> dfpo::Result<()> {
    let report = sft::train(args)?;
    println!(
        "sft done in {:.1} s -> {}",
        report.seconds,
        args.out.display()
    );
    if no_sampling_stats {
        return Ok(());
    }
    let dec = Decoder::load(&args.out)?;
    let tok = Tokenizer::from_dir(&args.out)?;
    let n = args.eval_size;
    for (name, ex) in [
        ("in_domain", arith::in_domain(n, args.seed)),
        ("out_of_domain", arith::out_of_domain(n, args.seed)),
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
