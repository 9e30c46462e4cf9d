//! The RL loop: each step runs the stages of [`super::stages`] in order (rollout → rewards, noisy
//! for training and clean for metrics → reference log-probs and KL → token rewards, critic
//! readout, (distributional) GAE, whitened advantages and critic targets → PPO epochs ×
//! minibatches of actor and critic updates); evaluation before and after, metrics, atomic
//! checkpoints with resume, and the final HF export.
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
use super::eval::{check_unparsed, evaluate_with, stop_ids, EvalOpts, EvalResult};
use super::heads::{FlowTermWeights, RiskTerms};
use super::metrics::{MetricsWriter, Progress};
use super::models::{tensor_map, Critic, CriticHead, OptSettings, Policy};
use super::optim::Schedule;
use super::rollout::{Batch, FlowSolve, Stream};
use super::run_dir::{self, Fingerprint, Start};
use super::stages::advantages::AdvantageOpts;
use super::stages::rollout::{step_prompts, Generator};
use super::stages::update::UpdateOpts;
use super::stages::{self, StepRows};
use super::step_ops::StepOps;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::kernels::adamw::AdamWParams;
use crate::kernels::flow::{FlowHeadShape, IntegrateOpts, Solver};
use crate::kernels::risk::{RiskLossWeights, TailLevels};
use crate::model::checkpoint::{
    read_safetensors, save_hf_folder, save_safetensors, write_atomic, Dtype, Tensor, TensorMap,
};
use crate::model::decoder::{Decoder, DecoderGraph};
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

pub use super::stages::Prepared;

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

    /// Where rollouts and evals generate: on CUDA on the device from the policy graph's live
    /// weights ([`crate::model::generate_cuda`]), else on the CPU from the host copy.
    fn generator(&self) -> Generator<'_> {
        Generator {
            policy: &self.policy,
            device: self.device_gen.as_ref(),
            prompt_room: self.s - self.cfg.rollout.max_new_tokens,
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
                    &mut |ps, gp| self.generator().generate(ps, gp),
                )
            })
            .collect()
    }

    /// The rollout batch of step `step`: stages 1 and 2 ([`stages::rollout`], [`stages::rewards`]).
    pub fn rollout(&self, step: u64) -> Result<Batch> {
        let seed = self.cfg.run.seed;
        let gen = stages::rollout::rollout(
            &self.generator(),
            &self.cfg.rollout,
            &self.tok,
            &self.stop,
            &self.train_ids,
            self.s,
            seed,
            step,
        )?;
        let cmd = self.reward_cmd.as_ref();
        stages::rewards::score(gen, &self.task, &self.cfg.reward, cmd, seed, step)
    }

    /// The first `run.log_samples` rows of step `step`'s batch as samples.jsonl records.
    fn samples_of(&self, step: u64, b: &Batch) -> Vec<serde_json::Value> {
        let n = self.train_ids.len();
        let idx = step_prompts(
            n,
            self.cfg.rollout.prompts_per_step,
            self.cfg.run.seed,
            step,
        );
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

    /// The first half of RL step `self.step`: stages 1 to 4 (rollout, rewards, reference,
    /// advantages and critic targets).
    pub fn prepare(&mut self) -> Result<Prepared> {
        let t0 = Instant::now();
        let batch = self.rollout(self.step)?;
        let t_roll = t0.elapsed().as_secs_f64();
        let mut p = self.prepare_batch(batch)?;
        p.t_roll = t_roll;
        Ok(p)
    }

    /// Stages 3 and 4 ([`stages::reference`], [`stages::advantages`]) on a given rollout batch
    /// (benches feed synthetic ones).
    pub fn prepare_batch(&mut self, batch: Batch) -> Result<Prepared> {
        let t0 = Instant::now();
        let ops = &self.ops;
        let rows = StepRows::new(ops, batch, self.s)?;
        // The scalar metrics, read once at the end.
        let mut sc = ops.scalars()?;
        let lp = stages::reference::log_probs(
            ops,
            &rows,
            &mut self.policy.graph,
            self.reference.as_mut(),
            self.cfg.kl_kind(),
            self.cfg.kl_in_loss(),
            &mut sc,
        )?;
        let fs = self.flow_solve();
        let opts = AdvantageOpts::new(&self.cfg, self.kl_coef, self.step);
        let critic = self.critic.as_mut();
        let adv =
            stages::advantages::estimate(ops, &rows, &lp, critic, fs.as_ref(), &opts, &mut sc)?;
        let scalars: BTreeMap<String, f64> = ops.read_scalars(&sc)?.into_iter().collect();
        let metrics = adv.value_metrics(&scalars, rows.ntok);
        let t_prep = t0.elapsed().as_secs_f64();
        Ok(Prepared {
            batch: rows.batch,
            mask: rows.mask,
            mask_buf: rows.mask_buf,
            skip: rows.skip,
            seqs: rows.seqs,
            tokens: rows.tokens,
            ntok: rows.ntok,
            old_lp: lp.old_lp,
            old_ent: lp.old_ent,
            kl_sum: lp.kl.as_ref().map(|_| scalars["kl_sum"]),
            kl: lp.kl,
            ref_lp: lp.ref_lp,
            values: adv.values,
            ret: adv.ret,
            adv: adv.adv,
            k: adv.k,
            targets: adv.targets,
            metrics,
            entropy_sum: scalars["entropy_sum"],
            t_roll: 0.0,
            t_prep,
        })
    }

    /// What the update stage reads of the configuration at this step.
    fn update_opts(&self) -> UpdateOpts {
        UpdateOpts::new(&self.cfg, self.s, self.kl_coef, self.step)
    }

    /// One actor update and one critic update on the minibatch of rollout rows `sel`
    /// ([`stages::update::minibatch`]; metrics accumulated into `acc`); returns how many
    /// updates were skipped as non-finite.
    pub fn update_minibatch(
        &mut self,
        p: &Prepared,
        sel: &[usize],
        acc: &mut BTreeMap<String, (f64, f64)>,
    ) -> Result<f64> {
        let o = self.update_opts();
        let (policy, critic) = (&mut self.policy, self.critic.as_mut());
        stages::update::minibatch(&self.ops, policy, critic, p, sel, acc, &o)
    }

    /// One RL step: the stages in order ([`stages`]: prepare, then the updates); returns its
    /// metrics.
    pub fn train_step(&mut self) -> Result<BTreeMap<String, f64>> {
        let t0 = Instant::now();
        let traffic0 = self.device.traffic();
        let gen0 = self.generation_traffic().unwrap_or_default();
        let p = self.prepare()?;
        let step = self.step;
        let rows = p.batch.rows();
        let o = self.update_opts();
        let critic = self.critic.as_mut();
        let (acc, skipped) = stages::update::epochs(&self.ops, &mut self.policy, critic, &p, &o)?;
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
