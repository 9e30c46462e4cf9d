//! The critic demo (the default `dfpo-train` job) learns: after a short training, the N-step
//! readout's per-state mean is much closer to the truth than a constant prediction. (The tail
//! statistics need the longer default run; its output shows them.)

use clap::Parser;
use dfpo::demo::{run, CriticDemoArgs};
use dfpo::Device;

#[derive(Parser)]
struct Wrap {
    #[command(flatten)]
    a: CriticDemoArgs,
}

#[test]
fn critic_demo_learns_the_return_distribution() {
    let a = Wrap::parse_from([
        "demo",
        "--states",
        "128",
        "--steps",
        "250",
        "--eval-states",
        "64",
    ])
    .a;
    let r = run(&a, Device::Cpu).unwrap();
    assert!(
        r.final_loss < 0.8 * r.first_loss,
        "loss {} -> {}",
        r.first_loss,
        r.final_loss
    );
    assert!(
        r.n_step.mean < 0.5 * r.baseline.mean,
        "{:?} vs {:?}",
        r.n_step,
        r.baseline
    );
    assert!(r.arena_bytes <= r.tensor_bytes);
}

#[test]
fn critic_demo_rejects_bad_options() {
    let a = Wrap::parse_from(["demo", "--flip", "1.5"]).a;
    assert!(run(&a, Device::Cpu).is_err());
    let a = Wrap::parse_from(["demo", "--width", "48"]).a;
    assert!(
        run(&a, Device::Cpu).is_err(),
        "width must be a multiple of 32"
    );
}
