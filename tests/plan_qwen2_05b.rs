//! The graph planner at a real size: a Qwen2-0.5B-shape training step (64 sequences × 1024
//! tokens, vocabulary 151936, 24 layers, hidden 896, 14 / 2 heads, intermediate 4864, tied
//! embeddings) on CUDA (bf16 activations and parameters, fp32 gradients), planned without a
//! device or the weights. The planned arena + parameters + the device optimizer's fp32 master
//! weights and Adam moments must fit an 80 GB card.

use dfpo::graph::ops::MseLoss;
use dfpo::graph::Plan;
use dfpo::model::checkpoint::expected_tensors;
use dfpo::model::config::ModelConfig;
use dfpo::model::decoder::{BuildOptions, Decoder, HeadOut, LmHeadMode};
use dfpo::model::ops::Linear;

const QWEN2_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "intermediate_size": 4864,
  "max_position_embeddings": 32768,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

const GB: f64 = 1e9;
/// The card: 80 GB (decimal; an H100 80GB holds 85.0e9 B, so this leaves ~5 GB for the CUDA
/// context, cuBLAS workspaces and the rollout's KV cache).
const CARD: usize = 80_000_000_000;
const B: usize = 64;
const S: usize = 1024;

fn config() -> ModelConfig {
    ModelConfig::from_json_str(QWEN2_05B, "qwen2-0.5b config").unwrap()
}

/// The policy-shaped plan (the NLL head stands for the actor loss: both are O(tokens)).
fn policy(lm_head: LmHeadMode, recompute_layers: bool) -> Plan {
    let opts = BuildOptions {
        lm_head,
        recompute_layers,
    };
    let p = Decoder::plan_nll(&config(), B, S, true, 1.0, opts).unwrap();
    p.verify_packing().unwrap();
    p
}

/// A critic-shaped plan: the trunk without the LM head and a per-token scalar head (the flow
/// critic's head works on the response tokens only: small next to the trunk).
fn critic(recompute_layers: bool) -> Plan {
    let opts = BuildOptions {
        recompute_layers,
        ..Default::default()
    };
    Decoder::plan_with(&config(), B, S, true, 1.0, false, opts, |g, t| {
        let w = g.param_typed("value_head.weight", t.hidden_size, t.act);
        let value = g.node_typed(
            Linear {
                n: t.n,
                din: t.hidden_size,
                dout: 1,
            },
            &[t.hidden, w],
            &[("value", t.n, t.act)],
        )?[0];
        let target = g.input_typed("value_target", t.n, t.act);
        let loss = g.node(MseLoss, &[value, target], &[("critic_loss", 1)])?[0];
        Ok(HeadOut {
            loss,
            keep: vec![],
            params: vec![("value_head.weight".into(), w)],
        })
    })
    .unwrap()
}

fn gb(x: usize) -> String {
    format!("{:.2} GB", x as f64 / GB)
}

#[test]
fn qwen2_05b_step_fits_80gb() {
    let params: usize = expected_tensors(&config())
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(params, 494_032_768, "Qwen2-0.5B parameter count");
    let optim = 12 * params; // the device AdamW: fp32 master weights + two moments
    let (n, v) = (B * S, 151_936usize);
    let chunked = BuildOptions::default().lm_head;

    let unfused = policy(LmHeadMode::Logits, false);
    let fused = policy(chunked, false);
    let re = policy(chunked, true);
    let total = |p: &Plan| p.arena_bytes() + p.persistent_bytes() + optim;
    for (what, p) in [
        ("unfused head", &unfused),
        ("chunked head", &fused),
        ("chunked head + recomputed layers", &re),
    ] {
        eprintln!(
            "qwen2-0.5b {B}x{S} policy, {what}: arena {} + parameters/inputs {} + optimizer {} = {}",
            gb(p.arena_bytes()),
            gb(p.persistent_bytes()),
            gb(optim),
            gb(total(p))
        );
    }
    // The unfused head holds the bf16 logits and their gradient at once (2 x 19.9 GB); the
    // chunked one never does.
    let logits = n * v * 2;
    assert!(unfused.arena_bytes() >= 2 * logits);
    assert!(fused.arena_bytes() + 2 * logits <= unfused.arena_bytes() + (1 << 30));
    // The step fits with per-layer recomputation: the policy alone, and the three models of a
    // DFPO run (policy, critic, reference; each its own arena) together.
    assert!(total(&re) <= CARD, "policy {}", gb(total(&re)));
    let c = critic(true);
    let reference = re.arena_bytes() + re.persistent_bytes(); // no optimizer
    let all = total(&re) + c.arena_bytes() + c.persistent_bytes() + optim + reference;
    eprintln!(
        "qwen2-0.5b {B}x{S} with recomputed layers: critic arena {}, policy + critic + reference {}",
        gb(c.arena_bytes()),
        gb(all)
    );
    assert!(all <= CARD, "policy + critic + reference {}", gb(all));
}
