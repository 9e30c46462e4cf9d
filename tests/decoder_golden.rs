//! Decoder golden parity with transformers (CPU, fp32), on the committed tiny fixtures.
//!
//! Truth: `golden.safetensors` of each fixture, written by `tools/reference/make_tiny_models.py`
//! (transformers in float64 on the stored weights): logits, per-token log-probs, the mean
//! next-token NLL and the gradient of EVERY parameter for a right-padded batch of 2.
//!
//! Tolerances (fp32 here against f64 there):
//! - logits at valid positions: |diff| ≤ 1e-4·max|logit| + 1e-4·|want|;
//! - token log-probs (valid targets): |diff| ≤ 1e-4 + 1e-4·|want|; masked entries exactly 0;
//! - loss: relative 1e-5;
//! - each parameter gradient: max|diff| ≤ 1e-4·max|want| (+ 1e-3·|want| elementwise), so a
//!   wrong sign, a missed term or a wrong layout fails while fp32 rounding passes.
//! - The sharded fixture holds tiny-llama's weights saved as F16 in 4 shards; tiny-llama's
//!   weights are bf16 values that F16 represents exactly here, so it must match the tiny-llama
//!   golden at the same tight tolerances (measured worst gradient error: 1.2e-6·max|want|).

mod common;

use std::collections::BTreeMap;

use common::assert_close;
use dfpo::model::checkpoint::{read_safetensors_any, AnyTensor};
use dfpo::model::decoder::{BuildOptions, Decoder, DecoderGraph, LmHeadMode};
use dfpo::model::lm_head::LmHeadXent;
use dfpo::Device;

struct Golden {
    t: BTreeMap<String, AnyTensor>,
}

impl Golden {
    fn load(model: &str) -> Self {
        let p = common::fixtures_dir()
            .join(model)
            .join("golden.safetensors");
        Golden {
            t: read_safetensors_any(p).unwrap(),
        }
    }
    fn float(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        match &self.t[name] {
            AnyTensor::Float(t) => (t.shape.clone(), t.data.clone()),
            _ => panic!("{name} is not float"),
        }
    }
    fn int(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        match &self.t[name] {
            AnyTensor::Int(t) => (t.shape.clone(), t.data.clone()),
            _ => panic!("{name} is not int"),
        }
    }
    /// The batch as sequences (valid tokens only) and T.
    fn batch(&self) -> (Vec<Vec<u32>>, usize) {
        let (shape, ids) = self.int("input_ids");
        let (_, mask) = self.int("attention_mask");
        let (b, t) = (shape[0], shape[1]);
        let seqs = (0..b)
            .map(|i| {
                (0..t)
                    .filter(|&j| mask[i * t + j] != 0)
                    .map(|j| ids[i * t + j] as u32)
                    .collect::<Vec<u32>>()
            })
            .collect::<Vec<_>>();
        for (i, s) in seqs.iter().enumerate() {
            // Right padding: the valid tokens are a prefix.
            assert!((0..s.len()).all(|j| mask[i * t + j] != 0), "right padding");
        }
        (seqs, t)
    }
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()))
}

/// Checks `model` against the golden of `golden_of`; `f16` selects the F16-rounded tolerances.
/// Three graphs: the unfused LM head with readable logits, the chunked one at its default budget
/// (one chunk here), and the chunked one at 3 rows a chunk (several chunks, the last one short)
/// with every layer recomputed in the backward.
fn check(model: &str, golden_of: &str, f16: bool) {
    let mut dec = Decoder::load(common::fixtures_dir().join(model)).unwrap();
    let row = LmHeadXent::row_bytes(dec.config.vocab_size, false);
    for (lm_head, recompute_layers) in [
        (LmHeadMode::Logits, false),
        (BuildOptions::default().lm_head, false),
        (
            LmHeadMode::Chunked {
                scratch_bytes: 3 * row + row / 2,
            },
            true,
        ),
    ] {
        dec.set_build_options(BuildOptions {
            lm_head,
            recompute_layers,
        });
        check_graph(&dec, model, golden_of, f16);
    }
}

fn check_graph(dec: &Decoder, model: &str, golden_of: &str, f16: bool) {
    let gold = Golden::load(golden_of);
    let (seqs, t) = gold.batch();
    let b = seqs.len();
    let mut g = dec.build(b, t, &Device::Cpu).unwrap();
    g.set_batch(&seqs).unwrap();
    let loss = g.run().unwrap();
    let v = dec.config.vocab_size;
    let model = &format!("{model} ({:?})", dec.build_options());

    // Logits at valid positions (the chunked head never forms them: reading is an error).
    let (lshape, want_logits) = gold.float("logits");
    assert_eq!(lshape, vec![b, t, v]);
    if dec.build_options().lm_head != LmHeadMode::Logits {
        let e = g.logits().unwrap_err().to_string();
        assert!(e.contains("chunked LM head"), "{e}");
    } else {
        check_logits(&g, model, &seqs, t, v, &want_logits, f16);
    }

    // Per-token log-probs.
    let (_, want_lp) = gold.float("token_logprobs");
    let (_, lmask) = gold.int("logprob_mask");
    let lp = g.token_logprobs().unwrap();
    let mut got_lp = Vec::new();
    for i in 0..b {
        for j in 0..t - 1 {
            let x = lp[i * t + j];
            if lmask[i * (t - 1) + j] == 0 {
                assert_eq!(x, 0.0, "{model}: log-prob [{i}][{j}] has no target");
            }
            got_lp.push(x);
        }
    }
    let (la, lr) = if f16 { (5e-2, 5e-2) } else { (1e-4, 1e-4) };
    assert_close(
        &format!("{model} token_logprobs"),
        &got_lp,
        &want_lp,
        lr,
        la,
    );

    // Loss.
    let want_loss = gold.float("loss").1[0] as f64;
    let rel = (loss as f64 - want_loss).abs() / want_loss.abs();
    let ltol = if f16 { 1e-2 } else { 1e-5 };
    assert!(
        rel <= ltol,
        "{model} loss {loss} want {want_loss} (rel {rel:.2e})"
    );
    assert_eq!(g.loss().unwrap(), loss);

    // Every parameter's gradient.
    let mut n = 0;
    for name in g.param_names().map(str::to_string).collect::<Vec<_>>() {
        let (_, want) = gold.float(&format!("grad.{name}"));
        let got = g.grad(&name).unwrap();
        let m = max_abs(&want);
        assert!(m > 0.0, "{name}: the golden gradient is all zero");
        let (a, r) = if f16 {
            (5e-2 * m, 0.0)
        } else {
            (1e-4 * m, 1e-3)
        };
        assert_close(&format!("{model} d({name})"), &got, &want, r, a);
        n += 1;
    }
    let n_golden = gold.t.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(n, n_golden, "{model}: every golden gradient is checked");

    // A second run (gradients are zeroed, not accumulated across runs) and a forward-only run
    // give the same numbers.
    let g1 = g.grad("model.norm.weight").unwrap();
    assert_eq!(g.run().unwrap(), loss);
    assert_eq!(g.grad("model.norm.weight").unwrap(), g1);
    g.forward().unwrap();
    assert_eq!(g.loss().unwrap(), loss);
    assert_eq!(g.token_logprobs().unwrap(), lp);
}

fn check_logits(
    g: &DecoderGraph,
    model: &str,
    seqs: &[Vec<u32>],
    t: usize,
    v: usize,
    want_logits: &[f32],
    f16: bool,
) {
    let logits = g.logits().unwrap();
    let scale = max_abs(want_logits);
    let (mut got_v, mut want_v) = (Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        let r = i * t * v..(i * t + s.len()) * v;
        got_v.extend_from_slice(&logits[r.clone()]);
        want_v.extend_from_slice(&want_logits[r]);
    }
    let (ratol, rrtol) = if f16 {
        (2e-2, 0.0)
    } else {
        (1e-4 * scale, 1e-4)
    };
    assert_close(&format!("{model} logits"), &got_v, &want_v, rrtol, ratol);
}

#[test]
fn tiny_llama_matches_transformers() {
    check("tiny-llama", "tiny-llama", false);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2", "tiny-qwen2", false);
}

#[test]
fn tiny_llama_sharded_matches_transformers() {
    check("tiny-llama-sharded", "tiny-llama", false);
}

#[test]
fn bad_batches_are_errors() {
    let dec = Decoder::load(common::fixtures_dir().join("tiny-llama")).unwrap();
    assert!(dec.build(0, 4, &Device::Cpu).is_err());
    let mut g = dec.build(2, 4, &Device::Cpu).unwrap();
    let e = g.set_batch(&[vec![1, 2, 3, 4, 5]]).unwrap_err().to_string();
    assert!(e.contains("more than S"), "{e}");
    let e = g
        .set_batch(&[vec![1], vec![2], vec![3]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 sequences"), "{e}");
    let e = g.set_batch(&[vec![1, 128]]).unwrap_err().to_string();
    assert!(e.contains("vocab_size"), "{e}");
    assert!(g.grad("nope").is_err());
    assert!(g.set_param("model.norm.weight", &[1.0; 3]).is_err());
}

#[test]
fn decoder_new_rejects_missing_and_misshaped_parameters() {
    let dir = common::fixtures_dir().join("tiny-llama");
    let ck = dfpo::model::checkpoint::load_checkpoint(&dir).unwrap();
    let mut t = ck.tensors.clone();
    t.remove("model.layers.1.mlp.up_proj.weight");
    let e = Decoder::new(ck.config.clone(), t)
        .err()
        .expect("missing parameter")
        .to_string();
    assert!(
        e.contains("missing parameter model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    let mut t = ck.tensors.clone();
    let w = t.get_mut("model.norm.weight").unwrap();
    w.shape = vec![w.data.len() - 1];
    w.data.pop();
    let e = Decoder::new(ck.config.clone(), t)
        .err()
        .expect("misshaped parameter")
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("shape"),
        "{e}"
    );
    assert!(Decoder::new(ck.config, ck.tensors).is_ok());
}
