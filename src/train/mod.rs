//! The DFPO trainer: configuration, optimizer, rollouts, the training step and its baselines.

pub mod calibration;
pub mod config;
pub mod eval;
pub mod heads;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod rollout;
pub mod sft;
pub mod step_ops;
pub mod trainer;
