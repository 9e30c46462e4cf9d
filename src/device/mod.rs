//! The device layer: [`Device::Cpu`] or [`Device::Cuda`], the kernel module cache and the launch
//! helpers.
//!
//! Choosing a device never panics: `libcuda` is loaded dynamically, its absence and a device
//! count of zero both mean "CPU". `DFPO_DEVICE=cpu|cuda|auto` overrides the choice;
//! `DFPO_REQUIRE_CUDA=1` turns every "no GPU, skipped" of the test helpers into a failure.
//! `DFPO_SYNC_LAUNCH=1` synchronises after every launch so a faulting kernel is named at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs, LaunchConfig};

use crate::error::{Error, Result};

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
    /// The dynamic shared memory each function (by its CUfunction handle) is opted into so far.
    smem_optin: Mutex<HashMap<usize, u32>>,
    sync_launch: bool,
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
            smem_optin: Mutex::new(HashMap::new()),
            sync_launch: std::env::var("DFPO_SYNC_LAUNCH").is_ok_and(|v| v == "1"),
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
            func.set_attribute(
                A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| Error::Cuda(format!("set max dynamic shared memory: {e}")))?;
            *now = bytes;
        }
        Ok(())
    }

    /// Starts a launch of `func` on this device's stream.
    pub fn launch_builder<'a>(&'a self, func: &'a CudaFunction) -> LaunchArgs<'a> {
        self.stream.launch_builder(func)
    }

    /// Launches and checks: a launch error names the kernel; with `DFPO_SYNC_LAUNCH=1` the
    /// stream is synchronised so an error inside the kernel is named too.
    ///
    /// # Safety
    /// The arguments pushed on `args` must match the kernel's signature, and every buffer
    /// must be large enough for the indices the kernel computes from the launch config.
    pub unsafe fn launch(
        &self,
        name: &str,
        mut args: LaunchArgs<'_>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        if cfg.grid_dim.0 == 0 || cfg.block_dim.0 == 0 {
            return Ok(()); // empty problem: nothing to launch
        }
        args.launch(cfg)
            .map_err(|e| Error::Cuda(format!("launching {name} {cfg:?}: {e}")))?;
        if self.sync_launch {
            self.stream
                .synchronize()
                .map_err(|e| Error::Cuda(format!("{name} failed: {e}")))?;
        }
        Ok(())
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

/// Grid size for `n` work items in blocks of `block` threads.
pub fn blocks_for(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize) as u32
}
