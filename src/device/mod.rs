//! The device layer: [`Device::Cpu`] or [`Device::Cuda`], the kernel module cache and the launch
//! helpers.
//!
//! Choosing a device never panics: `libcuda` is loaded dynamically, its absence and a device
//! count of zero both mean "CPU". `DFPO_DEVICE=cpu|cuda|auto` overrides the choice;
//! `DFPO_REQUIRE_CUDA=1` turns every "no GPU, skipped" of the test helpers into a failure.
//! `DFPO_SYNC_LAUNCH=1` synchronises after every launch so a faulting kernel is named at once.
//! `DFPO_TRACE_TRAFFIC=1` records the host traffic per call site ([`CudaDevice::traffic_sites`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};

use crate::error::{Error, Result};

pub mod emu;

pub mod embedded {
    //! The kernels compiled by build.rs (see its header for what is embedded).

    /// One kernel family (`kernels/<name>.cu`) as embedded in the binary.
    #[derive(Debug, Clone, Copy)]
    pub struct EmbeddedKernel {
        /// File stem: `flow`, `risk`, ...
        pub name: &'static str,
        /// Preprocessed CUDA C++ source (local includes inlined).
        pub source: &'static str,
        /// PTX for [`PTX_ARCH`], when the build had NVRTC.
        pub ptx: Option<&'static str>,
        /// CUBIN for [`CUBIN_ARCH`], when the build had NVRTC.
        pub cubin: Option<&'static [u8]>,
    }

    include!(concat!(env!("OUT_DIR"), "/kernels_embedded.rs"));

    /// The embedded kernel family called `name`.
    pub fn get(name: &str) -> Option<&'static EmbeddedKernel> {
        KERNELS.iter().find(|k| k.name == name)
    }
}

/// Where a computation runs.
#[derive(Clone)]
pub enum Device {
    /// The CPU reference backend (fp32, or f64 for checks).
    Cpu,
    /// One CUDA GPU.
    Cuda(Arc<CudaDevice>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "Cpu"),
            Device::Cuda(d) => write!(f, "Cuda({} {})", d.ordinal(), d.name()),
        }
    }
}

impl Device {
    /// The best device: CUDA device 0 when a driver and a GPU are present, else the CPU.
    /// `DFPO_DEVICE=cpu` forces the CPU; `DFPO_DEVICE=cuda` makes a missing GPU an error.
    pub fn best() -> Result<Device> {
        match std::env::var("DFPO_DEVICE").unwrap_or_default().as_str() {
            "" | "auto" => Ok(cuda_device().map(Device::Cuda).unwrap_or(Device::Cpu)),
            "cpu" => Ok(Device::Cpu),
            "cuda" => cuda_device().map(Device::Cuda).ok_or_else(|| {
                Error::Cuda(format!(
                    "DFPO_DEVICE=cuda but no CUDA device is usable: {}",
                    cuda_unavailable_reason()
                ))
            }),
            other => Err(Error::Invalid(format!(
                "DFPO_DEVICE={other}: expected cpu, cuda or auto"
            ))),
        }
    }

    /// Bytes copied host -> device and device -> host through the device layer so far
    /// (`(h2d, d2h)`; always `(0, 0)` on the CPU). Subtract two readings for one step's traffic.
    pub fn traffic(&self) -> (u64, u64) {
        match self {
            Device::Cpu => (0, 0),
            Device::Cuda(d) => d.traffic(),
        }
    }

    /// True for [`Device::Cuda`].
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// A one-line description, e.g. `cpu` or `cuda:0 NVIDIA H100 80GB HBM3 (sm_90)`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(d) => {
                let (ma, mi) = d.compute_capability();
                format!("cuda:{} {} (sm_{ma}{mi})", d.ordinal(), d.name())
            }
        }
    }
}

static CUDA0: OnceLock<std::result::Result<Arc<CudaDevice>, String>> = OnceLock::new();

fn probe_cuda0() -> std::result::Result<Arc<CudaDevice>, String> {
    // SAFETY: only dlopens libcuda by name; nothing is called when it is absent.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver library) is not installed".into());
    }
    // The driver is present: calls now return errors rather than panicking.
    let n = CudaContext::device_count().map_err(|e| format!("cuInit/cuDeviceGetCount: {e}"))?;
    if n < 1 {
        return Err("the driver reports no CUDA device".into());
    }
    CudaDevice::new(0).map_err(|e| e.to_string())
}

/// CUDA device 0, opened once per process; `None` when there is no driver or GPU.
pub fn cuda_device() -> Option<Arc<CudaDevice>> {
    CUDA0.get_or_init(probe_cuda0).as_ref().ok().cloned()
}

/// Why [`cuda_device`] returned `None` (empty when a device is present).
pub fn cuda_unavailable_reason() -> String {
    match CUDA0.get_or_init(probe_cuda0) {
        Ok(_) => String::new(),
        Err(e) => e.clone(),
    }
}

/// For tests and benches: the CUDA device, or `None` after printing a visible skip line.
/// Under `DFPO_REQUIRE_CUDA=1` a missing device panics instead, so a skip can never pass.
pub fn cuda_for_test(test: &str) -> Option<Arc<CudaDevice>> {
    match cuda_device() {
        Some(d) => Some(d),
        None => {
            let why = cuda_unavailable_reason();
            if std::env::var("DFPO_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
                panic!("{test}: DFPO_REQUIRE_CUDA=1 but no CUDA device: {why}");
            }
            eprintln!("SKIPPED {test}: no CUDA device ({why})");
            None
        }
    }
}

/// True when running on the emulated CUDA driver (`tools/emu` sets `DFPO_EMU=1`): tests then
/// pick smaller problems that still cover every code path (each test says which).
pub fn emulated() -> bool {
    std::env::var("DFPO_EMU").is_ok_and(|v| v == "1")
}

/// One CUDA GPU: its context, the stream every dfpo kernel runs on, and the module cache.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    sm_count: u32,
    max_smem_optin: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    /// The cuBLAS handle bound to `stream` (created on first use).
    blas: OnceLock<Arc<CudaBlas>>,
    /// The dynamic shared memory each function (by its CUfunction handle) is opted into so far.
    smem_optin: Mutex<HashMap<usize, u32>>,
    sync_launch: bool,
    /// Bytes copied host -> device and device -> host (see [`CudaDevice::count_h2d`]).
    h2d_bytes: AtomicU64,
    d2h_bytes: AtomicU64,
    /// `DFPO_TRACE_TRAFFIC=1`: the bytes per call site (see [`CudaDevice::traffic_sites`]).
    sites: Option<Mutex<HashMap<String, SiteTraffic>>>,
}

/// Host traffic of one call site (`DFPO_TRACE_TRAFFIC=1`, [`CudaDevice::traffic_sites`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteTraffic {
    pub h2d_bytes: u64,
    pub h2d_copies: u64,
    pub d2h_bytes: u64,
    pub d2h_copies: u64,
}

/// The call site of a counted copy: the innermost dfpo frames outside the copy helpers
/// (device layer, executor, session), innermost first, joined by " < ".
fn call_site() -> String {
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let skip = [
        "dfpo::device::",
        "dfpo::graph::exec::",
        "dfpo::train::step_ops::up",
        "dfpo::train::step_ops::down",
    ];
    let mut frames = Vec::new();
    for line in bt.lines() {
        let f = line.trim();
        let Some((_, name)) = f.split_once(": ") else {
            continue;
        };
        if !name.starts_with("dfpo::") || skip.iter().any(|s| name.starts_with(s)) {
            continue;
        }
        // Drop the hash suffix and closures' noise.
        let name = name.rsplit_once("::h").map_or(name, |(a, _)| a);
        let name = name
            .trim_start_matches("dfpo::")
            .replace("::{{closure}}", "");
        if frames.last() != Some(&name) {
            frames.push(name);
        }
        if frames.len() == 3 {
            break;
        }
    }
    if frames.is_empty() {
        "(outside dfpo)".into()
    } else {
        frames.join(" < ")
    }
}

impl CudaDevice {
    /// Opens device `ordinal` (its primary context) with a dedicated stream.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        let cc = ctx.compute_capability()?;
        let sm_count = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem_optin =
            ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        Ok(Arc::new(CudaDevice {
            name: ctx.name().unwrap_or_else(|_| "unknown GPU".into()),
            ctx,
            stream,
            cc,
            sm_count,
            max_smem_optin,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            smem_optin: Mutex::new(HashMap::new()),
            sync_launch: std::env::var("DFPO_SYNC_LAUNCH").is_ok_and(|v| v == "1"),
            h2d_bytes: AtomicU64::new(0),
            d2h_bytes: AtomicU64::new(0),
            sites: std::env::var("DFPO_TRACE_TRAFFIC")
                .is_ok_and(|v| v == "1")
                .then(|| Mutex::new(HashMap::new())),
        }))
    }

    /// The cudarc context (for engines that bring their own buffers).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every dfpo launch on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Marketing name reported by the driver.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Largest dynamic shared memory a block may opt into, in bytes.
    pub fn max_shared_mem_optin(&self) -> u32 {
        self.max_smem_optin
    }

    /// Makes this device's context current on the calling thread. cudarc's safe calls do it
    /// themselves; every raw driver or cuBLAS call (`cudarc::driver::result`, `cublas::result`)
    /// must come after it, or it fails on a thread that has not touched the context yet.
    pub fn make_current(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("making the CUDA context current: {e}")))
    }

    /// The cuBLAS handle of this device, bound to [`CudaDevice::stream`] (one per `CudaDevice`:
    /// two devices on the same GPU have two streams, so they cannot share a handle). The
    /// context is made current on the calling thread.
    pub fn blas(&self) -> Result<Arc<CudaBlas>> {
        self.make_current()?;
        if let Some(h) = self.blas.get() {
            return Ok(h.clone());
        }
        let h = Arc::new(
            CudaBlas::new(self.stream.clone())
                .map_err(|e| Error::Cuda(format!("cublasCreate: {e:?}")))?,
        );
        // A thread that lost a race drops its handle and uses the winner's.
        Ok(self.blas.get_or_init(|| h).clone())
    }

    /// Records `bytes` copied host -> device. Every copy of the crate goes through a counted
    /// path: [`CudaDevice::htod`], the graph session's writes and the executor's uploads.
    pub fn count_h2d(&self, bytes: usize) {
        self.h2d_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.trace(bytes, true);
    }

    /// Records `bytes` copied device -> host.
    pub fn count_d2h(&self, bytes: usize) {
        self.d2h_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.trace(bytes, false);
    }

    fn trace(&self, bytes: usize, h2d: bool) {
        let Some(m) = &self.sites else { return };
        let site = call_site();
        let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(site).or_default();
        if h2d {
            e.h2d_bytes += bytes as u64;
            e.h2d_copies += 1;
        } else {
            e.d2h_bytes += bytes as u64;
            e.d2h_copies += 1;
        }
    }

    /// With `DFPO_TRACE_TRAFFIC=1` set when the device was opened: the bytes and copies per
    /// call site so far (the innermost dfpo frames outside the copy helpers), largest first;
    /// empty otherwise. A diagnostic (it captures a backtrace per copy): subtract two readings
    /// for one step's sites.
    pub fn traffic_sites(&self) -> Vec<(String, SiteTraffic)> {
        let Some(m) = &self.sites else {
            return Vec::new();
        };
        let m = m.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, SiteTraffic)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by_key(|(_, t)| std::cmp::Reverse(t.h2d_bytes + t.d2h_bytes));
        v
    }

    /// `(h2d, d2h)` bytes copied so far (process-wide for this device).
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.h2d_bytes.load(Ordering::Relaxed),
            self.d2h_bytes.load(Ordering::Relaxed),
        )
    }

    /// A new device buffer holding `data` (counted host -> device).
    pub fn htod<T: cudarc::driver::DeviceRepr>(
        &self,
        data: &[T],
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        self.count_h2d(std::mem::size_of_val(data));
        Ok(self.stream.clone_htod(data)?)
    }

    /// `src` copied to the host (counted device -> host; the copy synchronises the stream).
    pub fn dtoh<T: cudarc::driver::DeviceRepr, S: cudarc::driver::DevicePtr<T>>(
        &self,
        src: &S,
    ) -> Result<Vec<T>> {
        self.count_d2h(src.len() * std::mem::size_of::<T>());
        Ok(self.stream.clone_dtoh(src)?)
    }

    /// Waits for all queued work and reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::Cuda(format!("stream synchronize: {e}")))
    }

    /// Loads (once) the module of kernel family `family`: the CUBIN on sm_90, else the PTX,
    /// else the source compiled now with the NVRTC found on this machine.
    pub fn module(&self, family: &'static str) -> Result<Arc<CudaModule>> {
        let mut cache = self.modules.lock().unwrap();
        if let Some(m) = cache.get(family) {
            return Ok(m.clone());
        }
        let k = embedded::get(family)
            .ok_or_else(|| Error::Cuda(format!("no embedded kernel family {family:?}")))?;
        let image = if let (Some(cubin), (9, 0)) = (k.cubin, self.cc) {
            cudarc::nvrtc::Ptx::from_binary(cubin.to_vec())
        } else if let Some(ptx) = k.ptx {
            cudarc::nvrtc::Ptx::from_src(ptx)
        } else {
            compile_at_run_time(k, self.cc)?
        };
        let m = self
            .ctx
            .load_module(image)
            .map_err(|e| Error::Cuda(format!("loading kernels/{family}.cu: {e}")))?;
        cache.insert(family, m.clone());
        Ok(m)
    }

    /// The kernel `func` of family `family`, cached.
    pub fn function(&self, family: &'static str, func: &str) -> Result<CudaFunction> {
        let key = (family, func.to_string());
        if let Some(f) = self.functions.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let f = self
            .module(family)?
            .load_function(func)
            .map_err(|e| Error::Cuda(format!("kernels/{family}.cu has no kernel {func}: {e}")))?;
        self.functions.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// Opts `func` into `bytes` of dynamic shared memory (needed above 48 KiB).
    ///
    /// The attribute belongs to the function, which every thread shares through the function
    /// cache, so it only ever grows: lowering it for a small launch would fail another thread's
    /// larger launch between its own opt-in and its launch (CUDA_ERROR_INVALID_VALUE, seen on an
    /// H200 with parallel tests).
    pub fn set_dynamic_smem(&self, func: &CudaFunction, bytes: u32) -> Result<()> {
        use cudarc::driver::sys::CUfunction_attribute as A;
        if bytes > self.max_smem_optin {
            return Err(Error::Invalid(format!(
                "kernel needs {bytes} bytes of shared memory; this GPU allows {}",
                self.max_smem_optin
            )));
        }
        let mut set = self.smem_optin.lock().unwrap();
        let now = set.entry(func.cu_function() as usize).or_insert(0);
        if bytes > *now {
            // cuFuncSetAttribute is a raw call (cudarc does not bind the context for it).
            self.make_current()?;
            func.set_attribute(
                A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| Error::Cuda(format!("set max dynamic shared memory: {e}")))?;
            *now = bytes;
        }
        Ok(())
    }

    /// Starts a launch of `func` on this device's stream (push the arguments with
    /// `cudarc::driver::PushKernelArg::arg`, then [`CudaDevice::launch`]).
    pub fn launch_builder<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            args: self.stream.launch_builder(func),
            func,
            sizes: Vec::new(),
        }
    }

    /// True when this device is the emulated CUDA driver (tools/cuda-emu), found by its own
    /// entry points in the loaded libcuda (not by `DFPO_EMU`).
    pub fn is_emulated(&self) -> bool {
        emu::hooks().is_some()
    }

    /// On the emulated driver: runs only blocks `ids` (linear block ids, `x + y·gx + z·gx·gy`)
    /// of every launch while the guard lives (a launch whose grid lacks one of them fails), so a
    /// test can launch a real-size grid and run the blocks whose output it checks. `None` on a
    /// real GPU, which runs every block.
    pub fn emu_only_blocks(&self, ids: &[u64]) -> Option<emu::OnlyBlocks> {
        emu::only_blocks(ids)
    }

    /// On the emulated driver: runs the blocks of every launch in `order` while the guard lives
    /// (results that depend on the block order then differ between orders). `None` on a real
    /// GPU, whose block order is the hardware's.
    pub fn emu_block_order(&self, order: emu::BlockOrder) -> Option<emu::OrderGuard> {
        emu::block_order(order)
    }

    /// Launches and checks: a launch error names the kernel; with `DFPO_SYNC_LAUNCH=1` the
    /// stream is synchronised so an error inside the kernel is named too.
    ///
    /// # Safety
    /// The arguments pushed on `args` must match the kernel's signature, and every buffer
    /// must be large enough for the indices the kernel computes from the launch config.
    pub unsafe fn launch(&self, name: &str, mut args: Launch<'_>, cfg: LaunchConfig) -> Result<()> {
        // Only the emulated driver can compare the pushed sizes with the kernel's signature;
        // on a real GPU this is a no-op.
        emu::check_param_sizes(args.func.cu_function() as *mut _, &args.sizes)
            .map_err(|e| Error::Cuda(format!("launching {name}: {e}")))?;
        if !check_launch(name, &cfg)? {
            return Ok(()); // empty problem: nothing to launch
        }
        args.args
            .launch(cfg)
            .map_err(|e| Error::Cuda(format!("launching {name} {cfg:?}: {e}")))?;
        if self.sync_launch {
            self.stream
                .synchronize()
                .map_err(|e| Error::Cuda(format!("{name} failed: {e}")))?;
        }
        Ok(())
    }
}

/// A kernel launch being built: cudarc's [`LaunchArgs`] plus the byte size of every argument
/// pushed (cudarc hands the driver only a `void**`). [`CudaDevice::launch`] gives the sizes to
/// the emulated driver, which checks them against the kernel's signature; a real GPU ignores
/// them. Arguments are pushed as with cudarc: device buffers (`CudaSlice`, `CudaView`,
/// `CudaViewMut`: an 8-byte device pointer) and [`KernelValue`]s by reference.
pub struct Launch<'a> {
    args: LaunchArgs<'a>,
    func: &'a CudaFunction,
    sizes: Vec<u32>,
}

impl Launch<'_> {
    /// The byte size of each argument pushed so far, in order.
    pub fn param_sizes(&self) -> &[u32] {
        &self.sizes
    }

    fn pushed(&mut self, bytes: usize) -> &mut Self {
        self.sizes.push(bytes as u32);
        self
    }
}

/// A type passed to a kernel by value: its size is the size of the kernel parameter it fills.
/// Implemented for the scalars, arrays of them, and the crate's `#[repr(C)]` argument
/// structs.
///
/// # Safety
/// As [`DeviceRepr`]: the type has the layout of the kernel's parameter type.
pub unsafe trait KernelValue: DeviceRepr {}

macro_rules! kernel_values {
    ($($t:ty),*) => { $(
        // SAFETY: plain scalars, as cudarc's DeviceRepr.
        unsafe impl KernelValue for $t {}
    )* };
}
kernel_values!(bool, i8, i16, i32, i64, isize, u8, u16, u32, u64, usize, f32, f64);
// SAFETY: an array of kernel values is one by-value parameter of N elements.
unsafe impl<T: KernelValue, const N: usize> KernelValue for [T; N] {}

// SAFETY (all impls below): each forwards to cudarc's impl for the same argument type, which
// pushes the same pointer; only the recorded size is added.
unsafe impl<'a, 'b: 'a, T: KernelValue> PushKernelArg<&'b T> for Launch<'a> {
    fn arg(&mut self, arg: &'b T) -> &mut Self {
        self.args.arg(arg);
        self.pushed(std::mem::size_of::<T>())
    }
}

const DEVICE_PTR: usize = std::mem::size_of::<cudarc::driver::sys::CUdeviceptr>();

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaSlice<T>) -> &mut Self {
        self.args.arg(arg);
        self.pushed(DEVICE_PTR)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut CudaSlice<T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaSlice<T>) -> &mut Self {
        self.args.arg(arg);
        self.pushed(DEVICE_PTR)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b CudaView<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b CudaView<'c, T>) -> &mut Self {
        self.args.arg(arg);
        self.pushed(DEVICE_PTR)
    }
}

unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b mut CudaViewMut<'c, T>> for Launch<'a> {
    fn arg(&mut self, arg: &'b mut CudaViewMut<'c, T>) -> &mut Self {
        self.args.arg(arg);
        self.pushed(DEVICE_PTR)
    }
}

fn compile_at_run_time(k: &embedded::EmbeddedKernel, cc: (i32, i32)) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only dlopens libnvrtc by name.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda(format!(
            "kernels/{}.cu was not compiled at build time and libnvrtc is not on this machine \
             (rebuild after tools/setup-cuda-tools, or add the CUDA 13.0 lib64 to LD_LIBRARY_PATH)",
            k.name
        )));
    }
    let arch: &'static str = match cc {
        (9, 0) => "sm_90",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        _ => "compute_80",
    };
    // The CUDA headers (cuda_bf16.h, mma.h) of the toolkit this NVRTC belongs to.
    let include_paths = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(["/usr/local/cuda".to_string()])
        .map(|root| format!("{root}/include"))
        .filter(|inc| std::path::Path::new(inc).join("cuda_bf16.h").exists())
        .take(1)
        .collect();
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        include_paths,
        options: vec!["--std=c++17".into(), "-lineinfo".into()],
        name: Some(format!("{}.cu", k.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(k.source, opts).map_err(|e| {
        Error::Cuda(format!(
            "run-time NVRTC compile of kernels/{}.cu: {e}",
            k.name
        ))
    })
}

/// The launch limits of every GPU we run on (compute capability 7.0 and later).
pub mod limits {
    /// Threads per block.
    pub const MAX_THREADS: u32 = 1024;
    /// Block z dimension.
    pub const MAX_BLOCK_Z: u32 = 64;
    /// Grid x dimension.
    pub const MAX_GRID_X: u32 = i32::MAX as u32;
    /// Grid y and z dimensions.
    pub const MAX_GRID_YZ: u32 = 65535;
}

/// Checks a launch configuration against the CUDA limits before it reaches the driver:
/// `Ok(false)` for an empty grid (some dimension 0: nothing to launch), `Ok(true)` for a valid
/// one, and `Error::Shape` naming the kernel for an empty block or one past a limit (a bug in
/// the launcher, which the driver would report as an opaque CUDA_ERROR_INVALID_VALUE).
pub fn check_launch(name: &str, cfg: &LaunchConfig) -> Result<bool> {
    use limits::*;
    let (gx, gy, gz) = cfg.grid_dim;
    let (bx, by, bz) = cfg.block_dim;
    let threads = bx as u64 * by as u64 * bz as u64;
    if threads == 0 || threads > MAX_THREADS as u64 || bz > MAX_BLOCK_Z {
        return Err(Error::Shape(format!(
            "launching {name}: block {:?} ({threads} threads) outside the CUDA limits \
             (1..={MAX_THREADS} threads, z <= {MAX_BLOCK_Z})",
            cfg.block_dim
        )));
    }
    if gx > MAX_GRID_X || gy > MAX_GRID_YZ || gz > MAX_GRID_YZ {
        return Err(Error::Shape(format!(
            "launching {name}: grid {:?} exceeds the CUDA limits (x <= {MAX_GRID_X}, y and z \
             <= {MAX_GRID_YZ})",
            cfg.grid_dim
        )));
    }
    Ok(gx != 0 && gy != 0 && gz != 0)
}

/// Grid size for `n` work items in blocks of `block` threads.
/// Saturates at `u32::MAX`, which [`check_launch`] then rejects (never a silently truncated
/// grid).
pub fn blocks_for(n: usize, block: u32) -> u32 {
    u32::try_from(n.div_ceil(block as usize)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: 0,
        }
    }

    #[test]
    fn an_empty_grid_in_any_dimension_is_skipped() {
        for g in [(0, 1, 1), (4, 0, 1), (4, 2, 0), (0, 0, 0)] {
            assert!(!check_launch("k", &cfg(g, (128, 1, 1))).unwrap(), "{g:?}");
        }
        assert!(check_launch("k", &cfg((1, 1, 1), (1, 1, 1))).unwrap());
        assert!(check_launch("k", &cfg((i32::MAX as u32, 65535, 65535), (1024, 1, 1))).unwrap());
    }

    #[test]
    fn limits_are_errors_naming_the_kernel() {
        for (g, b) in [
            ((1, 1, 1), (0, 1, 1)),
            ((1, 1, 1), (128, 0, 1)),
            ((1, 1, 1), (32, 8, 0)),
            ((1, 1, 1), (1025, 1, 1)),
            ((1, 1, 1), (32, 33, 1)),
            ((1, 1, 1), (1, 1, 65)),
            ((1 << 31, 1, 1), (128, 1, 1)),
            ((1, 65536, 1), (128, 1, 1)),
            ((1, 1, 65536), (128, 1, 1)),
            ((0, 65536, 1), (128, 1, 1)),
        ] {
            let e = check_launch("my_kernel", &cfg(g, b))
                .unwrap_err()
                .to_string();
            assert!(e.contains("my_kernel"), "{g:?} {b:?}: {e}");
        }
    }

    #[test]
    fn blocks_for_saturates_instead_of_wrapping() {
        assert_eq!(blocks_for(0, 256), 0);
        assert_eq!(blocks_for(257, 256), 2);
        // 65536 rows x 151936 logits (Qwen2-0.5B, 64 x 1024 tokens) in blocks of 256.
        assert_eq!(blocks_for(65536 * 151936, 256), 38_895_616);
        assert_eq!(blocks_for(1 << 50, 32), u32::MAX);
        let e = check_launch("k", &cfg((blocks_for(1 << 50, 32), 1, 1), (32, 1, 1)));
        assert!(e.is_err());
    }
}
