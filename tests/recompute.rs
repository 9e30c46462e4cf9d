//! Per-layer activation recomputation (`BuildOptions::recompute_layers`) on the CPU: the same
//! loss, log-probs and every parameter gradient, bit for bit, as keeping the activations; the
//! schedule runs every layer's forward again before its backward; the arena shrinks.

mod common;

use dfpo::model::decoder::{BuildOptions, Decoder};
use dfpo::Device;

fn run(
    dec: &mut Decoder,
    recompute_layers: bool,
    seqs: &[Vec<u32>],
) -> (Vec<Vec<f32>>, usize, String) {
    dec.set_build_options(BuildOptions {
        recompute_layers,
        ..BuildOptions::default()
    });
    let mut g = dec.build(seqs.len(), 16, &Device::Cpu).unwrap();
    g.set_batch(seqs).unwrap();
    let loss = g.run().unwrap();
    let mut out = vec![
        vec![loss],
        g.token_logprobs().unwrap(),
        g.token_entropies().unwrap(),
    ];
    for name in g.param_names().map(str::to_string).collect::<Vec<_>>() {
        out.push(g.grad(&name).unwrap());
    }
    let plan = g.session().plan();
    plan.verify_packing().unwrap();
    (out, plan.arena_bytes(), plan.describe())
}

#[test]
fn recomputed_layers_give_the_same_gradients_in_less_memory() {
    let mut rng = common::Rng::fresh("recompute_layers");
    for model in ["tiny-llama", "tiny-qwen2"] {
        let mut dec = Decoder::load(common::fixtures_dir().join(model)).unwrap();
        let v = dec.config.vocab_size as u64;
        let seqs: Vec<Vec<u32>> = [16usize, 9, 2]
            .iter()
            .map(|&l| (0..l).map(|_| (rng.next_u64() % v) as u32).collect())
            .collect();
        let (keep, keep_arena, keep_sched) = run(&mut dec, false, &seqs);
        let (re, re_arena, re_sched) = run(&mut dec, true, &seqs);
        assert_eq!(keep.len(), re.len());
        for (i, (a, b)) in keep.iter().zip(&re).enumerate() {
            assert!(a.iter().all(|x| x.is_finite()));
            assert_eq!(a, b, "{model}: output {i} differs with recomputation");
        }
        let layers = dec.config.num_hidden_layers;
        assert!(!keep_sched.contains(" re "), "{keep_sched}");
        // Every node of every layer runs again: each layer has the same node count.
        let per_layer = re_sched.lines().filter(|l| l.contains(" re ")).count();
        assert!(per_layer > 0 && per_layer % layers == 0, "{re_sched}");
        assert!(
            re_arena < keep_arena,
            "{model}: arena {re_arena} B with recomputation, {keep_arena} B without"
        );
    }
}
