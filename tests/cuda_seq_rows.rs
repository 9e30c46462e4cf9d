//! A decoder graph's batch gathered from the step's token rows (`SeqRows`,
//! `DecoderGraph::set_batch_rows`; on CUDA the `step_seq_rows` kernel of kernels/step.cu, issue
//! 11 item 4: the step's ids go up once, each graph batch is gathered on the device) against
//! the host batch (`set_batch_masked` of the same rows): ids, targets and lengths equal word for
//! word, with and without the prompt mask, for row lists that are a contiguous run (no list
//! uploaded), a run then empty rows, a permutation, repeated rows, empty rows in the middle,
//! fewer rows than B and none at all; rows of length 0, 1 and S, prompt lengths 0, inside and
//! past the row. The graph's inputs are poisoned before every gather. Bad row lists, rows longer
//! than S and tokens outside the vocabulary are errors.
//! The CPU test always runs; the CUDA one is ignored without a GPU (`DFPO_REQUIRE_CUDA=1` makes a
//! missing GPU a failure).

mod common;

use common::Rng;
use dfpo::model::decoder::{Decoder, DecoderGraph, SeqRows};
use dfpo::Device;

const POISON: u32 = 0xDEAD_BEEF;

/// `n` random rows of 0..=s tokens below `v` (lengths 0, 1 and s always among them) and prompt
/// lengths from 0 to past the row's end.
fn random_rows(rng: &mut Rng, n: usize, s: usize, v: usize) -> (Vec<Vec<u32>>, Vec<usize>) {
    let seqs: Vec<Vec<u32>> = (0..n)
        .map(|i| {
            let len = match i {
                0 => s,
                1 => 1,
                2 => 0,
                _ => (rng.next_u64() % (s as u64 + 1)) as usize,
            };
            (0..len)
                .map(|_| (rng.next_u64() % v as u64) as u32)
                .collect()
        })
        .collect();
    let skip = seqs
        .iter()
        .map(|q| (rng.next_u64() % (q.len() as u64 + 3)) as usize)
        .collect();
    (seqs, skip)
}

fn read_batch(g: &DecoderGraph) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (ids, targets, lens) = g.batch_inputs();
    let sess = g.session();
    (
        sess.read::<u32>(ids).unwrap(),
        sess.read::<u32>(targets).unwrap(),
        sess.read::<u32>(lens).unwrap(),
    )
}

fn poison(g: &mut DecoderGraph) {
    let (b, s) = g.shape();
    let (ids, targets, lens) = g.batch_inputs();
    let sess = g.session_mut();
    sess.write(ids, &vec![POISON; b * s]).unwrap();
    sess.write(targets, &vec![POISON; b * s]).unwrap();
    sess.write(lens, &vec![POISON; b]).unwrap();
}

/// The gathered batch of every row list equals the host batch of the same rows.
fn check(device: Device, test: &str) {
    let dir = common::tiny_model("dfpo-seq-rows", 7);
    let dec = Decoder::load(&dir).unwrap();
    let v = dec.config.vocab_size;
    let (b, s) = (5, 13);
    let mut g = dec.build(b, s, &device).unwrap();
    let mut rng = Rng::fresh(test);
    let n = 9;
    let (seqs, skip) = random_rows(&mut rng, n, s, v);
    let src = SeqRows::new(&device, &seqs, &skip).unwrap();
    assert_eq!(src.rows(), n);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let lists: Vec<Vec<Option<usize>>> = vec![
        (0..5).map(Some).collect(),
        vec![Some(4), Some(5), Some(6), None, None],
        perm[..5].iter().map(|&r| Some(r)).collect(),
        vec![Some(2), Some(2), None, Some(8), Some(1)],
        vec![Some(0), None, Some(1)],
        vec![Some(6), Some(7)],
        vec![None; 5],
        vec![],
    ];
    for rows in &lists {
        for masked in [true, false] {
            poison(&mut g);
            g.set_batch_rows(&src, rows, masked).unwrap();
            let got = read_batch(&g);
            let got_lens = g.seq_lens().to_vec();
            let (hs, hk): (Vec<Vec<u32>>, Vec<usize>) = rows
                .iter()
                .map(|r| match r {
                    Some(r) => (seqs[*r].clone(), if masked { skip[*r] } else { 0 }),
                    None => (Vec::new(), 0),
                })
                .unzip();
            poison(&mut g);
            g.set_batch_masked(&hs, &hk).unwrap();
            let want = read_batch(&g);
            let what = format!("rows {rows:?}, masked {masked}");
            assert_eq!(got.0, want.0, "{what}: ids");
            assert_eq!(got.1, want.1, "{what}: targets");
            assert_eq!(got.2, want.2, "{what}: lengths");
            assert_eq!(got_lens, g.seq_lens(), "{what}: host lengths");
            // Not all padding: some row has a target past its prompt.
            let first = |r: usize| if masked { skip[r].max(1) } else { 1 };
            if rows.iter().flatten().any(|&r| first(r) < seqs[r].len()) {
                assert!(got
                    .1
                    .iter()
                    .any(|&t| t != dfpo::model::decoder::IGNORE_INDEX));
            }
        }
    }
    // Bad lists are errors, and leave no panic behind.
    let e = g.set_batch_rows(&src, &[Some(n)], true).unwrap_err();
    assert!(e.to_string().contains("row 9"), "{e}");
    let e = g.set_batch_rows(&src, &[Some(0); 6], true).unwrap_err();
    assert!(
        e.to_string().contains("6 sequences for a batch of 5"),
        "{e}"
    );
    let long = SeqRows::new(&device, &[vec![1; s + 1]], &[0]).unwrap();
    let e = g.set_batch_rows(&long, &[Some(0)], true).unwrap_err();
    assert!(e.to_string().contains("more than S = 13"), "{e}");
    let bad = SeqRows::new(&device, &[vec![1, v as u32, 2]], &[1]).unwrap();
    let e = g.set_batch_rows(&bad, &[Some(0)], false).unwrap_err();
    assert!(e.to_string().contains("not below vocab_size"), "{e}");
    assert!(SeqRows::new(&device, &[vec![1]], &[]).is_err());
    // No rows at all: an empty source binds empty batches.
    let none = SeqRows::new(&device, &[], &[]).unwrap();
    poison(&mut g);
    g.set_batch_rows(&none, &[None, None], true).unwrap();
    let (ids, targets, lens) = read_batch(&g);
    assert!(lens.iter().all(|&l| l == 0), "{lens:?}");
    let pad = dec.config.pad_token_id.unwrap_or(0);
    assert!(ids.iter().all(|&t| t == pad), "{ids:?}");
    assert!(targets
        .iter()
        .all(|&t| t == dfpo::model::decoder::IGNORE_INDEX));
}

#[test]
fn seq_rows_on_the_cpu_match_the_host_batch() {
    check(Device::Cpu, "seq_rows_cpu");
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_seq_rows_match_the_host_batch() {
    let Some(dev) = dfpo::device::cuda_for_test("cuda_seq_rows_match_the_host_batch") else {
        return;
    };
    check(Device::Cuda(dev), "cuda_seq_rows");
}
