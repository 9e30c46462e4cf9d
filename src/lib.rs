//! dfpo: DFPO (distributional value-flow PPO) for LLM post-training.
//!
//! - [`device`]: the CPU / CUDA device layer (no panic without a driver or GPU).
//! - [`kernels`]: one module per `kernels/*.cu` family: the CPU reference and the CUDA launcher.
//! - [`graph`]: the small static graph runtime (tensors, nodes, arena planner, executor).

pub mod demo;
pub mod device;
pub mod error;
pub mod graph;
pub mod kernels;
pub mod model;
pub mod task;
pub mod train;

pub use device::Device;
pub use error::{Error, Result};
