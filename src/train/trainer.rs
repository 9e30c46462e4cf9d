//! The RL loop: rollout → rewards (noisy for training, clean for metrics) → reference log-probs
//! → token rewards with KL → critic readout → (distributional) GAE → whitened advantages →
//! PPO epochs × minibatches of actor and critic updates; evaluation before and after,
//! metrics, atomic checkpoints with resume, and the final HF export.
//!
//! Every random draw is a pure function of (run seed, step, purpose) ([`Stream`]), and the
//! optimizer state is saved exactly (f32 master weights, moments, step counts), so a resumed
//! CPU run reproduces the uninterrupted run's metrics bit for bit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::calibration::{calibration_table, critic_calibration};
use super::config::{Algo, TrainConfig};
use super::eval::{
    check_unparsed, cut_at_stop, evaluate_with, response_text, stop_ids, EvalOpts, EvalResult,
};
use super::heads::{FlowTermWeights, RiskTerms};
use super::metrics::{MetricsWriter, Progress};
use super::models::{
    response_logprobs_buf, tensor_map, ActorStats, Critic, CriticHead, CriticStats, OptSettings,
    Policy,
};
use super::optim::Schedule;
use super::rollout::{
    gather, grpo_row_advantages, Batch, FlowSolve, FlowTargetOpts, GrpoStd, Stream,
};
use super::run_dir::{self, Fingerprint, Start};
use super::step_ops::{FlowMicro, StepBuf, StepOps, FLOW_TARGET_FIELD};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::adamw::AdamWParams;
use crate::kernels::flow::{FlowHeadShape, IntegrateOpts, Solver};
use crate::kernels::risk::{RiskLossWeights, Stat, TailLevels};
use crate::kernels::rl::GaeParams;
use crate::kernels::sample::SampleParams;
use crate::model::checkpoint::{
    read_safetensors, save_hf_folder, save_safetensors, write_atomic, Dtype, Tensor, TensorMap,
};
use crate::model::decoder::{Decoder, DecoderGraph};
use crate::model::generate::{generate, GenerateParams, Generation};
use crate::model::tokenizer::Tokenizer;
use crate::task::{encode_prompt, load_task, TaskData};

/// What a finished run reports (also written to `out_dir/summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub algo: String,
    pub seed: u64,
    pub flip_prob: f64,
    pub steps: u64,
    pub seconds: f64,
    pub before: BTreeMap<String, EvalEntry>,
    pub after: BTreeMap<String, EvalEntry>,
}

/// One eval split's numbers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalEntry {
    pub accuracy: f64,
    pub unparsed: f64,
    pub n: usize,
}

impl From<&EvalResult> for EvalEntry {
    fn from(e: &EvalResult) -> Self {
        EvalEntry {
            accuracy: e.accuracy,
            unparsed: e.unparsed,
            n: e.n,
        }
    }
}

/// Checkpoint metadata (`meta.json` next to `state.safetensors`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    step: u64,
    kl_coef: f64,
    /// Prompts consumed so far (the data position).
    data_position: u64,
    seed: u64,
    algo: String,
    policy_opt_step: u64,
    critic_opt_step: u64,
    seconds: f64,
    before: BTreeMap<String, EvalEntry>,
    /// The run's configuration fingerprint (run_dir.rs); absent in older checkpoints.
    #[serde(default)]
    fingerprint: Option<Fingerprint>,
}

/// The flow solver named by `critic.solver`.
fn solver(name: &str) -> Solver {
    if name == "midpoint" {
        Solver::Midpoint
    } else {
        Solver::Euler
    }
}

/// The device named by `run.device` ("auto": CUDA when present, else the CPU).
pub fn resolve_device(name: &str) -> Result<Device> {
    crate::model::score::parse_device("run.device", name)
}

pub use crate::model::builtin::model_dir;

/// What the update phase of one RL step reads (see [`Trainer::prepare`]). Per-token tensors
/// are `[rows][S]` (× K for the value samples), rows prompt-major, as step buffers: host vectors
/// on the CPU, device buffers on CUDA ([`StepBuf::host`] reads the former; [`StepOps::read`]
/// downloads either).
pub struct Prepared {
    pub batch: Batch,
    /// The rollout mask on the host (the rollout's bookkeeping: token lists, weights).
    pub mask: Vec<f32>,
    /// The same mask where the step computes.
    pub mask_buf: StepBuf,
    pub skip: Vec<usize>,
    pub ntok: f64,
    pub old_lp: StepBuf,
    pub old_ent: StepBuf,
    /// The per-token KL against the reference (its estimator), when there is a reference.
    pub kl: Option<StepBuf>,
    /// The reference log-probs, when the KL is a term of the actor loss.
    pub ref_lp: Option<StepBuf>,
    pub values: StepBuf,
    pub ret: StepBuf,
    pub adv: StepBuf,
    pub k: usize,
    /// The flow critic's targets: the 12 fields of [`super::rollout::FlowTargets::fields`].
    pub targets: Option<Vec<StepBuf>>,
    /// The critic readout's statistics.
    pub metrics: BTreeMap<String, f64>,
    /// Σ entropy over the response tokens and (with a reference) Σ KL (the step's metrics).
    pub entropy_sum: f64,
    pub kl_sum: Option<f64>,
    pub t_roll: f64,
    pub t_prep: f64,
}

/// The trainer's state.
pub struct Trainer {
    pub cfg: TrainConfig,
    device: Device,
    /// Where the step's readout, target solves, GAE, whitening, KL and risk statistics run.
    pub(crate) ops: StepOps,
    pub(crate) tok: Tokenizer,
    tok_files: Vec<PathBuf>,
    pub(crate) task: TaskData,
    pub(crate) train_ids: Vec<Vec<u32>>,
    pub(crate) stop: Vec<u32>,
    pub(crate) s: usize,
    pub policy: Policy,
    pub critic: Option<Critic>,
    reference: Option<DecoderGraph>,
    pub step: u64,
    kl_coef: f64,
    out: PathBuf,
    before: BTreeMap<String, EvalEntry>,
    seconds_before: f64,
    /// Test hook: [`Trainer::run`] stops with an error right after this step (after its
    /// metrics and checkpoint), as if the process had been killed there.
    pub interrupt_after: Option<u64>,
    /// The configuration fingerprint of the run (set by [`Trainer::run`], saved in checkpoints).
    fingerprint: Option<Fingerprint>,
    /// Longest prompt in tokens (data.max_prompt_length or the model's limit).
    prompt_limit: usize,
    /// The running reward.command program, if any.
    reward_cmd: Option<std::sync::Mutex<super::reward_cmd::RewardCommand>>,
    /// The sample generations of the last step (samples.jsonl).
    pub last_samples: Vec<serde_json::Value>,
    /// On CUDA: rollouts and evals generate on the device from the policy graph's weights.
    device_gen: Option<std::sync::Mutex<crate::model::generate_cuda::DeviceGenerators>>,
}

fn fmt_path(p: &Path) -> String {
    p.display().to_string()
}

fn io_err(p: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: fmt_path(p),
        source: e,
    }
}

impl Trainer {
    /// Loads the models and data named by `cfg` (validated first).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let device = resolve_device(&cfg.run.device)?;
        let pdir = model_dir(&cfg.model.policy)?;
        let policy_dec = cfg.model.load_decoder(&pdir)?;
        let tok = Tokenizer::from_dir(&pdir)?;
        let tok_files: Vec<PathBuf> = [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ]
        .iter()
        .map(|f| pdir.join(f))
        .filter(|p| p.exists())
        .collect();
        let task = load_task(&cfg.data, cfg.run.seed)?;
        for note in crate::task::data_report(&task, &tok, cfg.data.max_unparsed)? {
            eprintln!("dfpo-train: warning: data: {note}");
        }
        let mut task = task;
        let (train_ids, prompt_limit) = fit_task_prompts(&mut task, &tok, &cfg, &policy_dec)?;
        if train_ids.is_empty() {
            return Err(Error::Invalid("the training set is empty".into()));
        }
        let max_prompt = train_ids.iter().map(Vec::len).max().unwrap_or(1);
        let s = max_prompt + cfg.rollout.max_new_tokens;
        if s > policy_dec.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "the longest training prompt ({max_prompt} tokens) + rollout.max_new_tokens ({}) exceeds the model's max_position_embeddings ({})",
                cfg.rollout.max_new_tokens, policy_dec.config.max_position_embeddings
            )));
        }
        let stop = stop_ids(&policy_dec, &tok);
        let rows = cfg.rollout.prompts_per_step * cfg.rollout.n_samples;
        // The graphs' batch: one micro-batch (the whole minibatch without accumulation).
        let b = match cfg.ppo.micro_batch_size {
            0 => rows / cfg.ppo.minibatches,
            m => m,
        };
        let o = &cfg.optim;
        let total = cfg.run.steps as u64 * cfg.ppo.epochs as u64 * cfg.ppo.minibatches as u64;
        let settings = |lr: f64| OptSettings {
            hp: AdamWParams {
                lr,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
            },
            max_grad_norm: if o.max_grad_norm > 0.0 {
                o.max_grad_norm as f32
            } else {
                f32::INFINITY
            },
            schedule: Schedule {
                peak: lr,
                warmup: (o.warmup_frac * total as f64).round() as u64,
                total,
                cosine: o.schedule == "cosine",
                min_ratio: o.min_lr_ratio,
            },
        };
        // Policy and reference log-probs at the sampling temperature (temperature 0, greedy
        // rollouts: at 1), so the PPO ratio and the KL compare the behaviour distributions.
        let temp = if cfg.rollout.temperature > 0.0 {
            cfg.rollout.temperature
        } else {
            1.0
        };
        let reference = if cfg.kl.coef > 0.0 {
            let rdir = if cfg.model.reference.is_empty() {
                pdir.clone()
            } else {
                model_dir(&cfg.model.reference)?
            };
            Some(
                cfg.model
                    .load_decoder(&rdir)?
                    .build_nll(b, s, &device, temp)?,
            )
        } else {
            None
        };
        let critic = if cfg.algo.name.has_critic() {
            let cdir = if cfg.model.critic.is_empty() {
                pdir.clone()
            } else {
                model_dir(&cfg.model.critic)?
            };
            let cdec = cfg.model.load_decoder(&cdir)?;
            let c = &cfg.critic;
            let risk = RiskTerms {
                levels: TailLevels {
                    alpha: c.alpha as f32,
                    beta: c.beta as f32,
                },
                weights: RiskLossWeights {
                    cvar: c.w_cvar as f32,
                    gain: c.w_gain as f32,
                    shape: c.w_shape as f32,
                    mean_shift: 0.0,
                },
            };
            let head = match cfg.algo.name {
                Algo::Ppo => CriticHead::Value {
                    clip: cfg.ppo.value_clip as f32,
                },
                Algo::Quantile => CriticHead::Quantile {
                    k: c.k,
                    kappa: c.huber_kappa as f32,
                    sum_quantiles: c.quantile_norm == "sum",
                    risk,
                },
                Algo::Dfpo => CriticHead::Flow {
                    k: c.k,
                    max_tokens: b * cfg.rollout.max_new_tokens,
                    shape: FlowHeadShape::new(cdec.config.hidden_size, c.head_width, c.head_depth)?,
                    weights: FlowTermWeights {
                        dcfm: c.w_dcfm as f32,
                        bcfm: c.w_bcfm as f32,
                        gc: c.w_gc as f32,
                    },
                    risk,
                    init_seed: Stream::new(cfg.run.seed, 0, "flow-init").next_u64(),
                    gc_solve: IntegrateOpts {
                        steps: c.target_steps as u32,
                        solver: solver(&c.solver),
                        clip: None,
                        jacobian: false,
                    },
                },
                Algo::Grpo => unreachable!("grpo has no critic"),
            };
            Some(Critic::new(
                &cdec,
                b,
                s,
                &device,
                head,
                &settings(o.critic_lr),
            )?)
        } else {
            None
        };
        let pc = &cfg.ppo;
        let policy = Policy::new(
            policy_dec,
            b,
            s,
            &device,
            temp,
            pc.clip_low as f32,
            pc.clip_high as f32,
            pc.ent_coef as f32,
            (cfg.kl.coef > 0.0 && cfg.kl_in_loss()).then(|| cfg.kl_kind()),
            &settings(o.actor_lr),
        )?;
        let out = PathBuf::from(&cfg.run.out_dir);
        let kl_coef = cfg.kl.coef;
        let reward_cmd = if cfg.reward.command.is_empty() {
            None
        } else {
            let c =
                super::reward_cmd::RewardCommand::start(&cfg.reward.command, cfg.reward.timeout_s)?;
            Some(std::sync::Mutex::new(c))
        };
        let device_gen = match &device {
            Device::Cuda(d) => Some(std::sync::Mutex::new(
                crate::model::generate_cuda::DeviceGenerators::new(d.clone(), &policy.dec.config),
            )),
            Device::Cpu => None,
        };
        Ok(Trainer {
            cfg,
            ops: StepOps::new(&device),
            device,
            tok,
            tok_files,
            task,
            train_ids,
            stop,
            s,
            policy,
            critic,
            reference,
            step: 0,
            kl_coef,
            out,
            before: BTreeMap::new(),
            seconds_before: 0.0,
            interrupt_after: None,
            fingerprint: None,
            prompt_limit,
            reward_cmd,
            last_samples: Vec::new(),
            device_gen,
        })
    }

    /// On CUDA: the host traffic and decode steps of device generation so far (rollouts and
    /// evals); `None` on the CPU.
    pub fn generation_traffic(&self) -> Option<crate::model::generate_cuda::Traffic> {
        self.device_gen
            .as_ref()
            .and_then(|m| m.lock().ok().map(|g| g.traffic()))
    }

    /// Generation for rollouts and evals: on CUDA on the device from the policy graph's live
    /// weights ([`crate::model::generate_cuda`]), else on the CPU from the host copy.
    fn generate(&self, prompts: &[Vec<u32>], gp: &GenerateParams) -> Result<Vec<Generation>> {
        match &self.device_gen {
            Some(m) => m
                .lock()
                .map_err(|_| Error::Invalid("device generation: a previous call panicked".into()))?
                .generate(
                    &self.policy.graph,
                    prompts,
                    gp,
                    self.s - self.cfg.rollout.max_new_tokens,
                ),
            None => generate(&self.policy.dec, prompts, gp),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The graphs' sequence length S (longest prompt + rollout.max_new_tokens).
    pub fn seq_len(&self) -> usize {
        self.s
    }

    /// Where the step's numerics run (reads the step buffers of a [`Prepared`]).
    pub fn step_ops(&self) -> &StepOps {
        &self.ops
    }

    /// The prompts of RL step `step`: consecutive slices of a per-epoch permutation.
    fn step_prompts(&self, step: u64) -> Vec<usize> {
        let n = self.train_ids.len();
        let p = self.cfg.rollout.prompts_per_step;
        let mut out = Vec::with_capacity(p);
        let mut pos = step as usize * p;
        let mut perm_epoch = usize::MAX;
        let mut perm = Vec::new();
        while out.len() < p {
            let (epoch, i) = (pos / n, pos % n);
            if epoch != perm_epoch {
                perm = Stream::new(self.cfg.run.seed, epoch as u64, "data").permutation(n);
                perm_epoch = epoch;
            }
            out.push(perm[i]);
            pos += 1;
        }
        out
    }

    /// Evaluates the current policy on every eval split.
    pub fn evaluate(&self) -> Result<Vec<EvalResult>> {
        let e = &self.cfg.eval;
        let opts = EvalOpts {
            max_prompt_length: self.prompt_limit,
            stop: self.cfg.rollout.stop.clone(),
            greedy: e.greedy,
            pass_k: e.pass_k,
            max_new_tokens: self.cfg.rollout.max_new_tokens,
            temperature: self.cfg.rollout.temperature,
            seed: self.cfg.run.seed,
            chat_template: self.cfg.data.chat_template,
            batch: 64,
        };
        self.task
            .evals
            .iter()
            .map(|(name, ex)| {
                evaluate_with(
                    &self.policy.dec,
                    &self.tok,
                    name,
                    ex,
                    self.task.checker,
                    &opts,
                    &mut |ps, gp| self.generate(ps, gp),
                )
            })
            .collect()
    }

    /// Generates and scores the rollout batch of step `step`.
    pub fn rollout(&self, step: u64) -> Result<Batch> {
        let rc = &self.cfg.rollout;
        let idx = self.step_prompts(step);
        let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| self.train_ids[i].clone()).collect();
        let gp = GenerateParams {
            max_new_tokens: rc.max_new_tokens,
            sample: SampleParams {
                temperature: rc.temperature,
                top_k: rc.top_k as u32,
                top_p: rc.top_p,
            },
            stop_ids: self.stop.clone(),
            n_samples: rc.n_samples,
            seed: Stream::new(self.cfg.run.seed, step, "rollout").next_u64(),
        };
        let gens = self.generate(&prompts, &gp)?;
        let mut noise = Stream::new(self.cfg.run.seed, step, "reward");
        let mut b = Batch {
            s: self.s,
            ..Default::default()
        };
        let r = &self.cfg.reward;
        let mut kept = Vec::with_capacity(gens.len());
        for g in &gens {
            let keep = cut_at_stop(&self.tok, &g.tokens, &rc.stop)?;
            kept.push((
                keep,
                response_text(&self.tok, &g.tokens[..keep], &self.stop)?,
            ));
        }
        let example =
            |g: &crate::model::generate::Generation| &self.task.train[idx[g.prompt_index]];
        // reward.command: the external program's rewards replace the checker's.
        let replies = match &self.reward_cmd {
            Some(cmd) => {
                let reqs: Vec<super::reward_cmd::Request> = gens
                    .iter()
                    .zip(&kept)
                    .map(|(g, (_, text))| super::reward_cmd::Request {
                        prompt: &example(g).prompt,
                        response: text,
                        answer: &example(g).answer,
                    })
                    .collect();
                let mut cmd = cmd.lock().map_err(|_| {
                    Error::Invalid("reward.command: a previous call panicked".into())
                })?;
                Some(cmd.score(&reqs)?)
            }
            None => None,
        };
        for (j, (g, (keep, text))) in gens.iter().zip(&kept).enumerate() {
            let prompt = &prompts[g.prompt_index];
            let tokens = &g.tokens[..*keep];
            let (ok, unparsed, clean, noisy) = match &replies {
                Some(rep) => {
                    let mid = 0.5 * (r.correct + r.incorrect);
                    let ok = rep[j].correct.unwrap_or(rep[j].reward > mid);
                    let noisy = rep[j].reward + super::noise::additive_noise(r, &mut noise);
                    (ok, false, rep[j].reward, noisy)
                }
                None => {
                    let verdict = self.task.checker.check(text, &example(g).answer);
                    let ok = verdict == crate::task::Verdict::Correct;
                    let clean = if ok { r.correct } else { r.incorrect };
                    let unparsed = verdict == crate::task::Verdict::Unparsed;
                    let ex = example(g);
                    let scored = super::noise::Scored {
                        correct: ok,
                        right_shape: r.partial_credit > 0.0
                            && self.task.checker.right_shape(text, &ex.prompt),
                        in_subset: super::noise::in_subset(r, &ex.prompt),
                    };
                    let noisy = super::noise::noisy_reward(scored, r, &mut noise);
                    (ok, unparsed, clean, noisy)
                }
            };
            b.unparsed.push(unparsed);
            let mut seq = prompt.clone();
            seq.extend_from_slice(tokens);
            b.prompt_len.push(prompt.len());
            b.response_len.push(tokens.len());
            b.seqs.push(seq);
            b.group.push(g.prompt_index);
            b.correct.push(ok);
            b.clean.push(clean);
            b.noisy.push(noisy);
            b.texts.push(text.clone());
        }
        Ok(b)
    }

    /// The first `run.log_samples` rows of step `step`'s batch as samples.jsonl records.
    fn samples_of(&self, step: u64, b: &Batch) -> Vec<serde_json::Value> {
        let idx = self.step_prompts(step);
        (0..b.rows().min(self.cfg.run.log_samples))
            .map(|r| {
                let e = &self.task.train[idx[b.group[r]]];
                serde_json::json!({
                    "step": step + 1, "prompt": e.prompt, "response": b.texts[r],
                    "answer": e.answer, "correct": b.correct[r], "reward": b.clean[r],
                    "noisy_reward": b.noisy[r], "unparsed": b.unparsed[r],
                })
            })
            .collect()
    }

    /// The flow critic's solve settings (None without one). The return clip is the reachable
    /// range of a return: the rewards (`noise::reward_range`: debiasing widens them), widened by
    /// `noise::additive_spread` (3σ of the Gaussian, 3 scales of the Student-t noise) and, when
    /// the KL is in the reward, by β·T (a KL of at most 1 nat per token over T tokens). A wide
    /// range leaves the readout's tails free: with a slack of 1 reward the one-step samples put
    /// a quarter of their mass below 0 on the built-in task, and the CVaR error was 9x larger
    /// (docs/RESULTS.md).
    pub fn flow_solve(&self) -> Option<FlowSolve> {
        let c = self.critic.as_ref()?;
        let CriticHead::Flow { k, shape, .. } = &c.head else {
            return None;
        };
        let cc = &self.cfg.critic;
        let r = &self.cfg.reward;
        let kl_slack = if self.reference.is_some() && !self.cfg.kl_in_loss() {
            self.kl_coef * self.cfg.rollout.max_new_tokens as f64
        } else {
            0.0
        };
        let spread = super::noise::additive_spread(r) + kl_slack;
        let (lo, hi) = super::noise::reward_range(r);
        let clip = cc
            .clip_returns
            .then_some(((lo - spread) as f32, (hi + spread) as f32));
        Some(FlowSolve {
            shape: *shape,
            k: *k,
            readout_steps: cc.readout_steps as u32,
            target_steps: cc.target_steps as u32,
            solver: solver(&cc.solver),
            clip,
        })
    }

    /// The first half of RL step `self.step`: rollout, rewards, reference log-probs, token
    /// rewards, the critic readout, advantages and (DFPO) the flow critic's targets.
    pub fn prepare(&mut self) -> Result<Prepared> {
        let t0 = Instant::now();
        let batch = self.rollout(self.step)?;
        let t_roll = t0.elapsed().as_secs_f64();
        let mut p = self.prepare_batch(batch)?;
        p.t_roll = t_roll;
        Ok(p)
    }

    /// [`Trainer::prepare`] on a given rollout batch (benches feed synthetic ones).
    pub fn prepare_batch(&mut self, batch: Batch) -> Result<Prepared> {
        let step = self.step;
        let t0 = Instant::now();
        let mut m = BTreeMap::new();
        if batch.s != self.s || batch.rows() == 0 {
            return Err(Error::Shape(format!(
                "prepare_batch: {} rows of S = {}, the trainer's S is {}",
                batch.rows(),
                batch.s,
                self.s
            )));
        }
        let (rows, s) = (batch.rows(), self.s);
        let ops = self.ops.clone();
        let mask = batch.mask();
        let mask_buf = ops.batch_mask(&batch)?;
        let skip = batch.prompt_len.clone();
        let ntok: f64 = mask.iter().map(|&v| v as f64).sum();
        // The response tokens: the flow readout's and the statistics' rows.
        let tokens = ops.token_list((0..rows * s).filter(|&i| mask[i] != 0.0).collect())?;
        // The scalar metrics, read once at the end.
        let mut sc = ops.scalars()?;

        let (old_lp, old_ent) =
            response_logprobs_buf(&ops, &mut self.policy.graph, &batch.seqs, &skip)?;
        ops.sum_into(
            &mut sc,
            "entropy_sum",
            &old_ent,
            Some(&mask_buf),
            rows * s,
            1,
            0,
        )?;
        // KL against the reference policy: in the reward, or (kl.placement) in the actor loss.
        let in_loss = self.cfg.kl_in_loss();
        let (kl, ref_lp) = if let Some(r) = self.reference.as_mut() {
            let (ref_lp, _) = response_logprobs_buf(&ops, r, &batch.seqs, &skip)?;
            let kl = ops.kl_buf(&old_lp, &ref_lp, &mask_buf, self.cfg.kl_kind())?;
            ops.sum_into(&mut sc, "kl_sum", &kl, None, rows * s, 1, 0)?;
            (Some(kl), in_loss.then_some(ref_lp))
        } else {
            (None, None)
        };
        let reward_kl = if in_loss { None } else { kl.as_ref() };
        let rewards =
            ops.token_rewards(&batch, &mask_buf, reward_kl, self.kl_coef, &batch.noisy)?;

        // Critic readout and advantages.
        let k = self.critic.as_ref().map_or(1, |c| c.head.k());
        let gae = GaeParams {
            gamma: self.cfg.ppo.gamma as f32,
            lambda: self.cfg.ppo.lam as f32,
        };
        let mut values = ops.zeros(rows * s * k)?;
        let mut flow = None;
        let fs = self.flow_solve();
        if let Some(c) = self.critic.as_mut() {
            let mut out = c.forward_readout_buf(&ops, &batch.seqs)?;
            match (&c.head, &fs) {
                (CriticHead::Flow { .. }, Some(fs)) => {
                    let params = c.flow_params_buf(&ops)?;
                    let (z, sd) = ops.flow_readout_buf(fs, &params, &out, &mask_buf, &tokens)?;
                    values = z;
                    flow = Some((params, out, sd));
                }
                _ => {
                    ops.mask_select(&mut out, &mask_buf, k)?;
                    values = out;
                }
            }
        }
        let (ret, adv) = if self.cfg.algo.name == Algo::Grpo {
            let std = match self.cfg.ppo.grpo_std.as_str() {
                "population" => GrpoStd::Population,
                "none" => GrpoStd::None,
                _ => GrpoStd::Unbiased,
            };
            let a = grpo_row_advantages(&batch, &batch.noisy, std);
            (
                ops.zeros(rows * s * k)?,
                ops.rows_on_mask(&mask_buf, s, &a)?,
            )
        } else {
            let (_, ret, adv) = ops.gae_buf(&values, &rewards, &mask_buf, rows, s, k, gae)?;
            if self.cfg.ppo.whiten && ntok >= 2.0 {
                (ret, ops.whiten_buf(&adv, &mask_buf)?)
            } else {
                (ret, adv)
            }
        };
        // Value statistics of the rollout-time critic (the risk kernel's per-row statistics).
        let stats = [
            ("critic/value_mean", Stat::Mean),
            ("critic/value_std", Stat::Std),
            ("critic/cvar", Stat::CvarLow),
        ];
        if self.critic.is_some() {
            let levels = TailLevels {
                alpha: self.cfg.critic.alpha as f32,
                beta: self.cfg.critic.beta as f32,
            };
            ops.risk_stat_sums(&mut sc, &values, &tokens, k, levels, &stats)?;
        }
        let targets = match (&fs, &flow) {
            (Some(fs), Some((params, u, sd))) => {
                let cc = &self.cfg.critic;
                let o = FlowTargetOpts {
                    gamma: gae.gamma,
                    kappa: cc.kappa as f32,
                    direction: match cc.weight_direction.as_str() {
                        "up" => 1,
                        "down" => -1,
                        _ => 0,
                    },
                    anchor_lambda: cc.anchor == "lambda",
                };
                let mut rng = Stream::new(self.cfg.run.seed, step, "tau");
                let mut t = ops.flow_targets_buf(
                    fs, params, u, &values, sd, &ret, &rewards, &mask_buf, &tokens, s, &o, &mut rng,
                )?;
                if cc.risk_targets == "prompt" {
                    ops.pool_first_buf(&batch, &mut t[FLOW_TARGET_FIELD], fs.k)?;
                }
                Some(t)
            }
            _ => None,
        };
        // The prepare phase's one read of its scalars.
        let scalars: BTreeMap<String, f64> = ops.read_scalars(&sc)?.into_iter().collect();
        if self.critic.is_some() {
            let d = ntok.max(1.0);
            for (name, _) in stats {
                m.insert(name.into(), scalars[name] / d);
            }
        }
        let t_prep = t0.elapsed().as_secs_f64();

        Ok(Prepared {
            batch,
            mask,
            mask_buf,
            skip,
            ntok,
            old_lp,
            old_ent,
            kl_sum: kl.as_ref().map(|_| scalars["kl_sum"]),
            kl,
            ref_lp,
            values,
            ret,
            adv,
            k,
            targets,
            metrics: m,
            entropy_sum: scalars["entropy_sum"],
            t_roll: 0.0,
            t_prep,
        })
    }

    /// One actor update and one critic update on the minibatch of rollout rows `sel`
    /// (metrics accumulated into `acc`); returns how many updates were skipped as non-finite.
    /// The loss inputs are written into the graphs from the step buffers where they are (on
    /// CUDA a device gather per input: only the row lists go up).
    pub fn update_minibatch(
        &mut self,
        p: &Prepared,
        sel: &[usize],
        acc: &mut BTreeMap<String, (f64, f64)>,
    ) -> Result<f64> {
        // Messages number steps from 1, as metrics.jsonl does.
        let (step, s) = (self.step + 1, self.s);
        let ops = self.ops.clone();
        let add = |acc: &mut BTreeMap<String, (f64, f64)>, k: &str, v: f64| {
            let e = acc.entry(k.to_string()).or_insert((0.0, 0.0));
            e.0 += v;
            e.1 += 1.0;
        };
        let skip_nonfinite = self.cfg.run.on_nonfinite == "skip";
        let seq_mean = self.cfg.ppo.agg == "seq-mean";
        let mut skipped = 0.0;
        let seqs: Vec<Vec<u32>> = sel.iter().map(|&r| p.batch.seqs[r].clone()).collect();
        let sk: Vec<usize> = sel.iter().map(|&r| p.skip[r]).collect();
        let denom = weight_denoms(&p.mask, sel, s, seq_mean);
        let micro = self.micro_batches(sel.len());
        // Graph row j of micro-batch r reads rollout row sel[r.start + j] (None: padding).
        let pick = |r: &std::ops::Range<usize>, b: usize| -> Vec<Option<usize>> {
            let mut v: Vec<Option<usize>> = sel[r.clone()].iter().map(|&x| Some(x)).collect();
            v.resize(b, None);
            v
        };
        let padded = |v: &[f32], r: &std::ops::Range<usize>, b: usize| -> Vec<f32> {
            let mut o = v[r.clone()].to_vec();
            o.resize(b, 0.0);
            o
        };
        let (pb, _) = self.policy.graph.shape();
        let pin = self.policy.inputs();
        let mut st = ActorStats::default();
        // More than one micro-batch: their gradients are summed on the host and written back
        // into the graph, where the optimizer reads them (a download and an upload per
        // micro-batch on CUDA: no device-side accumulation yet).
        let mut g = Vec::new();
        for r in &micro {
            let rows = pick(r, pb);
            let sess = self.policy.graph.session_mut();
            ops.write_rows(sess, pin.old_lp, &p.old_lp, &rows, s)?;
            ops.write_rows(sess, pin.adv, &p.adv, &rows, s)?;
            ops.write_token_weights(
                sess,
                pin.tok_w,
                &p.mask_buf,
                &rows,
                s,
                &padded(&denom, r, pb),
            )?;
            match (pin.kl, &p.ref_lp) {
                (Some((rt, ct)), Some(ref_lp)) => {
                    ops.write_rows(sess, rt, ref_lp, &rows, s)?;
                    sess.write(ct, &[self.kl_coef as f32])?;
                }
                (None, None) => {}
                (have, _) => {
                    return Err(Error::Invalid(format!(
                    "policy update: the actor loss {} a KL term, the step {} reference log-probs",
                    if have.is_some() { "has" } else { "has no" },
                    if have.is_some() { "has no" } else { "has" }
                )))
                }
            }
            let mst = self
                .policy
                .update_written(&seqs[r.clone()], &sk[r.clone()])?;
            // The weights are the minibatch's: losses, statistics and gradients add.
            st.loss += mst.loss;
            st.pg_loss += mst.pg_loss;
            st.clipfrac += mst.clipfrac;
            st.ppo_kl += mst.ppo_kl;
            st.entropy += mst.entropy;
            st.kl_loss += mst.kl_loss;
            if micro.len() > 1 {
                accumulate(&mut g, self.policy.grads()?);
            }
        }
        if micro.len() > 1 {
            self.policy.set_grads(&g)?;
        }
        let stop = |msg: String| -> Result<()> {
            if !skip_nonfinite {
                return Err(Error::Invalid(format!(
                    "{msg}; stopping (run.on_nonfinite = \"stop\")"
                )));
            }
            eprintln!("dfpo-train: warning: {msg}; update skipped");
            Ok(())
        };
        if !st.loss.is_finite() {
            stop(format!(
                "step {step}: the actor loss (actor/pg_loss) is {}",
                st.loss
            ))?;
            skipped += 1.0;
        } else {
            let o = self.policy.step()?;
            if !o.applied {
                stop(format!(
                    "step {step}: the actor gradient norm is {}",
                    o.grad_norm
                ))?;
                skipped += 1.0;
            }
            add(acc, "actor/grad_norm", o.grad_norm);
            add(acc, "actor/lr", o.lr);
        }
        add(acc, "actor/pg_loss", st.pg_loss);
        add(acc, "actor/clipfrac", st.clipfrac);
        add(acc, "actor/ppo_kl", st.ppo_kl);
        add(acc, "actor/entropy", st.entropy);
        if p.ref_lp.is_some() {
            add(acc, "actor/kl_loss", st.kl_loss);
        }
        // The critic's token weights are token means over the minibatch.
        let cdenom = weight_denoms(&p.mask, sel, s, false);
        // The flow head: the minibatch's response tokens (graph row r·S + t, rollout token
        // sel[r]·S + t) and, with critic.risk_targets = "prompt", its first-token count.
        let flow_tokens = |r: &std::ops::Range<usize>| -> Vec<usize> {
            sel[r.clone()]
                .iter()
                .flat_map(|&row| (row * s..(row + 1) * s).filter(|&i| p.mask[i] != 0.0))
                .collect()
        };
        let all = flow_tokens(&(0..sel.len()));
        let first_count = (self.cfg.critic.risk_targets == "prompt").then(|| {
            all.iter()
                .filter(|&&g| g % s + 1 == p.skip[g / s])
                .count()
                .max(1) as f32
        });
        let total: f32 = gather(&p.mask, sel, s).iter().sum();
        let Some(c) = self.critic.as_mut() else {
            return Ok(skipped);
        };
        let (cb, _) = c.graph.shape();
        let cin: Vec<crate::graph::TensorId> = c.inputs().to_vec();
        let head = c.head.clone();
        let kk = p.k;
        let (mut cst, mut g) = (None::<CriticStats>, Vec::new());
        for r in &micro {
            let rows = pick(r, cb);
            let sess = c.graph.session_mut();
            match &head {
                CriticHead::Value { .. } => {
                    ops.write_rows(sess, cin[0], &p.ret, &rows, s)?;
                    ops.write_rows(sess, cin[1], &p.values, &rows, s)?;
                    ops.write_token_weights(
                        sess,
                        cin[2],
                        &p.mask_buf,
                        &rows,
                        s,
                        &padded(&cdenom, r, cb),
                    )?;
                }
                CriticHead::Quantile { .. } => {
                    ops.write_rows(sess, cin[0], &p.ret, &rows, s * kk)?;
                    ops.write_token_weights(
                        sess,
                        cin[1],
                        &p.mask_buf,
                        &rows,
                        s,
                        &padded(&cdenom, r, cb),
                    )?;
                }
                CriticHead::Flow { .. } => {
                    let t = p.targets.as_ref().expect("flow targets");
                    let mut rowpos = vec![-1i32; p.batch.rows()];
                    for (j, &row) in sel[r.clone()].iter().enumerate() {
                        rowpos[row] = j as i32;
                    }
                    let global = flow_tokens(r);
                    let mb = FlowMicro {
                        global: &global,
                        rowpos: &rowpos,
                        total,
                        first_count,
                        plen: &p.skip,
                        s,
                    };
                    ops.write_flow_inputs(sess, &cin, t, &mb, kk)?;
                }
            }
            let mst = c.update_written(&seqs[r.clone()])?;
            match &mut cst {
                None => cst = Some(mst),
                Some(a) => {
                    a.loss += mst.loss;
                    for ((_, v), (_, mv)) in a.terms.iter_mut().zip(&mst.terms) {
                        *v += mv;
                    }
                }
            }
            if micro.len() > 1 {
                accumulate(&mut g, c.grads()?);
            }
        }
        if micro.len() > 1 {
            c.set_grads(&g)?;
        }
        let cst = cst.expect("a minibatch has at least one micro-batch");
        let finite = cst.loss.is_finite();
        let o = if finite { Some(c.step()?) } else { None };
        if !finite || !o.is_some_and(|o| o.applied) {
            let bad = cst
                .terms
                .iter()
                .find(|(_, v)| !v.is_finite())
                .map_or("critic/grad_norm".to_string(), |(n, _)| {
                    format!("critic/{n}")
                });
            stop(format!(
                "step {step}: the critic loss or gradient is not finite (first bad term: {bad})"
            ))?;
            skipped += 1.0;
        }
        if let Some(o) = o {
            add(acc, "critic/grad_norm", o.grad_norm);
        }
        add(acc, "critic/loss", cst.loss);
        for (n, v) in &cst.terms {
            add(acc, &format!("critic/{n}"), *v);
        }
        Ok(skipped)
    }

    /// The micro-batches (ranges of positions) of a minibatch of `rows` rows.
    fn micro_batches(&self, rows: usize) -> Vec<std::ops::Range<usize>> {
        let m = match self.cfg.ppo.micro_batch_size {
            0 => rows.max(1),
            m => m,
        };
        (0..rows).step_by(m).map(|a| a..(a + m).min(rows)).collect()
    }

    /// One RL step (prepare, then PPO epochs × minibatches); returns its metrics.
    pub fn train_step(&mut self) -> Result<BTreeMap<String, f64>> {
        let t0 = Instant::now();
        let traffic0 = self.device.traffic();
        let gen0 = self.generation_traffic().unwrap_or_default();
        let p = self.prepare()?;
        let step = self.step;
        let rows = p.batch.rows();
        let bsz = rows / self.cfg.ppo.minibatches;
        let mut acc: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut skipped = 0.0;
        for epoch in 0..self.cfg.ppo.epochs {
            let order = Stream::new(self.cfg.run.seed, step, &format!("minibatch{epoch}"))
                .permutation(rows);
            for j in 0..self.cfg.ppo.minibatches {
                skipped += self.update_minibatch(&p, &order[j * bsz..(j + 1) * bsz], &mut acc)?;
            }
        }
        // Generation on the host: its weights follow the (device) optimizer once a step. Device
        // generation reads the graph's weights: the host copy is refreshed where it is read.
        if self.device_gen.is_none() {
            self.policy.sync_host()?;
        }
        let traffic1 = self.device.traffic();
        let gen1 = self.generation_traffic().unwrap_or_default();
        let (batch, ntok) = (&p.batch, p.ntok);
        let mut m = p.metrics.clone();
        for (k, (s, c)) in acc {
            m.insert(k, s / c);
        }
        let t_total = t0.elapsed().as_secs_f64();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        m.insert("reward/noisy_mean".into(), mean(&batch.noisy));
        m.insert("reward/clean_mean".into(), mean(&batch.clean));
        let unparsed: Vec<f64> = batch.unparsed.iter().map(|&u| f64::from(u)).collect();
        m.insert("reward/unparsed_frac".into(), mean(&unparsed));
        m.insert(
            "response_length/mean".into(),
            mean(
                &batch
                    .response_len
                    .iter()
                    .map(|&l| l as f64)
                    .collect::<Vec<_>>(),
            ),
        );
        m.insert("rollout/entropy".into(), p.entropy_sum / ntok.max(1.0));
        if let Some(sum) = p.kl_sum {
            // Per token (the usual log), and per sequence: summed over the response, averaged
            // over the batch, the unit of the adaptive controller's target (TRL's).
            let seq_kl = sum / rows as f64;
            m.insert("actor/ref_kl".into(), sum / ntok.max(1.0));
            m.insert("actor/ref_kl_seq".into(), seq_kl);
            m.insert("actor/kl_coef".into(), self.kl_coef);
            if self.cfg.kl.adaptive {
                // Ziegler et al.: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).
                let err = (seq_kl / self.cfg.kl.target - 1.0).clamp(-0.2, 0.2);
                self.kl_coef *= 1.0 + err * rows as f64 / self.cfg.kl.horizon;
            }
        }
        m.insert("update/skipped".into(), skipped);
        m.insert("timing/rollout_s".into(), p.t_roll);
        m.insert("timing/prep_s".into(), p.t_prep);
        m.insert("timing/update_s".into(), t_total - p.t_roll - p.t_prep);
        m.insert("timing/step_s".into(), t_total);
        let toks: f64 = batch.seqs.iter().map(|q| q.len() as f64).sum();
        m.insert("perf/tokens_per_s".into(), toks / t_total.max(1e-9));
        // Host <-> device bytes of this step (0 on the CPU device), see docs/PERF.md.
        // Device generation counts its own copies (prompts up, token ids down): the rollout's
        // share, included in the totals.
        let (gh, gd) = (
            (gen1.h2d_bytes - gen0.h2d_bytes) as f64,
            (gen1.d2h_bytes - gen0.d2h_bytes) as f64,
        );
        m.insert("perf/rollout_h2d_bytes".into(), gh);
        m.insert("perf/rollout_d2h_bytes".into(), gd);
        m.insert(
            "perf/h2d_bytes".into(),
            (traffic1.0 - traffic0.0) as f64 + gh,
        );
        m.insert(
            "perf/d2h_bytes".into(),
            (traffic1.1 - traffic0.1) as f64 + gd,
        );
        self.last_samples = self.samples_of(step, &p.batch);
        self.step += 1;
        Ok(m)
    }

    // ---- checkpoints ------------------------------------------------------------------------

    fn ckpt_root(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// Writes the full state to `checkpoints/step-NNNNNN` (a temporary folder renamed into
    /// place, so a crash never leaves a half-written checkpoint) and keeps the newest N.
    pub fn save_checkpoint(&self, seconds: f64) -> Result<PathBuf> {
        let root = self.ckpt_root();
        std::fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let name = format!("step-{:06}", self.step);
        let dst = root.join(&name);
        let tmp = run_dir::staging_dir(&root, &name);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut state: TensorMap = BTreeMap::new();
        let mut put = |st: BTreeMap<String, Vec<f32>>| {
            for (k, v) in st {
                let shape = vec![v.len()];
                state.insert(k, Tensor { shape, data: v });
            }
        };
        put(self.policy.opt.state("policy.")?);
        if let Some(c) = &self.critic {
            put(c.opt.state("critic.")?);
        }
        save_safetensors(tmp.join("state.safetensors"), &state, Dtype::F32)?;
        let meta = Meta {
            step: self.step,
            kl_coef: self.kl_coef,
            data_position: self.step * self.cfg.rollout.prompts_per_step as u64,
            seed: self.cfg.run.seed,
            algo: self.cfg.algo.name.as_str().into(),
            policy_opt_step: self.policy.opt.steps(),
            critic_opt_step: self.critic.as_ref().map_or(0, |c| c.opt.steps()),
            seconds,
            before: self.before.clone(),
            fingerprint: self.fingerprint.clone(),
        };
        let js = serde_json::to_string_pretty(&meta)
            .map_err(|e| Error::Invalid(format!("meta.json: {e}")))?;
        write_atomic(tmp.join("meta.json"), |w| w.write_all(js.as_bytes()))?;
        let toml = self.cfg.to_toml();
        write_atomic(tmp.join("config.toml"), |w| w.write_all(toml.as_bytes()))?;
        run_dir::publish_dir(&tmp, &dst)?;
        run_dir::prune_checkpoints(&root, self.cfg.run.keep_checkpoints)?;
        Ok(dst)
    }

    /// Restores the newest checkpoint, if any; returns its step.
    pub fn resume(&mut self) -> Result<Option<u64>> {
        let all = list_checkpoints(&self.ckpt_root())?;
        let Some((_, dir)) = all.last() else {
            return Ok(None);
        };
        self.load_checkpoint(dir).map(Some)
    }

    /// Restores the checkpoint folder `dir` (written by this configuration); returns its step.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<u64> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| io_err(&meta_path, e))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: fmt_path(&meta_path),
            msg: e.to_string(),
        })?;
        if meta.algo != self.cfg.algo.name.as_str() {
            return Err(Error::Format {
                path: fmt_path(&meta_path),
                msg: format!(
                    "checkpoint was written by algo \"{}\", this run is \"{}\"",
                    meta.algo,
                    self.cfg.algo.name.as_str()
                ),
            });
        }
        let sp = dir.join("state.safetensors");
        let st: BTreeMap<String, Vec<f32>> = read_safetensors(&sp)?
            .into_iter()
            .map(|(k, t)| (k, t.data))
            .collect();
        let src = fmt_path(&sp);
        self.policy
            .opt
            .load_state("policy.", &st, meta.policy_opt_step, &src)?;
        self.policy.sync()?;
        if let Some(c) = self.critic.as_mut() {
            c.opt
                .load_state("critic.", &st, meta.critic_opt_step, &src)?;
            c.sync()?;
        }
        self.step = meta.step;
        self.kl_coef = meta.kl_coef;
        self.before = meta.before;
        self.seconds_before = meta.seconds;
        Ok(meta.step)
    }

    /// The tokenizer files of the policy folder (copied into exports).
    pub fn tokenizer_files(&self) -> &[PathBuf] {
        &self.tok_files
    }

    /// After SIGINT/SIGTERM (with the current step's checkpoint written): the error that ends
    /// the run.
    fn stop_if_interrupted(&self) -> Result<()> {
        let Some(signal) = super::interrupt::requested() else {
            return Ok(());
        };
        Err(Error::Interrupted {
            signal,
            msg: format!(
                "{} received: stopped after step {} of {} with its checkpoint in {}; run the \
                 same command again to continue (run.resume = auto)",
                super::interrupt::name(signal),
                self.step,
                self.cfg.run.steps,
                fmt_path(&self.ckpt_root())
            ),
        })
    }

    /// Evaluates the current policy as the run's "before" numbers (logged).
    fn eval_before(&self) -> Result<BTreeMap<String, EvalEntry>> {
        let ev = self.evaluate()?;
        for e in &ev {
            eprintln!(
                "dfpo-train: before: {} accuracy {:.3} (unparsed {:.3}, n {})",
                e.name, e.accuracy, e.unparsed, e.n
            );
        }
        // The first eval: a checker that cannot read the model's answers stops the run here.
        for note in check_unparsed(&ev, self.cfg.data.max_unparsed)? {
            eprintln!("dfpo-train: warning: before training: {note}");
        }
        Ok(ev
            .iter()
            .map(|e| (e.name.clone(), EvalEntry::from(e)))
            .collect())
    }

    /// Exports the policy as an HF folder (f32 safetensors + config + tokenizer files).
    pub fn export(&self, dir: &Path) -> Result<()> {
        let tensors = tensor_map(&self.policy.dec, &self.policy.opt)?;
        let files: Vec<&Path> = self.tok_files.iter().map(|p| p.as_path()).collect();
        let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        save_hf_folder(&tmp, &self.policy.dec.config, &tensors, Dtype::F32, &files)?;
        run_dir::publish_dir(&tmp, dir)
    }

    /// The whole run: (resume,) eval before, the RL steps, eval after, export, summary.
    pub fn run(&mut self) -> Result<Summary> {
        let t0 = Instant::now();
        let fp = Fingerprint::of(&self.cfg)?;
        // Held until the run returns: the folder's lock.
        let folder = run_dir::open(&self.cfg, &fp)?;
        for n in &folder.notes {
            eprintln!("dfpo-train: {n}");
        }
        self.fingerprint = Some(fp);
        let toml = self.cfg.to_toml();
        let cfg_path = self.out.join("config.toml");
        write_atomic(&cfg_path, |w| w.write_all(toml.as_bytes()))?;
        eprintln!("dfpo-train: configuration saved to {}", fmt_path(&cfg_path));
        eprintln!(
            "dfpo-train: {} on {}, policy {} ({} params), {} train prompts, eval splits: {}",
            self.cfg.algo.name.as_str(),
            self.device.describe(),
            self.cfg.model.policy,
            self.policy.opt.total_len(),
            self.train_ids.len(),
            self.task
                .evals
                .iter()
                .map(|(n, e)| format!("{n} ({})", e.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        // The graph planner's memory per model (issue 11 item 5): one arena of activations and
        // gradients, one persistent buffer of parameters and inputs.
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let mut plans = vec![("policy", self.policy.graph.session().plan())];
        if let Some(c) = &self.critic {
            plans.push(("critic", c.graph.session().plan()));
        }
        if let Some(r) = &self.reference {
            plans.push(("reference", r.session().plan()));
        }
        let mem: Vec<String> = plans
            .iter()
            .map(|(n, p)| {
                format!(
                    "{n} arena {:.1} MiB + parameters/inputs {:.1} MiB",
                    mib(p.arena_bytes()),
                    mib(p.persistent_bytes())
                )
            })
            .collect();
        eprintln!("dfpo-train: planned memory: {}", mem.join("; "));
        let resumed = match folder.start {
            Start::Resume { eval_changed, .. } => {
                // New eval settings: "before" is measured again on the initial policy.
                let before = if eval_changed {
                    Some(self.eval_before()?)
                } else {
                    None
                };
                let s = self.resume()?;
                if let Some(b) = before {
                    self.before = b;
                }
                s
            }
            Start::Fresh => None,
        };
        if let Some(s) = resumed {
            eprintln!("dfpo-train: resumed from step {s}");
            if s >= self.cfg.run.steps as u64 {
                eprintln!(
                    "dfpo-train: {} holds this configuration's finished run (step {s} of {}): \
                     evaluating it again; for a new run choose another run.out_dir or set \
                     run.overwrite=true",
                    fmt_path(&self.out),
                    self.cfg.run.steps
                );
            }
        } else {
            self.before = self.eval_before()?;
        }
        if let Some(signal) = super::interrupt::requested() {
            return Err(Error::Interrupted {
                signal,
                msg: format!(
                    "{} received before the first step: nothing to save",
                    super::interrupt::name(signal)
                ),
            });
        }
        let mut metrics = MetricsWriter::create(&self.out.join("metrics.jsonl"), resumed)?;
        let mut samples = if self.cfg.run.log_samples > 0 {
            Some(MetricsWriter::create_records(
                &self.out.join("samples.jsonl"),
                resumed,
            )?)
        } else {
            None
        };
        let total = self.cfg.run.steps as u64;
        let mut bar = Progress::new(total, self.cfg.run.progress);
        let mut last_saved = self.step;
        let mut warned_unparsed = false;
        while self.step < total {
            let mut m = self.train_step()?;
            let unparsed = m.get("reward/unparsed_frac").copied().unwrap_or(0.0);
            if unparsed > self.cfg.data.max_unparsed && !warned_unparsed {
                warned_unparsed = true;
                eprintln!(
                    "dfpo-train: warning: step {}: the checker found no answer in {:.0}% of the \
                     responses (reward/unparsed_frac; above data.max_unparsed = {}): their \
                     reward is the incorrect one",
                    self.step,
                    100.0 * unparsed,
                    self.cfg.data.max_unparsed
                );
            }
            let ev_every = self.cfg.run.eval_every as u64;
            if ev_every > 0 && self.step.is_multiple_of(ev_every) && self.step < total {
                for e in self.evaluate()? {
                    m.insert(format!("eval/{}/accuracy", e.name), e.accuracy);
                }
            }
            metrics.write(self.step, &m)?;
            if let Some(w) = samples.as_mut() {
                for rec in &self.last_samples {
                    w.write_record(rec)?;
                }
            }
            let shown: Vec<(&str, f64)> = [
                ("reward", "reward/clean_mean"),
                ("noisy", "reward/noisy_mean"),
                ("pg", "actor/pg_loss"),
                ("critic", "critic/loss"),
            ]
            .iter()
            .filter_map(|(l, k)| m.get(*k).map(|v| (*l, *v)))
            .collect();
            bar.update(self.step, &shown);
            let se = self.cfg.run.save_every as u64;
            if se > 0 && self.step.is_multiple_of(se) {
                self.save_checkpoint(self.seconds_before + t0.elapsed().as_secs_f64())?;
                last_saved = self.step;
            }
            if self.interrupt_after == Some(self.step) {
                return Err(Error::Invalid(format!(
                    "interrupted after step {} (test hook)",
                    self.step
                )));
            }
            if super::interrupt::requested().is_some() {
                break;
            }
        }
        bar.finish();
        if last_saved != self.step || list_checkpoints(&self.ckpt_root())?.is_empty() {
            self.save_checkpoint(self.seconds_before + t0.elapsed().as_secs_f64())?;
        }
        self.stop_if_interrupted()?;
        let after_ev = self.evaluate()?;
        // The calibration generates on the host: its copy of the weights follows the device's.
        self.policy.sync_host()?;
        if let Some(c) = critic_calibration(self)? {
            let js = serde_json::to_string_pretty(&c).map_err(|e| Error::Invalid(e.to_string()))?;
            write_atomic(self.out.join("critic_calibration.json"), |w| {
                w.write_all(js.as_bytes())
            })?;
            eprintln!("{}", calibration_table(&c));
        }
        let after: BTreeMap<String, EvalEntry> = after_ev
            .iter()
            .map(|e| (e.name.clone(), EvalEntry::from(e)))
            .collect();
        let final_dir = self.out.join("final");
        self.export(&final_dir)?;
        let summary = Summary {
            algo: self.cfg.algo.name.as_str().into(),
            seed: self.cfg.run.seed,
            flip_prob: self.cfg.reward.flip_prob,
            steps: self.step,
            seconds: self.seconds_before + t0.elapsed().as_secs_f64(),
            before: self.before.clone(),
            after,
        };
        let js =
            serde_json::to_string_pretty(&summary).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(self.out.join("summary.json"), |w| {
            w.write_all(js.as_bytes())
        })?;
        eprintln!(
            "dfpo-train: final policy exported to {}",
            fmt_path(&final_dir)
        );
        Ok(summary)
    }
}

pub use super::run_dir::list_checkpoints;

/// Encodes the task's prompts and applies data.max_prompt_length / data.truncation to the
/// training and eval prompts (dropped eval prompts leave their split); returns the training
/// prompts' ids and the limit.
fn fit_task_prompts(
    task: &mut TaskData,
    tok: &Tokenizer,
    cfg: &TrainConfig,
    dec: &Decoder,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let d = &cfg.data;
    let room = dec
        .config
        .max_position_embeddings
        .saturating_sub(cfg.rollout.max_new_tokens);
    let limit = if d.max_prompt_length > 0 {
        d.max_prompt_length.min(room)
    } else {
        room
    };
    let encode = |ex: &[crate::task::Example]| {
        ex.iter()
            .map(|e| encode_prompt(tok, &e.prompt, d.chat_template))
            .collect::<Result<Vec<_>>>()
    };
    let fit = |name: &str, ex: Vec<crate::task::Example>| {
        let ids = encode(&ex)?;
        let (ids, ex, changed) = crate::task::fit_prompts(ids, ex, limit, &d.truncation, name)?;
        if changed > 0 {
            let what = if d.truncation == "drop" {
                "dropped"
            } else {
                "truncated"
            };
            eprintln!(
                "dfpo-train: data: {what} {changed} {name} prompts longer than {limit} tokens \
                 (data.truncation = {})",
                d.truncation
            );
        }
        Ok::<_, Error>((ids, ex))
    };
    let (ids, train) = fit("train", std::mem::take(&mut task.train))?;
    task.train = train;
    for (name, ex) in task.evals.iter_mut() {
        let (_, kept) = fit(name, std::mem::take(ex))?;
        if kept.is_empty() {
            return Err(Error::Invalid(format!(
                "eval split {name}: every prompt is longer than {limit} tokens"
            )));
        }
        *ex = kept;
    }
    Ok((ids, limit))
}

/// The before/after table printed at the end of a run.
pub fn summary_table(s: &Summary) -> String {
    let mut t = format!(
        "\n{} | {} steps | reward flip {} | seed {} | {:.0} s\n{:<16} {:>8} {:>8} {:>8}\n",
        s.algo, s.steps, s.flip_prob, s.seed, s.seconds, "split", "before", "after", "change"
    );
    for (name, a) in &s.after {
        let b = s.before.get(name).map_or(f64::NAN, |e| e.accuracy);
        t.push_str(&format!(
            "{:<16} {:>7.1}% {:>7.1}% {:>+7.1}\n",
            name,
            100.0 * b,
            100.0 * a.accuracy,
            100.0 * (a.accuracy - b)
        ));
    }
    t
}

/// `dfpo-train train`: load, run, report.
pub fn run(cfg: TrainConfig) -> Result<Summary> {
    let mut t = Trainer::new(cfg)?;
    t.run()
}

/// Adds the gradients `g` of one micro-batch into `acc` (empty: takes them).
fn accumulate(acc: &mut Vec<Vec<f32>>, g: Vec<Vec<f32>>) {
    if acc.is_empty() {
        *acc = g;
        return;
    }
    for (a, g) in acc.iter_mut().zip(g) {
        for (x, y) in a.iter_mut().zip(g) {
            *x += y;
        }
    }
}

/// Token-weight denominators of the minibatch rows `sel` ([`token_weights`]' arithmetic on the
/// minibatch's mask: the token count for the token mean, each row's length × the number of
/// rows with tokens for the sequence mean; 0 where a row gets no weight).
fn weight_denoms(mask: &[f32], sel: &[usize], s: usize, seq_mean: bool) -> Vec<f32> {
    let mm = gather(mask, sel, s);
    let total: f32 = mm.iter().sum();
    if total == 0.0 {
        return vec![0.0; sel.len()];
    }
    if !seq_mean {
        return vec![total; sel.len()];
    }
    let lens: Vec<f32> = (0..sel.len())
        .map(|r| mm[r * s..(r + 1) * s].iter().sum())
        .collect();
    let nonempty = lens.iter().filter(|&&l| l > 0.0).count() as f32;
    lens.iter()
        .map(|&l| if l > 0.0 { l * nonempty } else { 0.0 })
        .collect()
}
