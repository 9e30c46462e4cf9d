//! The executor: storage for a [`Plan`] on a [`Device`], and the run loop.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{DType, Plan, Role, Step, TensorId};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};

/// Element types a tensor can hold, tied to their [`DType`].
pub trait Element: bytemuck::Pod {
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}

enum Storage {
    // u128 words keep every typed view 16-byte aligned.
    Cpu {
        pers: Vec<u128>,
        arena: Vec<u128>,
    },
    Cuda {
        dev: Arc<CudaDevice>,
        pers: CudaSlice<u8>,
        arena: CudaSlice<u8>,
    },
}

/// A plan bound to storage on one device: inputs and parameters in one persistent buffer, every
/// activation, gradient and scratch region in one arena.
pub struct Session {
    plan: Plan,
    device: Device,
    storage: Storage,
}

fn words(bytes: usize) -> usize {
    bytes.div_ceil(16).max(1)
}

impl Session {
    /// Allocates the persistent buffer (zeros) and the arena (all bits set on the CPU: NaN in
    /// f32 and bf16, so a read of anything not yet written shows up rather than passing).
    pub fn new(plan: Plan, device: Device) -> Result<Self> {
        if plan.cuda != device.is_cuda() {
            return Err(Error::Invalid(format!(
                "the plan was made for {}, the session is on {}",
                if plan.cuda { "CUDA" } else { "the CPU" },
                device.describe()
            )));
        }
        let storage = match &device {
            Device::Cpu => Storage::Cpu {
                pers: vec![0; words(plan.pers_len)],
                arena: vec![u128::MAX; words(plan.arena_len)],
            },
            Device::Cuda(dev) => {
                let s = dev.stream();
                Storage::Cuda {
                    dev: dev.clone(),
                    pers: s.alloc_zeros::<u8>(plan.pers_len.max(16))?,
                    arena: s.alloc_zeros::<u8>(plan.arena_len.max(16))?,
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

    /// (persistent?, byte offset, byte length) of `t`, checking its element type.
    fn region(&self, t: TensorId, dtype: DType) -> Result<(bool, usize, usize)> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        if info.dtype != dtype {
            return Err(Error::Invalid(format!(
                "tensor {} holds {:?}, accessed as {dtype:?}",
                info.name, info.dtype
            )));
        }
        let bytes = info.len * dtype.size();
        match info.role {
            Role::Input | Role::Param => Ok((true, self.plan.pers_offset[t.0], bytes)),
            _ if self.plan.offset[t.0] == usize::MAX => Err(Error::Invalid(format!(
                "tensor {} is never used",
                info.name
            ))),
            _ => Ok((false, self.plan.offset[t.0], bytes)),
        }
    }

    /// Copies `data` into input or parameter `t`.
    pub fn write<T: Element>(&mut self, t: TensorId, data: &[T]) -> Result<()> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        if !matches!(info.role, Role::Input | Role::Param) {
            return Err(Error::Invalid(format!(
                "{}: only inputs and parameters are written",
                info.name
            )));
        }
        crate::error::check_len(&info.name, data.len(), info.len)?;
        self.copy_in(t, data)
    }

    /// Copies host `data` into tensor `t`'s bytes (persistent or arena, per its role).
    fn copy_in<T: Element>(&mut self, t: TensorId, data: &[T]) -> Result<()> {
        let (persistent, off, len) = self.region(t, T::DTYPE)?;
        let src: &[u8] = bytemuck::cast_slice(data);
        match &mut self.storage {
            Storage::Cpu { pers, arena } => {
                let buf = if persistent { pers } else { arena };
                bytemuck::cast_slice_mut::<u128, u8>(buf)[off..off + len].copy_from_slice(src)
            }
            Storage::Cuda {
                dev, pers, arena, ..
            } => {
                dev.count_h2d(len);
                let buf = if persistent { pers } else { arena };
                dev.stream()
                    .memcpy_htod(src, &mut buf.slice_mut(off..off + len))?
            }
        }
        Ok(())
    }

    /// Overwrites the gradient of parameter `param` after a [`Session::run`] (it lives to the end
    /// of the run, so it holds until the next run): gradient accumulation over micro-batches
    /// writes the summed gradients back before the optimizer reads them.
    pub fn write_param_grad(&mut self, param: TensorId, data: &[f32]) -> Result<()> {
        let info = self
            .plan
            .tensors
            .get(param.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {param:?}")))?;
        if info.role != Role::Param {
            return Err(Error::Invalid(format!(
                "{}: write_param_grad takes a parameter",
                info.name
            )));
        }
        let g = self
            .plan
            .grad(param)
            .ok_or_else(|| Error::Invalid(format!("{} has no gradient", info.name)))?;
        let ginfo = &self.plan.tensors[g.0];
        crate::error::check_len(&ginfo.name, data.len(), ginfo.len)?;
        self.copy_in(g, data)
    }

    /// The device address (CUdeviceptr) of tensor `t` on a CUDA session, for launchers that
    /// work on the session's buffers directly (the device optimizer). Valid while the session
    /// lives: its buffers are allocated once.
    pub fn cuda_ptr(&self, t: TensorId) -> Result<u64> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        let (p, off, _) = self.region(t, info.dtype)?;
        match &self.storage {
            Storage::Cpu { .. } => Err(Error::Invalid(format!(
                "cuda_ptr({}): the session is on the CPU",
                info.name
            ))),
            Storage::Cuda { dev, pers, arena } => {
                let buf = if p { pers } else { arena };
                let (base, _sync) = buf.device_ptr(dev.stream());
                Ok(base + off as u64)
            }
        }
    }

    /// Copies tensor `t` out. Arena tensors hold meaningful values only while live: read kept
    /// tensors, parameter gradients and the loss after [`Session::run`].
    pub fn read<T: Element>(&self, t: TensorId) -> Result<Vec<T>> {
        let (p, off, len) = self.region(t, T::DTYPE)?;
        let bytes: Vec<u8> = match &self.storage {
            Storage::Cpu { pers, arena } => {
                let buf = if p { pers } else { arena };
                bytemuck::cast_slice::<u128, u8>(buf)[off..off + len].to_vec()
            }
            Storage::Cuda { dev, pers, arena } => {
                let src = if p { pers } else { arena };
                dev.dtoh(&src.slice(off..off + len))?
            }
        };
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// The device address (CUdeviceptr) of input or parameter `t` on a CUDA session, with its
    /// element type: it stays the same for the session's life (the persistent buffer is allocated
    /// once), so a kernel or a captured CUDA graph may read the live values there, e.g. device
    /// generation reading the policy's weights. `Error::Invalid` on a CPU session or for an
    /// activation (arena tensors are only meaningful while live inside a run).
    pub fn persistent_ptr(&self, t: TensorId) -> Result<(u64, DType)> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        if !matches!(info.role, Role::Input | Role::Param) {
            return Err(Error::Invalid(format!(
                "persistent_ptr: {} is not an input or parameter",
                info.name
            )));
        }
        match &self.storage {
            Storage::Cpu { .. } => Err(Error::Invalid(format!(
                "persistent_ptr: {} lives on the CPU",
                info.name
            ))),
            Storage::Cuda { dev, pers, .. } => {
                let (p, _g) = pers.device_ptr(dev.stream());
                Ok((p + self.plan.pers_offset[t.0] as u64, info.dtype))
            }
        }
    }

    /// [`Session::read`] of an f32 tensor.
    pub fn read_f32(&self, t: TensorId) -> Result<Vec<f32>> {
        self.read::<f32>(t)
    }

    /// Runs the forward nodes only (inference, scoring): no gradient is seeded or computed.
    /// Afterwards kept tensors and the loss hold this forward's values. The arena layout is the
    /// training one, so this needs no extra memory and leaves the next [`Session::run`] intact.
    pub fn forward(&mut self) -> Result<()> {
        let plan = &self.plan;
        for (i, n) in plan.nodes.iter().enumerate() {
            let mut x = Exec::new(plan, &self.device, &mut self.storage);
            x.scratch = n.fwd_scratch;
            n.op.forward(&mut x, &n.ins, &n.outs).map_err(|e| {
                Error::Invalid(format!("forward of node {i} ({}): {e}", n.op.name()))
            })?;
        }
        Ok(())
    }

    /// Runs the forward nodes up to the one that produces `t` (nodes run in the order they were
    /// added, which is a topological order), e.g. to read a head's input without running the
    /// loss. `t` must be a node's output (and kept, to be readable afterwards).
    pub fn forward_to(&mut self, t: TensorId) -> Result<()> {
        let plan = &self.plan;
        let last = plan
            .nodes
            .iter()
            .rposition(|n| n.outs.contains(&t))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "forward_to: tensor {} is not produced by any node",
                    plan.tensors[t.0].name
                ))
            })?;
        for (i, n) in plan.nodes.iter().enumerate().take(last + 1) {
            let mut x = Exec::new(plan, &self.device, &mut self.storage);
            x.scratch = n.fwd_scratch;
            n.op.forward(&mut x, &n.ins, &n.outs).map_err(|e| {
                Error::Invalid(format!("forward of node {i} ({}): {e}", n.op.name()))
            })?;
        }
        Ok(())
    }

    /// Runs forward, seeds d(loss) = 1, runs the backward schedule; returns the loss.
    pub fn run(&mut self) -> Result<f32> {
        let plan = &self.plan;
        let nf = plan.nodes.len();
        let lg = plan.grad_of[plan.loss.0].expect("planned loss has a gradient");
        for (s, step) in plan.steps.iter().enumerate() {
            for &g in &plan.zero_at[s] {
                let (off, len) = (plan.offset[g.0], plan.tensors[g.0].bytes());
                match &mut self.storage {
                    Storage::Cpu { arena, .. } => {
                        bytemuck::cast_slice_mut::<u128, u8>(arena)[off..off + len].fill(0)
                    }
                    Storage::Cuda { dev, arena, .. } => dev
                        .stream()
                        .memset_zeros(&mut arena.slice_mut(off..off + len))?,
                }
            }
            if s == nf {
                let off = plan.offset[lg.0];
                match &mut self.storage {
                    Storage::Cpu { arena, .. } => bytemuck::cast_slice_mut::<u128, u8>(arena)
                        [off..off + 4]
                        .copy_from_slice(&1.0f32.to_ne_bytes()),
                    Storage::Cuda { dev, arena, .. } => {
                        dev.count_h2d(4);
                        dev.stream().memcpy_htod(
                            &1.0f32.to_ne_bytes(),
                            &mut arena.slice_mut(off..off + 4),
                        )?
                    }
                }
            }
            let (i, fwd) = match *step {
                Step::Forward(i) | Step::Recompute(i) => (i, true),
                Step::Backward(i) => (i, false),
            };
            let n = &plan.nodes[i];
            let mut x = Exec::new(plan, &self.device, &mut self.storage);
            x.scratch = match *step {
                Step::Forward(_) => n.fwd_scratch,
                Step::Recompute(_) => n.re_fwd_scratch,
                Step::Backward(_) => n.scratch,
            };
            let r = if let Step::Forward(_) = *step {
                n.op.forward(&mut x, &n.ins, &n.outs)
            } else if let Step::Recompute(_) = *step {
                n.op.forward(&mut x, &n.re_ins, &n.re_outs)
            } else {
                let d_outs: Vec<TensorId> = n
                    .outs
                    .iter()
                    .map(|o| plan.grad_of[o.0].expect("outputs of a backward node have gradients"))
                    .collect();
                let d_ins: Vec<Option<TensorId>> =
                    n.ins.iter().map(|t| plan.grad_of[t.0]).collect();
                // Values through the recompute copies (the originals where there are none).
                n.op.backward(&mut x, &n.re_ins, &n.re_outs, &d_outs, &d_ins)
            };
            r.map_err(|e| {
                Error::Invalid(format!(
                    "{} of node {i} ({}): {e}",
                    if fwd { "forward" } else { "backward" },
                    n.op.name()
                ))
            })?;
        }
        let loss = self.read::<f32>(plan.loss)?;
        Ok(loss[0])
    }
}

// ---- Device-to-device I/O (the GPU-resident step, issue 11 item 2) --------------------------
// A CUDA session's inputs can be filled from, and its tensors copied into, device buffers
// without a host round trip: queued on the device's stream, not counted as host traffic.
impl Session {
    /// The CUDA device of a CUDA session, or an error naming `what`.
    fn cuda_of(&self, what: &str) -> Result<&Arc<CudaDevice>> {
        match &self.storage {
            Storage::Cuda { dev, .. } => Ok(dev),
            Storage::Cpu { .. } => Err(Error::Invalid(format!(
                "{what}: a device-to-device copy needs a CUDA session"
            ))),
        }
    }

    /// Copies `src` (device memory of this session's device) into input or parameter `t`; `src`
    /// must hold exactly `t`'s elements.
    pub fn write_device<T: Element + cudarc::driver::DeviceRepr>(
        &mut self,
        t: TensorId,
        src: &cudarc::driver::CudaView<'_, T>,
    ) -> Result<()> {
        let name = &self.plan.tensors[t.0].name;
        crate::error::check_len(name, src.len(), self.plan.tensors[t.0].len)?;
        let dst = self.input_device_ptr(t, T::DTYPE)?;
        let dev = self.cuda_of("write_device")?;
        let (sp, _g) = src.device_ptr(dev.stream());
        // SAFETY: both regions hold len elements of T on this device (checked above).
        unsafe { dtod(dev, dst, sp, src.len() * std::mem::size_of::<T>()) }
    }

    /// The device address of input or parameter `t` (element type `dtype`) on a CUDA session,
    /// for kernels that write an input in place (e.g. a gather of a step buffer's rows).
    pub fn input_device_ptr(&self, t: TensorId, dtype: DType) -> Result<u64> {
        let info = self
            .plan
            .tensors
            .get(t.0)
            .ok_or_else(|| Error::Invalid(format!("unknown tensor {t:?}")))?;
        if !matches!(info.role, Role::Input | Role::Param) {
            return Err(Error::Invalid(format!(
                "{}: only inputs and parameters are written",
                info.name
            )));
        }
        self.region(t, dtype)?;
        self.cuda_ptr(t)
    }

    /// Copies the first `dst.len()` elements of tensor `t` into `dst` (device memory of this
    /// session's device). Arena tensors hold meaningful values only while live (kept tensors
    /// after a run, as [`Session::read`]).
    pub fn read_device<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        t: TensorId,
        dst: &mut cudarc::driver::CudaViewMut<'_, T>,
    ) -> Result<()> {
        let (_, _, bytes) = self.region(t, T::DTYPE)?;
        let n = dst.len() * std::mem::size_of::<T>();
        if n > bytes {
            return Err(Error::Shape(format!(
                "read_device: {} elements of {}, which holds {}",
                dst.len(),
                self.plan.tensors[t.0].name,
                self.plan.tensors[t.0].len
            )));
        }
        let src = self.cuda_ptr(t)?;
        let dev = self.cuda_of("read_device")?;
        let (dp, _g) = cudarc::driver::DevicePtrMut::device_ptr_mut(dst, dev.stream());
        // SAFETY: n bytes at both addresses on this device (checked above).
        unsafe { dtod(dev, dp, src, n) }
    }
}

/// Queues an `n`-byte device-to-device copy on `dev`'s stream.
///
/// # Safety
/// `dst` and `src` address `n` bytes of `dev`'s memory that stay valid until the copy ran.
unsafe fn dtod(dev: &CudaDevice, dst: u64, src: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    dev.make_current()?;
    cudarc::driver::result::memcpy_dtod_async(dst, src, n, dev.stream().cu_stream())?;
    Ok(())
}

/// What an op sees while it runs: the device and the storage of every tensor.
///
/// Invariant the planner guarantees: tensors that are live at the same step never overlap, so
/// an op may hold slices of its inputs, outputs and gradients at once. Ops must not request the
/// same tensor mutably twice.
pub struct Exec<'a> {
    plan: &'a Plan,
    device: &'a Device,
    cpu: Option<(*mut u8, *mut u8)>,
    cuda: Option<(u64, u64)>,
    scratch: Option<TensorId>,
}

impl<'a> Exec<'a> {
    fn new(plan: &'a Plan, device: &'a Device, storage: &'a mut Storage) -> Self {
        match storage {
            Storage::Cpu { pers, arena } => Exec {
                plan,
                device,
                cpu: Some((pers.as_mut_ptr() as *mut u8, arena.as_mut_ptr() as *mut u8)),
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

    /// The scratch tensor of the running step (sized by [`super::Op::backward_scratch`] or
    /// [`super::Op::forward_scratch`]).
    pub fn scratch(&self) -> Option<TensorId> {
        self.scratch
    }

    /// The scratch tensor of the running step, or an error naming `what` when the op's
    /// [`super::Op::backward_scratch`] / [`super::Op::forward_scratch`] planned none.
    pub fn require_scratch(&self, what: &str) -> Result<TensorId> {
        self.scratch
            .ok_or_else(|| Error::Invalid(format!("{what}: no scratch planned for this step")))
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

    /// Element type of `t`.
    pub fn dtype(&self, t: TensorId) -> DType {
        self.plan.tensors[t.0].dtype
    }

    fn cpu_ptr<T: Element>(&self, t: TensorId) -> *mut T {
        let info = &self.plan.tensors[t.0];
        assert!(
            info.dtype == T::DTYPE,
            "op bug: tensor {} holds {:?}, accessed as {:?}",
            info.name,
            info.dtype,
            T::DTYPE
        );
        let (p, off) = self.locate(t);
        let (pers, arena) = self.cpu.expect("CPU access on a CUDA session");
        // SAFETY: offset lies in the buffer (planner); offsets are 256-byte aligned.
        unsafe { (if p { pers } else { arena }).add(off) as *mut T }
    }

    /// `t` as a CPU slice of `T` (its element type).
    pub fn slice<T: Element>(&self, t: TensorId) -> &[T] {
        // SAFETY: offset + len lies in the buffer (planner); see the type's invariant.
        unsafe { std::slice::from_raw_parts(self.cpu_ptr::<T>(t), self.len(t)) }
    }

    /// `t` as a mutable CPU slice of `T`.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut<T: Element>(&self, t: TensorId) -> &mut [T] {
        // SAFETY: as in `slice`; live tensors are disjoint, and ops never alias a mutable one.
        unsafe { std::slice::from_raw_parts_mut(self.cpu_ptr::<T>(t), self.len(t)) }
    }

    /// `t` (f32) as a CPU slice.
    pub fn cpu(&self, t: TensorId) -> &[f32] {
        self.slice::<f32>(t)
    }

    /// `t` (f32) as a mutable CPU slice.
    #[allow(clippy::mut_from_ref)]
    pub fn cpu_mut(&self, t: TensorId) -> &mut [f32] {
        self.slice_mut::<f32>(t)
    }

    /// Downloads `n` elements of `T` at `t` (the stream synchronised before returning).
    fn download<T: bytemuck::Pod + Default>(
        &self,
        dev: &CudaDevice,
        t: TensorId,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.len(t)];
        dev.count_d2h(std::mem::size_of_val(out.as_slice()));
        dev.make_current()?;
        // SAFETY: the tensor holds len elements of T at ptr(t); the stream is synchronised
        // before `out` is read or dropped.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut out,
                self.ptr(t),
                dev.stream().cu_stream(),
            )?
        };
        dev.synchronize()?;
        Ok(out)
    }

    /// Uploads `data` to `t` (synchronised, so `data` may go away afterwards).
    fn upload<T: bytemuck::Pod>(&self, dev: &CudaDevice, t: TensorId, data: &[T]) -> Result<()> {
        dev.count_h2d(std::mem::size_of_val(data));
        dev.make_current()?;
        // SAFETY: the tensor holds data.len() elements of T at ptr(t) (lengths checked by the
        // callers); synchronised before `data` can go away.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(self.ptr(t), data, dev.stream().cu_stream())?
        };
        dev.synchronize()?;
        Ok(())
    }

    fn not_float(&self, what: &str, t: TensorId) -> Error {
        Error::Invalid(format!(
            "{what}: tensor {} holds u32",
            self.plan.tensors[t.0].name
        ))
    }

    /// `t` (f32 or bf16, widened) copied to the host: a copy on the CPU, a download (the
    /// stream synchronised) on CUDA. For ops whose work is small enough to do on the host.
    pub fn to_host(&self, t: TensorId) -> Result<Vec<f32>> {
        match (self.cuda_device(), self.dtype(t)) {
            (None, DType::F32) => Ok(self.cpu(t).to_vec()),
            (None, DType::BF16) => Ok(self
                .slice::<half::bf16>(t)
                .iter()
                .map(|v| v.to_f32())
                .collect()),
            (Some(dev), DType::F32) => self.download::<f32>(dev, t),
            (Some(dev), DType::BF16) => Ok(self
                .download::<u16>(dev, t)?
                .into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect()),
            (_, DType::U32) => Err(self.not_float("to_host", t)),
        }
    }

    /// Overwrites `t` (f32 or bf16, rounded) with host data (CUDA: an upload, synchronised).
    pub fn from_host(&self, t: TensorId, data: &[f32]) -> Result<()> {
        crate::error::check_len(&self.plan.tensors[t.0].name, data.len(), self.len(t))?;
        let bits = || -> Vec<u16> {
            data.iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect()
        };
        match (self.cuda_device(), self.dtype(t)) {
            (None, DType::F32) => self.cpu_mut(t).copy_from_slice(data),
            (None, DType::BF16) => {
                for (o, &v) in self.slice_mut::<half::bf16>(t).iter_mut().zip(data) {
                    *o = half::bf16::from_f32(v);
                }
            }
            (Some(dev), DType::F32) => self.upload(dev, t, data)?,
            (Some(dev), DType::BF16) => self.upload(dev, t, &bits())?,
            (_, DType::U32) => return Err(self.not_float("from_host", t)),
        }
        Ok(())
    }

    /// `t`'s device address (CUdeviceptr) on a CUDA session.
    pub fn ptr(&self, t: TensorId) -> u64 {
        let (p, off) = self.locate(t);
        let (pers, arena) = self.cuda.expect("ptr() called on a CPU session");
        (if p { pers } else { arena }) + off as u64
    }
}
