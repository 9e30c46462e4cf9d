//! Stage 2, the rewards: each row scored by the task's checker or by the `reward.command`
//! program, with the reward noise models applied (the step trains on the noisy reward; the
//! clean one is a metric) and the rows whose answer the checker could not read flagged.

use std::sync::Mutex;

use super::rollout::Generated;
use crate::error::{Error, Result};
use crate::task::{TaskData, Verdict};
use crate::train::config::RewardConfig;
use crate::train::noise;
use crate::train::reward_cmd::{Request, RewardCommand};
use crate::train::rollout::{Batch, Stream};

/// Scores the rows of step `step`'s rollout (`task`: its training examples and checker) and
/// returns the complete batch.
pub fn score(
    gen: Generated,
    task: &TaskData,
    r: &RewardConfig,
    command: Option<&Mutex<RewardCommand>>,
    seed: u64,
    step: u64,
) -> Result<Batch> {
    let Generated { mut batch, prompts } = gen;
    let examples: Vec<&crate::task::Example> = batch
        .group
        .iter()
        .map(|&g| &task.train[prompts[g]])
        .collect();
    let mut noise = Stream::new(seed, step, "reward");
    // reward.command: the external program's rewards replace the checker's.
    let replies = match command {
        Some(cmd) => {
            let reqs: Vec<Request> = examples
                .iter()
                .zip(&batch.texts)
                .map(|(ex, text)| Request {
                    prompt: &ex.prompt,
                    response: text,
                    answer: &ex.answer,
                })
                .collect();
            let mut cmd = cmd
                .lock()
                .map_err(|_| Error::Invalid("reward.command: a previous call panicked".into()))?;
            Some(cmd.score(&reqs)?)
        }
        None => None,
    };
    for (j, (ex, text)) in examples.iter().zip(&batch.texts).enumerate() {
        let (ok, unparsed, clean, noisy) = match &replies {
            Some(rep) => {
                let mid = 0.5 * (r.correct + r.incorrect);
                let ok = rep[j].correct.unwrap_or(rep[j].reward > mid);
                let noisy = rep[j].reward + noise::additive_noise(r, &mut noise);
                (ok, false, rep[j].reward, noisy)
            }
            None => {
                let verdict = task.checker.check(text, &ex.answer);
                let ok = verdict == Verdict::Correct;
                let clean = if ok { r.correct } else { r.incorrect };
                let unparsed = verdict == Verdict::Unparsed;
                let scored = noise::Scored {
                    correct: ok,
                    right_shape: r.partial_credit > 0.0
                        && task.checker.right_shape(text, &ex.prompt),
                    in_subset: noise::in_subset(r, &ex.prompt),
                };
                let noisy = noise::noisy_reward(scored, r, &mut noise);
                (ok, unparsed, clean, noisy)
            }
        };
        batch.unparsed.push(unparsed);
        batch.correct.push(ok);
        batch.clean.push(clean);
        batch.noisy.push(noisy);
    }
    Ok(batch)
}
