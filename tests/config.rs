//! Run configuration: defaults, TOML file, --set overrides, validation errors, round trip,
//! option listing.

use std::path::{Path, PathBuf};

use dfpo::train::config::{Algo, ConfigArgs, TrainConfig};

/// A fresh temp file with `text` (one per test name, so parallel tests do not collide).
fn toml_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dfpo-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn sets(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// The error text of loading `file` (optional) with `sets`; fails the test when it loads.
fn load_err(file: Option<&Path>, s: &[&str]) -> String {
    match TrainConfig::load(file, &sets(s)) {
        Ok(c) => panic!("expected an error, loaded {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(msg.contains(f), "error {msg:?} lacks {f:?}");
    }
}

#[test]
fn defaults_validate_and_load_without_inputs() {
    TrainConfig::default().validate().unwrap();
    let c = TrainConfig::load(None, &[]).unwrap();
    assert_eq!(c, TrainConfig::default());
    assert_eq!(
        ConfigArgs::default().resolve().unwrap(),
        TrainConfig::default()
    );
}

#[test]
fn toml_file_overrides_defaults() {
    let p = toml_file(
        "file_overrides",
        r#"
[algo]
name = "grpo"

[run]
steps = 7
device = "cpu"

[optim]
actor_lr = 1     # an integer where a float is expected is that float
critic_lr = 3e-4

[data]
task = "jsonl"
train_file = "train.jsonl"
eval_files = ["test=test.jsonl", "ood=ood.jsonl"]
"#,
    );
    let c = TrainConfig::load(Some(&p), &[]).unwrap();
    assert_eq!(c.algo.name, Algo::Grpo);
    assert_eq!(c.run.steps, 7);
    assert_eq!(c.run.device, "cpu");
    assert_eq!(c.optim.actor_lr, 1.0);
    assert_eq!(c.optim.critic_lr, 3e-4);
    assert_eq!(c.data.eval_files, vec!["test=test.jsonl", "ood=ood.jsonl"]);
    // Untouched keys keep their defaults.
    let d = TrainConfig::default();
    assert_eq!(c.run.seed, d.run.seed);
    assert_eq!(c.critic, d.critic);
}

#[test]
fn set_overrides_each_type_and_apply_in_order_after_the_file() {
    let p = toml_file("set_order", "[run]\nsteps = 7\nseed = 5\n");
    let c = TrainConfig::load(
        Some(&p),
        &sets(&[
            "run.steps=3",                 // int, overrides the file
            "optim.actor_lr=5e-5",         // float
            "reward.flip_prob=0",          // an integer for a float
            "ppo.whiten=false",            // bool
            "run.device=cpu",              // bare word: a string
            "run.out_dir=\"runs/x y\"",    // quoted string
            "model.policy=runs/sft/final", // unquoted path
            "run.steps = 9",               // later --set wins; spaces around '=' are fine
            "data.task=jsonl",
            "data.train_file=t.jsonl",
            "data.eval_files=[\"a=b.jsonl\", \"c=d.jsonl\"]", // array
        ]),
    )
    .unwrap();
    assert_eq!(c.run.steps, 9);
    assert_eq!(c.run.seed, 5, "file value kept");
    assert_eq!(c.optim.actor_lr, 5e-5);
    assert_eq!(c.reward.flip_prob, 0.0);
    assert!(!c.ppo.whiten);
    assert_eq!(c.run.device, "cpu");
    assert_eq!(c.run.out_dir, "runs/x y");
    assert_eq!(c.model.policy, "runs/sft/final");
    assert_eq!(c.data.eval_files, vec!["a=b.jsonl", "c=d.jsonl"]);

    // A string option takes a number-looking value verbatim; a list option one bare item.
    let c = TrainConfig::load(
        None,
        &sets(&[
            "run.out_dir=2024",
            "data.task=jsonl",
            "data.train_file=t",
            "data.eval_files=x=y.jsonl",
        ]),
    )
    .unwrap();
    assert_eq!(c.run.out_dir, "2024");
    assert_eq!(c.data.eval_files, vec!["x=y.jsonl"]);
}

#[test]
fn unknown_keys_and_sections_are_named_with_a_suggestion() {
    let p = toml_file("unknown_key", "[run]\nsteps = 3\n\n[critic]\nkk = 8\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "unknown_key.toml",
            "line 5",
            "critic.kk",
            "unknown key",
            "did you mean `critic.k`",
        ],
    );

    let p = toml_file("unknown_section", "[critc]\nk = 8\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "unknown_section.toml",
            "line 1",
            "critc",
            "unknown section",
            "did you mean `critic`",
        ],
    );

    let p = toml_file("top_level", "steps = 3\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "top_level.toml",
            "line 1",
            "steps",
            "[section]",
            "did you mean `run.steps`",
        ],
    );

    let p = toml_file("not_table", "run = 3\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "not_table.toml",
            "run",
            "expected a section",
            "an integer 3",
        ],
    );

    let m = load_err(None, &["run.stpes=3"]);
    assert_has(
        &m,
        &[
            "--set",
            "run.stpes",
            "unknown key",
            "did you mean `run.steps`",
        ],
    );
    let m = load_err(None, &["steps=3"]);
    assert_has(
        &m,
        &[
            "--set",
            "steps=3",
            "unknown key",
            "did you mean `run.steps`",
        ],
    );
}

#[test]
fn wrong_types_are_named() {
    let p = toml_file("wrong_type", "[optim]\n\nactor_lr = \"fast\"\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "wrong_type.toml",
            "line 3",
            "optim.actor_lr",
            "expected a float, got a string \"fast\"",
        ],
    );

    let p = toml_file("float_for_int", "[run]\nsteps = 2.5\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "float_for_int.toml",
            "run.steps",
            "expected an integer, got a float 2.5",
        ],
    );

    let p = toml_file("negative", "[run]\nsteps = -1\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &["negative.toml", "run.steps", "non-negative integer, got -1"],
    );

    let p = toml_file("bad_array", "[data]\neval_files = [\"a=b\", 3]\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &[
            "bad_array.toml",
            "data.eval_files",
            "array of strings",
            "item 1",
        ],
    );

    let m = load_err(None, &["run.steps=ten"]);
    assert_has(
        &m,
        &[
            "--set",
            "run.steps",
            "expected an integer, got a string \"ten\"",
        ],
    );
    let m = load_err(None, &["ppo.whiten=yes"]);
    assert_has(&m, &["--set", "ppo.whiten", "expected a boolean"]);
    let m = load_err(None, &["algo.name=sac"]);
    assert_has(
        &m,
        &[
            "--set",
            "algo.name",
            "dfpo | ppo | grpo | quantile",
            "\"sac\"",
        ],
    );
}

#[test]
fn malformed_toml_names_line_and_column() {
    let p = toml_file("malformed", "[run]\nsteps = 3\nseed = = 4\n");
    let m = load_err(Some(&p), &[]);
    assert_has(&m, &["malformed.toml", "malformed TOML", "line 3, column"]);
    let m = load_err(Some(Path::new("/nonexistent/dfpo.toml")), &[]);
    assert_has(&m, &["/nonexistent/dfpo.toml"]);
}

#[test]
fn set_without_equals_is_an_error() {
    let m = load_err(None, &["run.steps"]);
    assert_has(&m, &["--set", "run.steps", "expected KEY=VALUE"]);
}

#[test]
fn out_of_range_values_name_key_and_origin() {
    // From a file: the file, its line and the key.
    let p = toml_file("range", "[reward]\nflip_prob = 1.5\n");
    let m = load_err(Some(&p), &[]);
    assert_has(
        &m,
        &["range.toml", "line 2", "reward.flip_prob", "[0, 1]", "1.5"],
    );
    // From --set: the argument.
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["run.device=gpu"],
            &["run.device", "auto | cpu | cuda", "\"gpu\""],
        ),
        (
            &["run.on_nonfinite=ignore"],
            &["run.on_nonfinite", "skip | stop"],
        ),
        (&["ppo.agg=sum"], &["ppo.agg", "token-mean | seq-mean"]),
        (
            &["critic.solver=rk4"],
            &["critic.solver", "euler | midpoint"],
        ),
        (
            &["critic.weight_direction=sideways"],
            &["critic.weight_direction", "up | down | none"],
        ),
        (&["critic.anchor=mc"], &["critic.anchor", "lambda | td"]),
        (&["kl.estimator=k2"], &["kl.estimator", "auto | k1 | k3"]),
        (
            &["kl.placement=both"],
            &["kl.placement", "auto | reward | loss"],
        ),
        (
            &["optim.schedule=linear"],
            &["optim.schedule", "cosine | constant"],
        ),
        (
            &["data.task=gsm8k"],
            &["data.task", "arith | chain | jsonl"],
        ),
        (
            &["data.checker=regex"],
            &["data.checker", "arith | gsm8k | math"],
        ),
        (&["critic.k=1"], &["critic.k", "2 ..= 1024", "got 1"]),
        (&["critic.k=1025"], &["critic.k", "got 1025"]),
        (
            &["critic.head_width=48"],
            &["critic.head_width", "multiple of 32"],
        ),
        (&["critic.head_depth=0"], &["critic.head_depth", "1 ..= 8"]),
        (&["run.steps=0"], &["run.steps", ">= 1", "got 0"]),
        (
            &["run.keep_checkpoints=0"],
            &["run.keep_checkpoints", ">= 1"],
        ),
        (&["rollout.n_samples=0"], &["rollout.n_samples", ">= 1"]),
        (
            &["algo.name=grpo", "rollout.n_samples=1", "ppo.minibatches=1"],
            &["rollout.n_samples", "grpo", ">= 2"],
        ),
        (&["optim.actor_lr=-1e-4"], &["optim.actor_lr", ">= 0"]),
        (&["optim.critic_lr=nan"], &["optim.critic_lr", "got NaN"]),
        (&["optim.actor_lr=inf"], &["optim.actor_lr", "got inf"]),
        (
            &["ppo.minibatches=5"],
            &["ppo.minibatches", "do not divide", "16 * 4 = 64"],
        ),
        (&["ppo.gamma=1.1"], &["ppo.gamma", "[0, 1]"]),
        (&["ppo.clip_low=1"], &["ppo.clip_low", "[0, 1)"]),
        (&["critic.alpha=0"], &["critic.alpha", "(0, 1]"]),
        // One sample per tail: the tail variances are 0, the tail-shape term is identically 0.
        (
            &["critic.k=8"],
            &["critic.k=8", "critic.w_shape", "1 sample", "at least 2"],
        ),
        (
            &["critic.beta=0.05"],
            &["critic.beta=0.05", "critic.w_shape", "upper tail"],
        ),
        (&["rollout.temperature=0"], &["rollout.temperature", "> 0"]),
        (&["rollout.top_p=0"], &["rollout.top_p", "(0, 1]"]),
        (&["optim.beta2=1"], &["optim.beta2", "[0, 1)"]),
        (&["eval.pass_k=4"], &["eval.pass_k", "eval.greedy = false"]),
        (
            &["data.task=jsonl"],
            &["data.train_file", "data.task = \"jsonl\""],
        ),
        (
            &[
                "data.task=jsonl",
                "data.train_file=t",
                "data.eval_files=nameonly",
            ],
            &["data.eval_files", "name=path"],
        ),
        (&["model.policy="], &["model.policy"]),
    ];
    for (args, fragments) in cases {
        let m = load_err(None, args);
        assert!(m.contains("--set"), "{args:?}: {m}");
        assert_has(&m, fragments);
    }
    // The blamed --set is the user's one even when the rule involves a default key.
    let m = load_err(None, &["rollout.prompts_per_step=3", "rollout.n_samples=3"]);
    assert_has(&m, &["rollout.prompts_per_step=3", "3 * 3 = 9"]);
}

/// The default tails hold at least 2 samples each, so every weighted risk term is active (at
/// K = 8, α = β = 0.1 each tail was one sample and the tail-shape term identically 0).
#[test]
fn default_tails_hold_at_least_two_samples() {
    let c = TrainConfig::default().critic;
    for frac in [c.alpha, c.beta] {
        let n = dfpo::kernels::risk::tail_count(frac as f32, c.k);
        assert!(
            n >= 2,
            "a tail of {n} sample(s) at K = {}, fraction {frac}",
            c.k
        );
    }
    // An inert term is fine when its weight is 0, and for algorithms without the risk terms.
    TrainConfig::load(None, &sets(&["critic.k=8", "critic.w_shape=0"])).unwrap();
    TrainConfig::load(None, &sets(&["critic.k=8", "algo.name=ppo"])).unwrap();
}

#[test]
fn validate_names_the_key_without_origin() {
    let mut c = TrainConfig::default();
    c.critic.k = 4096;
    let m = c.validate().unwrap_err().to_string();
    assert_has(&m, &["critic.k", "4096"]);
    let mut c = TrainConfig::default();
    c.run.seed = u64::MAX;
    assert_has(&c.validate().unwrap_err().to_string(), &["run.seed"]);
}

#[test]
fn to_toml_round_trips() {
    let mut c = TrainConfig::load(
        None,
        &sets(&[
            "algo.name=quantile",
            "run.seed=123456789",
            "optim.eps=1e-12",
            "optim.actor_lr=3.3e-7",
            "rollout.temperature=0.7",
            "rollout.top_p=0.9",
            "reward.incorrect=-0.5",
            "data.task=jsonl",
            "data.train_file=a \"quoted\" name.jsonl",
            "data.eval_files=[\"x=1.jsonl\",\"y=2.jsonl\"]",
        ]),
    )
    .unwrap();
    c.critic.kappa = 0.1 + 0.2; // not a short decimal
    let text = c.to_toml();
    let p = toml_file("round_trip", &text);
    let back = TrainConfig::load(Some(&p), &[]).unwrap();
    assert_eq!(back, c, "round trip through:\n{text}");
    assert_eq!(
        TrainConfig::default().to_toml(),
        toml_file_text(&TrainConfig::default())
    );
}

fn toml_file_text(c: &TrainConfig) -> String {
    let p = toml_file("round_trip_default", &c.to_toml());
    TrainConfig::load(Some(&p), &[]).unwrap().to_toml()
}

#[test]
fn options_help_is_valid_toml_listing_every_key_with_its_default_and_doc() {
    let help = TrainConfig::options_help();
    // `dfpo-train config > run.toml` is a valid configuration: the defaults.
    let parsed: toml::Table = help.parse().unwrap_or_else(|e| panic!("{e}\n{help}"));
    let table = toml::Table::try_from(TrainConfig::default()).unwrap();
    assert_eq!(parsed, table);
    let p = toml_file("options_help", &help);
    assert_eq!(
        TrainConfig::load(Some(&p), &[]).unwrap(),
        TrainConfig::default()
    );
    // Every key line carries its documentation.
    let mut n = 0;
    for line in help
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(" = "))
    {
        assert!(
            line.contains("  # ") && !line.contains("(undocumented)"),
            "{line}"
        );
        n += 1;
    }
    let keys: usize = table.values().map(|t| t.as_table().unwrap().len()).sum();
    assert_eq!(n, keys);
    assert!(help.contains("\n[critic]\nk = 32 "), "{help}");
}

#[test]
fn config_args_parse_with_clap() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ConfigArgs,
    }
    let p = toml_file("clap", "[run]\nsteps = 11\n");
    let cli = Cli::try_parse_from([
        "x",
        "--config",
        p.to_str().unwrap(),
        "--set",
        "run.seed=4",
        "--set",
        "run.steps=12",
    ])
    .unwrap();
    let c = cli.config.resolve().unwrap();
    assert_eq!((c.run.steps, c.run.seed), (12, 4));
}
