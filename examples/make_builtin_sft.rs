//! Regenerates the shipped warm starts `assets/arith-sft` (see tools/make-builtin-sft) and, with
//! `--task chain`, `assets/chain-sft` (tools/make-chain-sft): SFT of a random init of the task's
//! built-in model, then the measurements recorded in its README (greedy accuracy per split,
//! sampling at temperature 1).
//!
//!     cargo run --release --example make_builtin_sft [-- --task chain --out DIR ...]

use clap::Parser;
use dfpo::model::decoder::Decoder;
use dfpo::model::tokenizer::Tokenizer;
use dfpo::task::{arith, chain, Checker};
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
    /// arith (assets/arith-sft) or chain (assets/chain-sft).
    #[arg(long, default_value = "arith")]
    task: String,
}

/// The chain warm start's recipe: SFT steps (few enough that the warm start is right on only
/// part of the prompts, so RL has something to learn) and the answer length.
const CHAIN_STEPS: usize = 700;

/// The recipe of the shipped warm start: SFT of a random init at a high learning rate into
/// assets/arith-sft (which holds the previous output, and its README, which is kept).
fn recipe(out_given: bool, task: &str) -> Vec<String> {
    let mut v = vec![
        "sft.model=builtin-init".into(),
        format!("sft.lr={}", sft::RECIPE_LR),
    ];
    let dir = if task == "chain" {
        v.push("sft.data=chain".into());
        v.push(format!("sft.steps={CHAIN_STEPS}"));
        v.push(format!("sft.ood_frac={}", chain::SFT_OOD_FRACTION));
        v.push(format!(
            "sft.max_new_tokens={}",
            chain::ROLLOUT_MAX_NEW_TOKENS
        ));
        v.push("sft.eval_size=0".into());
        dfpo::model::builtin::chain_assets_dir()
    } else {
        dfpo::model::builtin::assets_dir()
    };
    if !out_given {
        v.push(format!("sft.out={}", dir.display()));
        v.push("sft.overwrite=true".into());
    }
    v
}

fn main() {
    let mut cli = Cli::parse();
    if cli.task != "arith" && cli.task != "chain" {
        eprintln!(
            "make_builtin_sft: error: --task {}: expected arith or chain",
            cli.task
        );
        std::process::exit(1);
    }
    let mut sets = recipe(cli.config.out.is_some(), &cli.task);
    sets.append(&mut cli.config.sets);
    cli.config.sets = sets;
    let args = match cli.config.resolve_for(Command::Sft) {
        Ok(c) => c.sft,
        Err(e) => {
            eprintln!("make_builtin_sft: error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = run(&args, cli.no_sampling_stats, &cli.task) {
        eprintln!("make_builtin_sft: error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &SftArgs, no_sampling_stats: bool, task: &str) -> dfpo::Result<()> {
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
    let (sets, checker) = if task == "chain" {
        (
            vec![
                ("in_domain", chain::in_domain(chain::IN_DOMAIN_POOL)),
                (
                    "out_of_domain",
                    chain::out_of_domain(chain::OUT_OF_DOMAIN_POOL),
                ),
                ("validation", chain::validation(chain::VALIDATION_POOL)),
            ],
            Checker::Chain,
        )
    } else {
        (
            vec![
                ("in_domain", arith::in_domain(n, args.seed)),
                ("out_of_domain", arith::out_of_domain(n, args.seed)),
            ],
            Checker::Arith,
        )
    };
    for (name, ex) in sets {
        for k in [1usize, 4] {
            let opts = EvalOpts {
                greedy: false,
                pass_k: k,
                temperature: 1.0,
                seed: 7,
                max_new_tokens: args.max_new_tokens,
                ..EvalOpts::default()
            };
            let r = evaluate(&dec, &tok, name, &ex, checker, &opts)?;
            println!(
                "T=1 {name}: pass@{k} {:.3} unparsed {:.3} (n = {})",
                r.accuracy, r.unparsed, r.n
            );
        }
    }
    Ok(())
}
