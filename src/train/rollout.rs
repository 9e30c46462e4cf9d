//! Rollout batches and what the update needs from them: rewards (clean and noisy), token
//! rewards with the KL penalty, token weights, GRPO advantages, and the DFPO flow critic's
//! targets. Pure functions of their inputs, so the tests can recompute every loss
//! independently.

use crate::error::{Error, Result};
use crate::kernels::flow::{FlowHeadShape, IntegrateOpts, Interval, Noise, NoiseOpts, Solver};
use crate::kernels::{inv_normal_cdf, splitmix64, uniform_open};
use crate::train::step_ops::StepOps;

/// A counter-based random stream: value i of stream (seed, tag) is a pure function, so a
/// resumed run draws exactly what the uninterrupted one drew.
#[derive(Clone, Debug)]
pub struct Stream {
    seed: u64,
    counter: u64,
}

impl Stream {
    /// The stream `tag` of run seed `seed` at RL step `step`.
    pub fn new(seed: u64, step: u64, tag: &str) -> Self {
        let mut h = splitmix64(seed ^ 0xD1F0_0000_0000_0000);
        h = splitmix64(h ^ step);
        for b in tag.bytes() {
            h = splitmix64(h ^ b as u64);
        }
        Stream {
            seed: h,
            counter: 0,
        }
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.counter += 1;
        uniform_open(self.seed, self.counter)
    }
    /// Standard normal (inverse CDF of a uniform).
    pub fn normal(&mut self) -> f64 {
        inv_normal_cdf(self.uniform())
    }
    /// A raw 64-bit value (seeds for other generators).
    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        splitmix64(self.seed ^ splitmix64(self.counter))
    }
    /// (seed, draws so far): draw c (from 1) is `uniform_open(seed, c)`, what a device kernel
    /// needs to draw the same values ([`crate::kernels::step::uniform_normal`]).
    pub fn state(&self) -> (u64, u64) {
        (self.seed, self.counter)
    }
    /// Skips `n` draws (made elsewhere, e.g. on the device).
    pub fn skip(&mut self, n: u64) {
        self.counter += n;
    }
    /// A uniformly random permutation of 0..n (Fisher–Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.uniform() * (i + 1) as f64) as usize;
            p.swap(i, j.min(i));
        }
        p
    }
}

/// One rollout batch: rows = prompts × samples, prompt-major.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Prompt + response tokens per row.
    pub seqs: Vec<Vec<u32>>,
    pub prompt_len: Vec<usize>,
    pub response_len: Vec<usize>,
    /// Prompt (group) index per row.
    pub group: Vec<usize>,
    /// The graph's sequence length S.
    pub s: usize,
    /// Clean (verifier) reward per row, and the noisy one the trainer sees.
    pub clean: Vec<f64>,
    pub noisy: Vec<f64>,
    /// Whether the verifier accepted the row.
    pub correct: Vec<bool>,
    /// Whether the checker found no answer in the row's response.
    pub unparsed: Vec<bool>,
    /// The response text per row.
    pub texts: Vec<String>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.seqs.len()
    }

    /// `[R][S]`: 1 at the index of every scored response token (t = prompt_len − 1 + j).
    pub fn mask(&self) -> Vec<f32> {
        let s = self.s;
        let mut m = vec![0.0f32; self.rows() * s];
        for r in 0..self.rows() {
            let t0 = self.prompt_len[r] - 1;
            for t in t0..t0 + self.response_len[r] {
                m[r * s + t] = 1.0;
            }
        }
        m
    }

    /// Index of row r's last scored token.
    pub fn last(&self, r: usize) -> usize {
        r * self.s + self.prompt_len[r] + self.response_len[r] - 2
    }
}

/// Token rewards `[R][S]`: −β·kl_t on response tokens plus the row's reward at its last token.
pub fn token_rewards(batch: &Batch, kl: Option<&[f32]>, beta: f64, rewards: &[f64]) -> Vec<f32> {
    let mask = batch.mask();
    let mut out = vec![0.0f32; mask.len()];
    if let Some(kl) = kl {
        for i in 0..out.len() {
            if mask[i] != 0.0 {
                out[i] = (-beta * kl[i] as f64) as f32;
            }
        }
    }
    for (r, &rw) in rewards.iter().enumerate() {
        if batch.response_len[r] > 0 {
            let i = batch.last(r);
            out[i] = (out[i] as f64 + rw) as f32;
        }
    }
    out
}

/// How GRPO scales the group-centred rewards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpoStd {
    /// By the group's sample std (n − 1; torch.std, as verl and TRL).
    Unbiased,
    /// By the group's population std (n).
    Population,
    /// Not at all (Dr. GRPO: R − mean_group).
    None,
}

/// GRPO: (R − mean_group)/(std_group + 1e-6) at every response token of the row, with the std
/// of `std` (verl's epsilon; no division with [`GrpoStd::None`]).
pub fn grpo_advantages(batch: &Batch, rewards: &[f64], std: GrpoStd) -> Vec<f32> {
    let a = grpo_row_advantages(batch, rewards, std);
    let mask = batch.mask();
    let s = batch.s;
    let mut out = vec![0.0f32; mask.len()];
    for (r, &ar) in a.iter().enumerate() {
        for t in 0..s {
            if mask[r * s + t] != 0.0 {
                out[r * s + t] = ar;
            }
        }
    }
    out
}

/// [`grpo_advantages`] per row (the value every response token of the row gets).
pub fn grpo_row_advantages(batch: &Batch, rewards: &[f64], std: GrpoStd) -> Vec<f32> {
    let groups = batch.group.iter().copied().max().map_or(0, |g| g + 1);
    let (mut sum, mut sq, mut cnt) = (
        vec![0.0f64; groups],
        vec![0.0f64; groups],
        vec![0.0f64; groups],
    );
    for (r, &g) in batch.group.iter().enumerate() {
        sum[g] += rewards[r];
        sq[g] += rewards[r] * rewards[r];
        cnt[g] += 1.0;
    }
    batch
        .group
        .iter()
        .enumerate()
        .map(|(r, &g)| {
            let mean = sum[g] / cnt[g];
            let ss = (sq[g] - cnt[g] * mean * mean).max(0.0);
            let scale = match std {
                GrpoStd::Unbiased => (ss / (cnt[g] - 1.0).max(1.0)).sqrt() + 1e-6,
                GrpoStd::Population => (ss / cnt[g]).sqrt() + 1e-6,
                GrpoStd::None => 1.0,
            };
            ((rewards[r] - mean) / scale) as f32
        })
        .collect()
}

/// Token weights `[rows][S]` of a minibatch: token mean (1/#tokens) or sequence mean
/// (1/(len·#rows with tokens)).
pub fn token_weights(mask: &[f32], s: usize, seq_mean: bool) -> Vec<f32> {
    let rows = mask.len() / s;
    let total: f32 = mask.iter().sum();
    let mut w = vec![0.0f32; mask.len()];
    if total == 0.0 {
        return w;
    }
    if !seq_mean {
        for (o, &m) in w.iter_mut().zip(mask) {
            *o = m / total;
        }
        return w;
    }
    let lens: Vec<f32> = (0..rows)
        .map(|r| mask[r * s..(r + 1) * s].iter().sum())
        .collect();
    let nonempty = lens.iter().filter(|&&l| l > 0.0).count() as f32;
    for r in 0..rows {
        if lens[r] > 0.0 {
            for t in 0..s {
                w[r * s + t] = mask[r * s + t] / (lens[r] * nonempty);
            }
        }
    }
    w
}

/// `critic.risk_targets = "prompt"`: the risk terms' targets at each row's first response token
/// (a state the n samples of a prompt share) become K quantiles of the group's pooled targets
/// there (n·K values; level (j + ½)/K, nearest rank). `target` is `[R][S][K]`.
pub fn pool_first_token_targets(batch: &Batch, target: &mut [f32], k: usize) {
    let s = batch.s;
    let groups = batch.group.iter().copied().max().map_or(0, |g| g + 1);
    for g in 0..groups {
        let rows: Vec<usize> = (0..batch.rows())
            .filter(|&r| batch.group[r] == g && batch.response_len[r] > 0)
            .collect();
        let first = |r: usize| (r * s + batch.prompt_len[r] - 1) * k;
        let mut pool: Vec<f32> = rows
            .iter()
            .flat_map(|&r| target[first(r)..first(r) + k].to_vec())
            .collect();
        if pool.is_empty() {
            continue;
        }
        pool.sort_by(f32::total_cmp);
        let q: Vec<f32> = (0..k)
            .map(|j| {
                let i = ((j as f64 + 0.5) / k as f64 * pool.len() as f64) as usize;
                pool[i.min(pool.len() - 1)]
            })
            .collect();
        for &r in &rows {
            target[first(r)..first(r) + k].copy_from_slice(&q);
        }
    }
}

/// Settings of the flow critic's no-grad solves.
#[derive(Clone, Copy, Debug)]
pub struct FlowSolve {
    pub shape: FlowHeadShape,
    pub k: usize,
    pub readout_steps: u32,
    pub target_steps: u32,
    pub solver: Solver,
    /// The reachable return range: clamps the END of every [0, 1] solve (a return sample). The
    /// partial [0, τ] solves of the DCFM target end on the noise-to-return path, not at a
    /// return, and are not clipped.
    pub clip: Option<(f32, f32)>,
}

/// Clamps return samples to the return range (the end of a [0, 1] solve).
fn clip_returns(z: &mut [f32], clip: Option<(f32, f32)>) {
    if let Some((lo, hi)) = clip {
        for v in z {
            *v = v.clamp(lo, hi);
        }
    }
}

/// The stratified noise levels ε_k = Φ⁻¹((k + ½)/K).
pub fn stratified_eps(k: usize) -> Result<Vec<f32>> {
    let mut e = vec![0.0f32; k];
    StepOps::host().noise(
        &NoiseOpts {
            kind: Noise::Stratified,
            truncate: None,
        },
        k,
        &mut e,
    )?;
    Ok(e)
}

/// Rows `idx` (each `w` wide) of the row-major `u`, concatenated.
pub fn gather(u: &[f32], idx: &[usize], w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * w);
    for &i in idx {
        out.extend_from_slice(&u[i * w..(i + 1) * w]);
    }
    out
}

/// The readout value samples `[R][S][K]` (0 off the mask): ε_k integrated over [0, 1] with
/// `readout_steps` Euler steps, and the per-token sample std.
pub fn flow_readout(
    ops: &StepOps,
    fs: &FlowSolve,
    params: &[f32],
    u: &[f32],
    mask: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (k, w) = (fs.k, fs.shape.width);
    let idx: Vec<usize> = (0..mask.len()).filter(|&i| mask[i] != 0.0).collect();
    let us = gather(u, &idx, w);
    let eps = stratified_eps(k)?;
    let z0: Vec<f32> = (0..idx.len() * k).map(|r| eps[r % k]).collect();
    let mut z1 = vec![0.0f32; z0.len()];
    ops.integrate(
        &fs.shape,
        params,
        &us,
        k,
        &z0,
        Interval::Uniform(0.0, 1.0),
        &IntegrateOpts {
            steps: fs.readout_steps,
            solver: Solver::Euler,
            clip: None,
            jacobian: false,
        },
        &mut z1,
    )?;
    clip_returns(&mut z1, fs.clip);
    let mut z = vec![0.0f32; mask.len() * k];
    let mut std = vec![0.0f32; mask.len()];
    for (j, &i) in idx.iter().enumerate() {
        let row = &z1[j * k..(j + 1) * k];
        z[i * k..(i + 1) * k].copy_from_slice(row);
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / k as f64;
        let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / k as f64;
        std[i] = var.sqrt() as f32;
    }
    Ok((z, std))
}

/// Everything the flow critic's loss reads besides its own evaluations (see
/// [`crate::train::heads::FlowCriticLoss`]); `[R][S][K]` or `[R][S]`, zeros off the mask.
#[derive(Clone, Debug, Default)]
pub struct FlowTargets {
    pub z_read: Vec<f32>,
    pub tau_read: Vec<f32>,
    pub z_b: Vec<f32>,
    pub tau_b: Vec<f32>,
    pub z_d: Vec<f32>,
    pub tau_d: Vec<f32>,
    pub eps: Vec<f32>,
    pub target: Vec<f32>,
    pub vel_b: Vec<f32>,
    pub vel_d: Vec<f32>,
    pub w_unc: Vec<f32>,
    pub dmask: Vec<f32>,
}

impl FlowTargets {
    /// The 12 fields in [`FlowTargets::fields`] order, moved out.
    pub fn into_fields(self) -> [Vec<f32>; 12] {
        [
            self.z_read,
            self.tau_read,
            self.z_b,
            self.tau_b,
            self.z_d,
            self.tau_d,
            self.eps,
            self.target,
            self.vel_b,
            self.vel_d,
            self.w_unc,
            self.dmask,
        ]
    }

    /// The per-token fields in the flow critic head's input order
    /// ([`crate::train::models::FLOW_SAMPLE_INPUTS`]): 10 of K values per token, then 2 of one
    /// value per token.
    pub fn fields(&self) -> [&[f32]; 12] {
        [
            &self.z_read,
            &self.tau_read,
            &self.z_b,
            &self.tau_b,
            &self.z_d,
            &self.tau_d,
            &self.eps,
            &self.target,
            &self.vel_b,
            &self.vel_d,
            &self.w_unc,
            &self.dmask,
        ]
    }
}

/// Options of [`flow_targets`].
#[derive(Clone, Copy, Debug)]
pub struct FlowTargetOpts {
    pub gamma: f32,
    pub kappa: f32,
    /// +1 up-weights uncertain tokens (Value Flows), −1 down-weights them, 0 uniform.
    pub direction: i32,
    /// Anchor on the distributional λ-return G (else the one-step TD sample r + γ m z_{t+1}).
    pub anchor_lambda: bool,
}

/// Builds the flow critic's targets from the rollout-time (old) critic: `u` its conditioning
/// `[R·S][W]`, `z` its readout samples and `std` their per-token std, `ret` the distributional
/// λ-returns G `[R][S][K]`, `rewards` the token rewards, `mask` the response tokens. (The
/// consistency target comes from the CURRENT critic, inside the update:
/// [`crate::train::models::flow_head_graph`].)
#[allow(clippy::too_many_arguments)]
pub fn flow_targets(
    ops: &StepOps,
    fs: &FlowSolve,
    params: &[f32],
    u: &[f32],
    z: &[f32],
    std: &[f32],
    ret: &[f32],
    rewards: &[f32],
    mask: &[f32],
    s: usize,
    o: &FlowTargetOpts,
    rng: &mut Stream,
) -> Result<FlowTargets> {
    let (k, w) = (fs.k, fs.shape.width);
    let n = mask.len();
    if u.len() != n * w || z.len() != n * k || ret.len() != n * k || rewards.len() != n {
        return Err(Error::Shape(format!(
            "flow_targets: u {} z {} ret {} rewards {} for {n} tokens, K {k}, W {w}",
            u.len(),
            z.len(),
            ret.len(),
            rewards.len()
        )));
    }
    let eps = stratified_eps(k)?;
    let idx: Vec<usize> = (0..n).filter(|&i| mask[i] != 0.0).collect();
    // The next token continues the response (same row, inside the mask).
    let cont = |i: usize| !(i + 1).is_multiple_of(s) && i + 1 < n && mask[i + 1] != 0.0;
    let mut t = FlowTargets {
        z_read: vec![0.0; n * k],
        tau_read: vec![0.0; n * k],
        z_b: vec![0.0; n * k],
        tau_b: vec![0.0; n * k],
        z_d: vec![0.0; n * k],
        tau_d: vec![0.0; n * k],
        eps: vec![0.0; n * k],
        target: ret.to_vec(),
        vel_b: vec![0.0; n * k],
        vel_d: vec![0.0; n * k],
        w_unc: vec![0.0; n],
        dmask: vec![0.0; n],
    };
    // The matching terms' (ε, τ) per (token, sample), shared by DCFM and BCFM as in Value
    // Flows, drawn in a fixed order: the flow is trained at noise levels all over N(0, 1), not
    // along the K readout levels only. With the λ-return anchor, ε is independent of G (the
    // independent coupling of conditional flow matching).
    let mut tau = vec![0.0f32; idx.len() * k];
    for v in tau.iter_mut() {
        *v = rng.uniform() as f32;
    }
    let noise: Vec<f32> = (0..idx.len() * k).map(|_| rng.normal() as f32).collect();
    let next: Vec<usize> = idx
        .iter()
        .map(|&i| if cont(i) { i + 1 } else { i })
        .collect();
    let un = gather(u, &next, w);
    let zeros = vec![0.0f32; noise.len()];
    // z'_τ: the old flow at h_{t+1} from the sampled ε over [0, τ]; then v_old(z'_τ, τ | h_{t+1}).
    let opts = IntegrateOpts {
        steps: fs.target_steps,
        solver: fs.solver,
        clip: None,
        jacobian: false,
    };
    let mut zp = vec![0.0f32; noise.len()];
    let iv = Interval::PerRow(&zeros, &tau);
    ops.integrate(&fs.shape, params, &un, k, &noise, iv, &opts, &mut zp)?;
    let mut vold = vec![0.0f32; noise.len()];
    ops.eval(&fs.shape, params, &un, k, &zp, &tau, &mut vold)?;
    for (j, &i) in idx.iter().enumerate() {
        let c = cont(i);
        let sd = std[i].max(1e-6);
        let conf = 1.0 / (1.0 + (o.kappa / sd).exp()) + 0.5; // sigmoid(−κ/σ) + 0.5
        t.w_unc[i] = match o.direction {
            1 => conf,
            -1 => 1.5 - conf,
            _ => 1.0,
        };
        t.dmask[i] = if c { 1.0 } else { 0.0 };
        for kk in 0..k {
            let (src, dst) = (j * k + kk, i * k + kk);
            let (e, ta) = (eps[kk], tau[src]);
            let eb = noise[src];
            let g = if o.anchor_lambda {
                ret[dst]
            } else if c {
                rewards[i] + o.gamma * z[(i + 1) * k + kk]
            } else {
                rewards[i]
            };
            t.eps[dst] = e;
            t.z_read[dst] = e;
            t.tau_read[dst] = 0.0;
            t.target[dst] = ret[dst];
            t.z_b[dst] = ta * g + (1.0 - ta) * eb;
            t.tau_b[dst] = ta;
            t.vel_b[dst] = g - eb;
            t.tau_d[dst] = ta;
            if c {
                t.z_d[dst] = rewards[i] + o.gamma * zp[src];
                t.vel_d[dst] = vold[src];
            } else {
                t.z_d[dst] = rewards[i];
                t.vel_d[dst] = 0.0;
            }
        }
    }
    Ok(t)
}
