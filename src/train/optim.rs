//! AdamW over named fp32 master weights, with a warmup + cosine/constant learning-rate schedule
//! and global gradient-norm clipping (the CPU reference of `kernels/adamw.cu`, bit for bit).
//!
//! The optimizer owns the master weights; after [`AdamW::step`] the caller writes them back into
//! its graph (bf16 on CUDA, f32 on the CPU). A step whose gradient norm is not finite changes
//! nothing and says so ([`StepOutcome::applied`] = false), so the caller can skip or stop.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::{check_len, Error, Result};
use crate::kernels::adamw::{self, AdamWParams};

/// Learning rate over optimizer steps: linear warmup from 0 to `peak` over `warmup` steps, then
/// constant or cosine down to `peak · min_ratio` at `total`.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub cosine: bool,
    pub min_ratio: f64,
}

impl Schedule {
    /// The rate of (1-based) optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if self.warmup > 0 && step <= self.warmup {
            return self.peak * step as f64 / self.warmup as f64;
        }
        if !self.cosine || self.total <= self.warmup {
            return self.peak;
        }
        let span = (self.total - self.warmup) as f64;
        let done = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * done).cos())
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping (NaN/inf when a gradient is not finite).
    pub grad_norm: f64,
    /// The learning rate used.
    pub lr: f64,
    /// False when the norm was not finite and nothing changed.
    pub applied: bool,
}

/// AdamW over a fixed list of named tensors.
#[derive(Clone, Debug)]
pub struct AdamW {
    names: Vec<String>,
    params: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per tensor, the element ranges that never decay (norm gains and biases packed inside a
    /// flat tensor, such as the flow head's); empty: the tensor's name decides.
    no_decay: Vec<Vec<Range<usize>>>,
    /// Optimizer steps applied so far.
    pub step: u64,
    pub hp: AdamWParams,
    /// Clip the global norm to this (+inf: off).
    pub max_grad_norm: f32,
    pub schedule: Schedule,
}

/// Whether a tensor decays: matrices do, norm weights and biases (1-D) do not.
fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with("bias") || name.ends_with(".b"))
}

impl AdamW {
    /// Starts from these weights (m = v = 0, step 0).
    pub fn new(
        named: Vec<(String, Vec<f32>)>,
        hp: AdamWParams,
        max_grad_norm: f32,
        schedule: Schedule,
    ) -> Result<Self> {
        hp.validate()?;
        if max_grad_norm.is_nan() || max_grad_norm <= 0.0 {
            return Err(Error::Invalid(format!(
                "optimizer max_grad_norm = {max_grad_norm}: must be > 0 (inf: off)"
            )));
        }
        let (names, params): (Vec<_>, Vec<_>) = named.into_iter().unzip();
        let m = params
            .iter()
            .map(|p: &Vec<f32>| vec![0.0; p.len()])
            .collect();
        let v = params
            .iter()
            .map(|p: &Vec<f32>| vec![0.0; p.len()])
            .collect();
        let no_decay = vec![Vec::new(); names.len()];
        Ok(AdamW {
            names,
            params,
            m,
            v,
            no_decay,
            step: 0,
            hp,
            max_grad_norm,
            schedule,
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Marks element ranges of tensor `name` as never weight-decayed (the rest decays).
    pub fn set_no_decay(&mut self, name: &str, ranges: Vec<Range<usize>>) -> Result<()> {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::Invalid(format!("optimizer: no tensor {name}")))?;
        let len = self.params[i].len();
        if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > len) {
            return Err(Error::Invalid(format!(
                "optimizer: no-decay range {r:?} of {name} outside 0..{len}"
            )));
        }
        self.no_decay[i] = ranges;
        Ok(())
    }

    /// Master weights, in [`AdamW::names`] order.
    pub fn params(&self) -> &[Vec<f32>] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.params[i])
    }

    /// One step with `grads` in [`AdamW::names`] order. Non-finite norm: nothing changes.
    pub fn step(&mut self, grads: &[Vec<f32>]) -> Result<StepOutcome> {
        check_len("optimizer grads", grads.len(), self.params.len())?;
        for (i, g) in grads.iter().enumerate() {
            check_len(
                &format!("gradient of {}", self.names[i]),
                g.len(),
                self.params[i].len(),
            )?;
        }
        let refs: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        let norm = adamw::cpu::grad_norm(&refs);
        let lr = self.schedule.lr(self.step + 1);
        let scale = adamw::clip_scale(norm, self.max_grad_norm);
        if !scale.is_finite() {
            return Ok(StepOutcome {
                grad_norm: norm,
                lr,
                applied: false,
            });
        }
        self.step += 1;
        #[allow(clippy::needless_range_loop)] // params, grads, m, v by tensor
        for i in 0..self.params.len() {
            let wd = if decays(&self.names[i]) {
                self.hp.weight_decay
            } else {
                0.0
            };
            // Elementwise update: each segment with its own decay (the whole tensor, or the
            // decayed and never-decayed ranges of a flat one).
            let len = self.params[i].len();
            let mut segs: Vec<(Range<usize>, f64)> = Vec::new();
            let mut at = 0;
            let mut nd = self.no_decay[i].clone();
            nd.sort_by_key(|r| r.start);
            for r in nd {
                if r.start > at {
                    segs.push((at..r.start, wd));
                }
                segs.push((r.start.max(at)..r.end.max(at), 0.0));
                at = at.max(r.end);
            }
            segs.push((at..len, wd));
            for (r, weight_decay) in segs.into_iter().filter(|(r, _)| !r.is_empty()) {
                let hp = AdamWParams {
                    lr,
                    weight_decay,
                    ..self.hp
                };
                adamw::cpu::step(
                    &mut self.params[i][r.clone()],
                    &grads[i][r.clone()],
                    &mut self.m[i][r.clone()],
                    &mut self.v[i][r],
                    None,
                    &hp,
                    self.step,
                    scale,
                )?;
            }
        }
        Ok(StepOutcome {
            grad_norm: norm,
            lr,
            applied: true,
        })
    }

    /// The full state as named tensors: `{prefix}param.{name}`, `{prefix}m.{name}`,
    /// `{prefix}v.{name}` (the step count is saved by the caller).
    pub fn state(&self, prefix: &str) -> BTreeMap<String, Vec<f32>> {
        let mut out = BTreeMap::new();
        for (i, n) in self.names.iter().enumerate() {
            out.insert(format!("{prefix}param.{n}"), self.params[i].clone());
            out.insert(format!("{prefix}m.{n}"), self.m[i].clone());
            out.insert(format!("{prefix}v.{n}"), self.v[i].clone());
        }
        out
    }

    /// Restores what [`AdamW::state`] wrote (every tensor must be present with its length).
    pub fn load_state(
        &mut self,
        prefix: &str,
        state: &BTreeMap<String, Vec<f32>>,
        step: u64,
        source: &str,
    ) -> Result<()> {
        for i in 0..self.names.len() {
            let n = &self.names[i];
            for (kind, dst) in [
                ("param", &mut self.params[i]),
                ("m", &mut self.m[i]),
                ("v", &mut self.v[i]),
            ] {
                let key = format!("{prefix}{kind}.{n}");
                let src = state.get(&key).ok_or_else(|| Error::Format {
                    path: source.into(),
                    msg: format!("optimizer state: missing tensor {key}"),
                })?;
                if src.len() != dst.len() {
                    return Err(Error::Format {
                        path: source.into(),
                        msg: format!(
                            "optimizer state: {key} has {} values, expected {}",
                            src.len(),
                            dst.len()
                        ),
                    });
                }
                dst.copy_from_slice(src);
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched() -> Schedule {
        Schedule {
            peak: 1.0,
            warmup: 2,
            total: 12,
            cosine: true,
            min_ratio: 0.1,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = sched();
        assert_eq!(s.lr(1), 0.5);
        assert_eq!(s.lr(2), 1.0);
        assert!((s.lr(7) - 0.55).abs() < 1e-12); // half way: floor + (1 - floor)/2
        assert!((s.lr(12) - 0.1).abs() < 1e-12);
        assert!((s.lr(50) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn nonfinite_gradient_changes_nothing() {
        let hp = AdamWParams::default();
        let mut o = AdamW::new(vec![("w".into(), vec![1.0, 2.0])], hp, 1.0, sched()).unwrap();
        let r = o.step(&[vec![f32::NAN, 0.0]]).unwrap();
        assert!(!r.applied);
        assert_eq!(o.step, 0);
        assert_eq!(o.params()[0], vec![1.0, 2.0]);
        let r = o.step(&[vec![0.5, -0.5]]).unwrap();
        assert!(r.applied);
        assert_eq!(o.step, 1);
        assert!(o.params()[0][0] < 1.0 && o.params()[0][1] > 2.0);
    }

    #[test]
    fn state_round_trips() {
        let hp = AdamWParams::default();
        let mut a = AdamW::new(vec![("w".into(), vec![1.0, 2.0])], hp, 1.0, sched()).unwrap();
        a.step(&[vec![0.5, -0.5]]).unwrap();
        let st = a.state("x.");
        let mut b = AdamW::new(vec![("w".into(), vec![0.0, 0.0])], hp, 1.0, sched()).unwrap();
        b.load_state("x.", &st, a.step, "test").unwrap();
        a.step(&[vec![0.1, 0.2]]).unwrap();
        b.step(&[vec![0.1, 0.2]]).unwrap();
        assert_eq!(a.params(), b.params());
        let mut missing = st.clone();
        missing.remove("x.m.w");
        assert!(b.load_state("x.", &missing, 1, "test").is_err());
    }
}
