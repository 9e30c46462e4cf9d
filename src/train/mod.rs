//! The DFPO trainer: configuration, optimizer, rollouts, the training step and its baselines.

pub mod calibration;
pub mod config;
pub mod eval;
pub mod export;
pub mod heads;
pub mod interrupt;
pub mod metrics;
pub mod models;
pub mod noise;
pub mod optim;
pub mod reward_cmd;
pub mod rollout;
pub mod run_dir;
pub mod sft;
pub mod stages;
pub mod step_ops;
pub mod trainer;
