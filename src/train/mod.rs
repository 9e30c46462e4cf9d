//! The DFPO trainer: configuration, optimizer, rollouts, the training step and its baselines.

pub mod config;
pub mod eval;
pub mod optim;
pub mod sft;
