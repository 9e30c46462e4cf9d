//! The executor: storage for a [`Plan`] on a [`Device`], and the run loop.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{Plan, Role, Step, TensorId};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};

enum Storage {
    Cpu {
        pers: Vec<f32>,
        arena: Vec<f32>,
    },
    Cuda {
        dev: Arc<CudaDevice>,
        pers: CudaSlice<f32>,
        arena: CudaSlice<f32>,
    },
}

/// A plan bound to storage on one device: inputs and parameters in one persistent buffer, every
/// activation and gradient in one arena.
pub struct Session {
    plan: Plan,
    device: Device,
    storage: Storage,
}

impl Session {
    /// Allocates the persistent buffer (zeros) and the arena (NaN on the CPU, so a read of
    /// anything not yet written shows up as NaN rather than a plausible number).
    pub fn new(plan: Plan, device: Device) -> Result<Self> {
        let storage = match &device {
            Device::Cpu => Storage::Cpu {
                pers: vec![0.0; plan.pers_len],
                arena: vec![f32::NAN; plan.arena_len],
            },
            Device::Cuda(dev) => {
                let s = dev.stream();
                let alloc = |n: usize| s.alloc_zeros::<f32>(n.max(1));
                Storage::Cuda {
                    dev: dev.clone(),
                    pers: alloc(plan.pers_len)?,
                    arena: alloc(plan.arena_len)?,
                }
            }
        };
        Ok(Session {
            plan,
            device,
            storage,
        })
    }

    /// The plan this session runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn region(&self, t: TensorId) -> Result<(bool, usize, usize)> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        match info.role {
            Role::Input | Role::Param => Ok((true, self.plan.pers_offset[t.0], info.len)),
            _ if self.plan.offset[t.0] == usize::MAX => Err(Error::Invalid(format!(
                "tensor {} is never used",
                info.name
            ))),
            _ => Ok((false, self.plan.offset[t.0], info.len)),
        }
    }

    /// Copies `data` into input or parameter `t`.
    pub fn write(&mut self, t: TensorId, data: &[f32]) -> Result<()> {
        let info = &self.plan.tensors[t.0];
        if !matches!(info.role, Role::Input | Role::Param) {
            return Err(Error::Invalid(format!(
                "{}: only inputs and parameters are written",
                info.name
            )));
        }
        crate::error::check_len(&info.name, data.len(), info.len)?;
        let (_, off, len) = self.region(t)?;
        match &mut self.storage {
            Storage::Cpu { pers, .. } => pers[off..off + len].copy_from_slice(data),
            Storage::Cuda { dev, pers, .. } => dev
                .stream()
                .memcpy_htod(data, &mut pers.slice_mut(off..off + len))?,
        }
        Ok(())
    }

    /// Copies tensor `t` out. Arena tensors hold meaningful values only while live: read kept
    /// tensors, parameter gradients and the loss after [`Session::run`].
    pub fn read(&self, t: TensorId) -> Result<Vec<f32>> {
        let (p, off, len) = self.region(t)?;
        match &self.storage {
            Storage::Cpu { pers, arena } => Ok(if p {
                &pers[off..off + len]
            } else {
                &arena[off..off + len]
            }
            .to_vec()),
            Storage::Cuda { dev, pers, arena } => {
                let src = if p { pers } else { arena };
                Ok(dev.stream().clone_dtoh(&src.slice(off..off + len))?)
            }
        }
    }

    /// Runs forward, seeds d(loss) = 1, runs the backward schedule; returns the loss.
    pub fn run(&mut self) -> Result<f32> {
        let plan = &self.plan;
        let nf = plan.nodes.len();
        let lg = plan.grad_of[plan.loss.0].expect("planned loss has a gradient");
        for (s, step) in plan.steps.iter().enumerate() {
            for &g in &plan.zero_at[s] {
                let (off, len) = (plan.offset[g.0], plan.tensors[g.0].len);
                match &mut self.storage {
                    Storage::Cpu { arena, .. } => arena[off..off + len].fill(0.0),
                    Storage::Cuda { dev, arena, .. } => dev
                        .stream()
                        .memset_zeros(&mut arena.slice_mut(off..off + len))?,
                }
            }
            if s == nf {
                let off = plan.offset[lg.0];
                match &mut self.storage {
                    Storage::Cpu { arena, .. } => arena[off] = 1.0,
                    Storage::Cuda { dev, arena, .. } => dev
                        .stream()
                        .memcpy_htod(&[1.0f32], &mut arena.slice_mut(off..off + 1))?,
                }
            }
            let (i, fwd) = match *step {
                Step::Forward(i) => (i, true),
                Step::Backward(i) => (i, false),
            };
            let n = &plan.nodes[i];
            let mut x = Exec::new(plan, &self.device, &mut self.storage);
            x.scratch = if fwd { None } else { n.scratch };
            let r = if fwd {
                n.op.forward(&mut x, &n.ins, &n.outs)
            } else {
                let d_outs: Vec<TensorId> = n
                    .outs
                    .iter()
                    .map(|o| plan.grad_of[o.0].expect("outputs of a backward node have gradients"))
                    .collect();
                let d_ins: Vec<Option<TensorId>> =
                    n.ins.iter().map(|t| plan.grad_of[t.0]).collect();
                n.op.backward(&mut x, &n.ins, &n.outs, &d_outs, &d_ins)
            };
            r.map_err(|e| {
                Error::Invalid(format!(
                    "{} of node {i} ({}): {e}",
                    if fwd { "forward" } else { "backward" },
                    n.op.name()
                ))
            })?;
        }
        let loss = self.read(plan.loss)?;
        Ok(loss[0])
    }
}

/// What an op sees while it runs: the device and the storage of every tensor.
///
/// Invariant the planner guarantees: tensors that are live at the same step never overlap, so
/// an op may hold slices of its inputs, outputs and gradients at once. Ops must not request the
/// same tensor mutably twice.
pub struct Exec<'a> {
    plan: &'a Plan,
    device: &'a Device,
    cpu: Option<(*mut f32, *mut f32)>,
    cuda: Option<(u64, u64)>,
    scratch: Option<TensorId>,
}

impl<'a> Exec<'a> {
    fn new(plan: &'a Plan, device: &'a Device, storage: &'a mut Storage) -> Self {
        match storage {
            Storage::Cpu { pers, arena } => Exec {
                plan,
                device,
                cpu: Some((pers.as_mut_ptr(), arena.as_mut_ptr())),
                cuda: None,
                scratch: None,
            },
            Storage::Cuda { dev, pers, arena } => {
                let (p, _sp) = pers.device_ptr(dev.stream());
                let (a, _sa) = arena.device_ptr(dev.stream());
                Exec {
                    plan,
                    device,
                    cpu: None,
                    cuda: Some((p, a)),
                    scratch: None,
                }
            }
        }
    }

    /// The device this runs on.
    pub fn device(&self) -> &Device {
        self.device
    }

    /// The CUDA device, or an error naming `op` for an op without a CUDA path.
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        match self.device {
            Device::Cuda(d) => Some(d),
            Device::Cpu => None,
        }
    }

    /// The scratch tensor of the running backward step (sized by [`super::Op::backward_scratch`]).
    pub fn scratch(&self) -> Option<TensorId> {
        self.scratch
    }

    /// Number of elements of `t`.
    pub fn len(&self, t: TensorId) -> usize {
        self.plan.tensors[t.0].len
    }

    fn locate(&self, t: TensorId) -> (bool, usize) {
        match self.plan.tensors[t.0].role {
            Role::Input | Role::Param => (true, self.plan.pers_offset[t.0]),
            _ => (false, self.plan.offset[t.0]),
        }
    }

    /// `t` as a CPU slice.
    pub fn cpu(&self, t: TensorId) -> &[f32] {
        let (p, off) = self.locate(t);
        let (pers, arena) = self.cpu.expect("cpu() called on a CUDA session");
        let base = if p { pers } else { arena };
        // SAFETY: offset + len lies in the buffer (planner); see the type's invariant.
        unsafe { std::slice::from_raw_parts(base.add(off), self.len(t)) }
    }

    /// `t` as a mutable CPU slice.
    #[allow(clippy::mut_from_ref)]
    pub fn cpu_mut(&self, t: TensorId) -> &mut [f32] {
        let (p, off) = self.locate(t);
        let (pers, arena) = self.cpu.expect("cpu_mut() called on a CUDA session");
        let base = if p { pers } else { arena };
        // SAFETY: as in `cpu`; live tensors are disjoint, and ops never alias a mutable one.
        unsafe { std::slice::from_raw_parts_mut(base.add(off), self.len(t)) }
    }

    /// `t`'s device address (CUdeviceptr) on a CUDA session.
    pub fn ptr(&self, t: TensorId) -> u64 {
        let (p, off) = self.locate(t);
        let (pers, arena) = self.cuda.expect("ptr() called on a CPU session");
        (if p { pers } else { arena }) + 4 * off as u64
    }
}
