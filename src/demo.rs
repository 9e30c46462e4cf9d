//! The critic demo: trains a DFPO flow critic head on a synthetic noisy-reward return
//! distribution through the graph runtime, then reads out K value samples per state by Euler
//! integration and compares their risk statistics with the truth.
//!
//! This is what `dfpo-train` runs by default until the full trainer (rollouts, policy, PPO) lands.
//! It exercises the whole critic path of a DFPO step except the backbone: the per-token
//! conditioning (c stands in for the backbone's hidden state), the flow head's training graph
//! (bootstrapped-anchor flow matching, docs/dfpo-method.md 2.6, plus the geometric-consistency
//! term of 2.7), stratified-noise readout with 1-step Euler (the DFPO inference rule) and with
//! N-step Euler, and the CVaR / tail statistics of the risk kernels.
//!
//! The task: state features c ~ N(0, I_C); the return is Z = s·μ(c) + σ(c)·ξ with ξ ~ N(0,1),
//! μ(c) = tanh(c·a), σ(c) = 0.1 + 0.2·sigmoid(c·b), and s = −1 with probability `flip` (the
//! reward-flip noise of the noisy-reward setting), +1 otherwise: a bimodal distribution whose
//! lower tail the mean alone does not describe.

use std::time::Instant;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::ops::{FlowCond, FlowEval, MseLoss};
use crate::graph::{GraphBuilder, Session};
use crate::kernels::adamw::{self, AdamWParams};
use crate::kernels::flow::{
    self, FlowHeadShape, IntegrateOpts, Interval, Noise, NoiseOpts, Solver,
};
use crate::kernels::risk::{self, Stat, TailLevels, NSTATS};
use crate::kernels::{inv_normal_cdf, uniform_open};

/// Options of the critic demo (all have defaults that run in seconds on 2 CPU cores).
#[derive(Clone, Debug, clap::Args)]
pub struct CriticDemoArgs {
    /// Training states.
    #[arg(long, default_value_t = 256)]
    pub states: usize,
    /// Held-out states for evaluation.
    #[arg(long, default_value_t = 256)]
    pub eval_states: usize,
    /// Dimension of the state features (stands in for the backbone hidden size).
    #[arg(long, default_value_t = 16)]
    pub cond_dim: usize,
    /// Flow head width (multiple of 32, 32..=512).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Flow head hidden layers.
    #[arg(long, default_value_t = 2)]
    pub depth: usize,
    /// Return samples per state per step for the anchor (flow-matching) term.
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Training steps.
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Learning rate (AdamW, constant).
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f64,
    /// Weight of the geometric-consistency term (0 switches it off).
    #[arg(long, default_value_t = 1.0)]
    pub gc_weight: f32,
    /// Euler steps of the multi-step solve (consistency targets and the reference readout).
    #[arg(long, default_value_t = 8)]
    pub solve_steps: u32,
    /// Probability that a return's sign is flipped (reward noise).
    #[arg(long, default_value_t = 0.2)]
    pub flip: f64,
    /// K: value samples per state at readout (stratified noise).
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Lower-tail level α of CVaR and upper-tail level β.
    #[arg(long, default_value_t = 0.1)]
    pub alpha: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: auto (CUDA when present, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Mean absolute errors of the readout statistics against the truth, over the eval states.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadoutErrors {
    pub mean: f64,
    pub std: f64,
    pub cvar: f64,
    pub upper: f64,
}

/// What a demo run measured.
#[derive(Clone, Debug)]
pub struct CriticDemoReport {
    pub first_loss: f32,
    pub final_loss: f32,
    /// Errors of the 1-step Euler readout (the DFPO inference rule).
    pub one_step: ReadoutErrors,
    /// Errors of the N-step Euler readout.
    pub n_step: ReadoutErrors,
    /// Errors of a constant prediction of the average statistics (what a scalar critic knows).
    pub baseline: ReadoutErrors,
    pub arena_bytes: usize,
    pub tensor_bytes: usize,
    pub rows_per_s: f64,
}

struct Task {
    a: Vec<f64>,
    b: Vec<f64>,
    flip: f64,
}

impl Task {
    fn new(c: usize, flip: f64, seed: u64) -> Self {
        let g = |i: u64| inv_normal_cdf(uniform_open(seed ^ 0xA5A5, i)) / (c as f64).sqrt();
        Task {
            a: (0..c as u64).map(g).collect(),
            b: (0..c as u64).map(|i| g(i + 1_000_000)).collect(),
            flip,
        }
    }

    fn mu_sigma(&self, c: &[f32]) -> (f64, f64) {
        let dot = |w: &[f64]| w.iter().zip(c).map(|(w, &x)| w * x as f64).sum::<f64>();
        let mu = (2.0 * dot(&self.a)).tanh();
        let sigma = 0.1 + 0.2 / (1.0 + (-dot(&self.b)).exp());
        (mu, sigma)
    }

    /// One return sample for state features `c` from three uniforms.
    fn sample(&self, c: &[f32], u_flip: f64, u_noise: f64) -> f64 {
        let (mu, sigma) = self.mu_sigma(c);
        let s = if u_flip < self.flip { -1.0 } else { 1.0 };
        s * mu + sigma * inv_normal_cdf(u_noise)
    }
}

/// Runs the demo on `device`, printing progress and a summary table to stdout.
pub fn run(args: &CriticDemoArgs, device: Device) -> Result<CriticDemoReport> {
    if args.states == 0 || args.eval_states == 0 || args.samples == 0 || args.steps == 0 {
        return Err(Error::Invalid(
            "states, eval-states, samples and steps must be > 0".into(),
        ));
    }
    if !(0.0..=1.0).contains(&args.flip) {
        return Err(Error::Invalid(format!(
            "--flip {}: must be in [0, 1]",
            args.flip
        )));
    }
    let shape = FlowHeadShape::new(args.cond_dim, args.width, args.depth)?;
    let (n, m, cd) = (args.states, args.samples, args.cond_dim);
    // Rows per state: m anchor rows, then m consistency rows when that term is on.
    let gc_rows = if args.gc_weight > 0.0 { m } else { 0 };
    let per = m + gc_rows;
    let rows = n * per;
    let task = Task::new(cd, args.flip, args.seed);
    let feats = |count: usize, salt: u64| -> Vec<f32> {
        (0..(count * cd) as u64)
            .map(|i| inv_normal_cdf(uniform_open(args.seed ^ salt, i)) as f32)
            .collect()
    };
    let c_train = feats(n, 0x1111);
    let c_eval = feats(args.eval_states, 0x2222);

    // The training graph: u = FlowCond(p, c); v = FlowEval(p, u, z, τ); loss = mean w (v − target)².
    let mut g = GraphBuilder::new();
    let p = g.param("flow.params", shape.param_count());
    let c = g.input("c", n * cd);
    let z = g.input("z", rows);
    let tau = g.input("tau", rows);
    let target = g.input("target_velocity", rows);
    let w = g.input("row_weight", rows);
    let u = g.node(FlowCond { shape }, &[p, c], &[("u", n * shape.width)])?[0];
    let v = g.node(
        FlowEval {
            shape,
            samples_per_token: per,
        },
        &[p, u, z, tau],
        &[("v", rows)],
    )?[0];
    let loss = g.node(MseLoss, &[v, target, w], &[("loss", 1)])?[0];
    let plan = g.plan(loss, &device)?;
    let (arena_bytes, tensor_bytes) = (plan.arena_bytes(), plan.tensor_bytes());
    let dp = plan.grad(p).expect("parameters have a gradient");
    let mut s = Session::new(plan, device.clone())?;
    println!(
        "critic demo on {}: {} states x {} rows, flow head C={} H={} L={} ({} params); graph arena {} KiB for {} KiB of activations and gradients",
        device.describe(),
        n,
        per,
        cd,
        shape.width,
        shape.depth,
        shape.param_count(),
        arena_bytes / 1024,
        tensor_bytes / 1024
    );

    let mut params = flow::init_params(&shape, args.seed);
    let (mut adam_m, mut adam_v) = (vec![0.0f32; params.len()], vec![0.0f32; params.len()]);
    let hp = AdamWParams {
        lr: args.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    s.write(c, &c_train)?;
    let weights: Vec<f32> = (0..rows)
        .map(|r| if r % per < m { 1.0 } else { args.gc_weight })
        .collect();
    s.write(w, &weights)?;

    let (mut zv, mut tv, mut target_v) =
        (vec![0.0f32; rows], vec![0.0f32; rows], vec![0.0f32; rows]);
    let mut u_host = vec![0.0f32; n * shape.width];
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let started = Instant::now();
    for step in 0..args.steps {
        let salt = args.seed.wrapping_mul(0x9E37) ^ ((step as u64) << 32);
        // Anchor rows: G from the task, ε, τ ~ U(0,1): z_τ = τ G + (1 − τ) ε, target G − ε.
        for t in 0..n {
            let ct = &c_train[t * cd..(t + 1) * cd];
            for j in 0..m {
                let r = t * per + j;
                let q = (r as u64) << 3;
                let gret = task.sample(ct, uniform_open(salt, q), uniform_open(salt, q + 1));
                let eps = inv_normal_cdf(uniform_open(salt, q + 2));
                let ta = uniform_open(salt, q + 3);
                zv[r] = (ta * gret + (1.0 - ta) * eps) as f32;
                tv[r] = ta as f32;
                target_v[r] = (gret - eps) as f32;
            }
        }
        // Consistency rows: ε + v(ε, 0) should land where the N-step solve of the current head
        // lands (a stop-gradient target): target velocity Φ^N(ε) − ε at (ε, τ = 0).
        if gc_rows > 0 {
            flow::cpu::cond_forward(&shape, &params, &c_train, &mut u_host)?;
            let eps: Vec<f32> = (0..n * m)
                .map(|i| inv_normal_cdf(uniform_open(salt ^ 0x6C, i as u64)) as f32)
                .collect();
            let mut z1 = vec![0.0f32; n * m];
            let opts = IntegrateOpts {
                steps: args.solve_steps,
                solver: Solver::Euler,
                clip: None,
                jacobian: false,
            };
            flow::cpu::integrate(
                &shape,
                &params,
                &u_host,
                m,
                &eps,
                Interval::Uniform(0.0, 1.0),
                &opts,
                &mut z1,
                None,
            )?;
            for t in 0..n {
                for j in 0..m {
                    let (r, i) = (t * per + m + j, t * m + j);
                    zv[r] = eps[i];
                    tv[r] = 0.0;
                    target_v[r] = z1[i] - eps[i];
                }
            }
        }
        s.write(p, &params)?;
        s.write(z, &zv)?;
        s.write(tau, &tv)?;
        s.write(target, &target_v)?;
        let l = s.run()?;
        if !l.is_finite() {
            return Err(Error::Invalid(format!("step {step}: non-finite loss {l}")));
        }
        let grads = s.read_f32(dp)?;
        let scale = adamw::clip_scale(adamw::cpu::grad_norm(&[&grads]), 1.0);
        adamw::cpu::step(
            &mut params,
            &grads,
            &mut adam_m,
            &mut adam_v,
            None,
            &hp,
            step as u64 + 1,
            scale,
        )?;
        if step == 0 {
            first_loss = l;
        }
        last_loss = l;
        if step % (args.steps / 6).max(1) == 0 || step + 1 == args.steps {
            println!("  step {:>5}  loss {:.5}", step + 1, l);
        }
    }
    let rows_per_s = (args.steps * rows) as f64 / started.elapsed().as_secs_f64();

    // Readout on held-out states: K stratified noise values per state, 1 and N Euler steps.
    let ne = args.eval_states;
    let k = args.k;
    let levels = TailLevels {
        alpha: args.alpha,
        beta: args.alpha,
    };
    let mut u_eval = vec![0.0f32; ne * shape.width];
    flow::cpu::cond_forward(&shape, &params, &c_eval, &mut u_eval)?;
    let mut eps = vec![0.0f32; ne * k];
    flow::cpu::noise(
        &NoiseOpts {
            kind: Noise::Stratified,
            truncate: None,
        },
        k,
        &mut eps,
    )?;
    let readout_stats = |steps: u32| -> Result<Vec<f32>> {
        let mut z1 = vec![0.0f32; ne * k];
        let opts = IntegrateOpts {
            steps,
            solver: Solver::Euler,
            clip: None,
            jacobian: false,
        };
        flow::cpu::integrate(
            &shape,
            &params,
            &u_eval,
            k,
            &eps,
            Interval::Uniform(0.0, 1.0),
            &opts,
            &mut z1,
            None,
        )?;
        let mut st = vec![0.0f32; ne * NSTATS];
        risk::cpu::stats(&z1, k, levels, &[], &mut st, &mut [], None, None)?;
        Ok(st)
    };
    let one = readout_stats(1)?;
    let multi = readout_stats(args.solve_steps)?;
    // Truth: 1024 quasi-random return samples per state (stratified in both uniforms).
    let kt = 1024;
    let mut truth_x = vec![0.0f32; ne * kt];
    for t in 0..ne {
        let ct = &c_eval[t * cd..(t + 1) * cd];
        for i in 0..kt {
            let u1 = (i as f64 + 0.5) / kt as f64;
            let u2 = uniform_open(args.seed ^ 0x3333, (t * kt + i) as u64);
            truth_x[t * kt + i] = task.sample(ct, u2, u1) as f32;
        }
    }
    let mut truth = vec![0.0f32; ne * NSTATS];
    risk::cpu::stats(&truth_x, kt, levels, &[], &mut truth, &mut [], None, None)?;
    let avg = |st: &[f32], i: Stat| {
        (0..ne)
            .map(|t| st[t * NSTATS + i as usize] as f64)
            .sum::<f64>()
            / ne as f64
    };
    let errors = |st: Option<&[f32]>| -> ReadoutErrors {
        let e = |i: Stat| {
            let base = avg(&truth, i);
            (0..ne)
                .map(|t| {
                    let want = truth[t * NSTATS + i as usize] as f64;
                    let got = st.map_or(base, |st| st[t * NSTATS + i as usize] as f64);
                    (got - want).abs()
                })
                .sum::<f64>()
                / ne as f64
        };
        ReadoutErrors {
            mean: e(Stat::Mean),
            std: e(Stat::Std),
            cvar: e(Stat::CvarLow),
            upper: e(Stat::MeanHigh),
        }
    };
    let report = CriticDemoReport {
        first_loss,
        final_loss: last_loss,
        one_step: errors(Some(&one)),
        n_step: errors(Some(&multi)),
        baseline: errors(None),
        arena_bytes,
        tensor_bytes,
        rows_per_s,
    };
    println!(
        "\nreadout on {ne} held-out states, K = {k} stratified samples; mean |error| vs the true return distribution"
    );
    println!(
        "  {:<34} {:>8} {:>8} {:>11} {:>11}",
        "readout", "mean", "std", "CVaR_low", "mean_high"
    );
    let row = |name: &str, e: &ReadoutErrors| {
        println!(
            "  {name:<34} {:>8.4} {:>8.4} {:>11.4} {:>11.4}",
            e.mean, e.std, e.cvar, e.upper
        )
    };
    row("constant (average statistics)", &report.baseline);
    row("flow head, 1 Euler step", &report.one_step);
    row(
        &format!("flow head, {} Euler steps", args.solve_steps),
        &report.n_step,
    );
    println!(
        "  true averages: mean {:.3}, std {:.3}, CVaR_{} {:.3}, upper mean {:.3}",
        avg(&truth, Stat::Mean),
        avg(&truth, Stat::Std),
        args.alpha,
        avg(&truth, Stat::CvarLow),
        avg(&truth, Stat::MeanHigh)
    );
    println!(
        "loss {:.4} -> {:.4}; {:.0} head rows/s (forward + backward) on {}",
        report.first_loss,
        report.final_loss,
        report.rows_per_s,
        device.describe()
    );
    Ok(report)
}

impl CriticDemoArgs {
    /// The defaults, as `dfpo-train critic-demo` with no flags gets them.
    pub fn parse_defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            a: CriticDemoArgs,
        }
        <Wrap as clap::Parser>::parse_from(["critic-demo"]).a
    }
}
