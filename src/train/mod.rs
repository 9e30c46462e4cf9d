//! The DFPO trainer: configuration, optimizer, rollouts, the training step and its baselines.

pub mod config;
pub mod metrics;
pub mod optim;
pub mod rollout;
pub mod sft;
pub mod trainer;
