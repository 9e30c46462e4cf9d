//! The emulated CUDA driver's own entry points (tools/cuda-emu), looked up by name in the libcuda
//! cudarc loaded. NVIDIA's driver has none of them: on a real GPU [`hooks`] finds nothing and
//! every caller here does nothing, so the real-GPU path is unchanged.
//!
//! - `cuemu_check_param_sizes`: cudarc hands `cuLaunchKernel` only a `void**`, so the emulator
//!   cannot see how many bytes the host pushed for each argument. [`super::Launch`] records them
//!   and [`super::CudaDevice::launch`] asks the emulator to compare them with the kernel's C++
//!   signature before launching; a mismatch is an error naming the kernel and the parameter.
//! - `cuemu_set_only_blocks`: run only some blocks of the following launches (a real-size grid
//!   of which a test checks a few rows), see [`super::CudaDevice::emu_only_blocks`].
//! - `cuemu_set_block_order`: forward, reverse or random block order of the following launches,
//!   see [`super::CudaDevice::emu_block_order`].

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

type CheckParamSizes =
    unsafe extern "C" fn(*mut c_void, *const u32, usize, *mut c_char, usize) -> c_int;
type SetOnlyBlocks = unsafe extern "C" fn(*const u64, usize) -> c_int;
type SetBlockOrder = unsafe extern "C" fn(c_int) -> c_int;

/// The emulator's entry points, all present or all absent.
pub(crate) struct Hooks {
    pub check_param_sizes: CheckParamSizes,
    pub set_only_blocks: SetOnlyBlocks,
    pub set_block_order: SetBlockOrder,
}

static HOOKS: OnceLock<Option<Hooks>> = OnceLock::new();

/// The emulator's entry points when the loaded libcuda is the emulated driver, else `None`.
/// Call only after the driver is loaded (a [`super::CudaDevice`] exists).
pub(crate) fn hooks() -> Option<&'static Hooks> {
    HOOKS
        .get_or_init(|| {
            // SAFETY: the library is already loaded (cudarc opened it to create the device);
            // each symbol, when present, is an `extern "C"` function of the signature above
            // (tools/cuda-emu/driver.cpp).
            unsafe {
                let lib = cudarc::driver::sys::culib();
                let check = lib
                    .get::<CheckParamSizes>(b"cuemu_check_param_sizes\0")
                    .ok()?;
                let only = lib.get::<SetOnlyBlocks>(b"cuemu_set_only_blocks\0").ok()?;
                let order = lib.get::<SetBlockOrder>(b"cuemu_set_block_order\0").ok()?;
                Some(Hooks {
                    check_param_sizes: *check,
                    set_only_blocks: *only,
                    set_block_order: *order,
                })
            }
        })
        .as_ref()
}

/// Block order of the emulated launches (see [`super::CudaDevice::emu_block_order`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOrder {
    /// Block 0 first.
    Forward,
    /// The last block first.
    Reverse,
    /// A random permutation per launch (seeded by `DFPO_EMU_SEED`).
    Random,
}

impl BlockOrder {
    fn code(self) -> c_int {
        match self {
            BlockOrder::Forward => 0,
            BlockOrder::Reverse => 1,
            BlockOrder::Random => 2,
        }
    }
}

/// While alive, the emulated driver runs only the chosen blocks of every launch (see
/// [`super::CudaDevice::emu_only_blocks`]); dropping it runs whole grids again.
pub struct OnlyBlocks(());

impl Drop for OnlyBlocks {
    fn drop(&mut self) {
        if let Some(h) = hooks() {
            // SAFETY: a null list clears the selection.
            unsafe { (h.set_only_blocks)(std::ptr::null(), 0) };
        }
    }
}

/// While alive, the emulated driver runs blocks in the chosen order; dropping it restores the
/// order of `DFPO_EMU_BLOCK_ORDER`.
pub struct OrderGuard(());

impl Drop for OrderGuard {
    fn drop(&mut self) {
        if let Some(h) = hooks() {
            // SAFETY: -1 restores the environment's order.
            unsafe { (h.set_block_order)(-1) };
        }
    }
}

pub(crate) fn only_blocks(ids: &[u64]) -> Option<OnlyBlocks> {
    let h = hooks()?;
    // SAFETY: `ids` is a valid slice; the emulator copies it.
    unsafe { (h.set_only_blocks)(ids.as_ptr(), ids.len()) };
    Some(OnlyBlocks(()))
}

pub(crate) fn block_order(order: BlockOrder) -> Option<OrderGuard> {
    let h = hooks()?;
    // SAFETY: plain integer argument.
    unsafe { (h.set_block_order)(order.code()) };
    Some(OrderGuard(()))
}

/// `Err(message)` when the emulator reports that `sizes` (bytes per pushed argument) do not
/// match the signature of the kernel behind `func` (a `CUfunction`); `Ok` otherwise, and always
/// on a real GPU.
pub(crate) fn check_param_sizes(func: *mut c_void, sizes: &[u32]) -> Result<(), String> {
    let Some(h) = hooks() else {
        return Ok(());
    };
    let mut err = [0 as c_char; 512];
    // SAFETY: valid slice and buffer; the emulator writes a NUL-terminated message into `err`.
    let ok = unsafe {
        (h.check_param_sizes)(
            func,
            sizes.as_ptr(),
            sizes.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if ok == 1 {
        return Ok(());
    }
    // SAFETY: NUL-terminated by snprintf.
    let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
    Err(msg.to_string_lossy().into_owned())
}
