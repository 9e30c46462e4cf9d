//! CUDA parity of the device builder of the embedding backward's plan (`kernels/embed.cu`,
//! `embed::cuda::embed_plan_raw`; issue 11 item 4: the plan is no longer uploaded per batch):
//! the packed u32 array it writes must equal `EmbedBwdPlan::new`'s, bit for bit and tails
//! included, on fresh random ids: one token, sizes around the item length (63/64/65/129),
//! random Qwen2-vocabulary ids, a padding id on 90% of the tokens (split groups), all ids
//! equal, ids in descending order, vocabularies at a pass boundary, and the real batch size
//! (65536 tokens of a 151936 vocabulary). Ids `≥ v` sort as the id `v` and add nothing to the
//! table. The backward run on the device-built plan equals the run on the host plan bit for bit
//! and an f32 replay of the plan on the host. Captured in a CUDA graph, the builder replays with
//! new ids. Plan and scratch are poisoned before every build.
//! Ignored without a GPU (`DFPO_REQUIRE_CUDA=1` makes a missing GPU a failure).

mod common;

use common::{assert_close, Rng};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use dfpo::device::{cuda_for_test, CudaDevice};
use dfpo::kernels::embed::{
    self, cuda::embed_plan_passes, cuda::embed_plan_scratch_len, max_groups, max_slots, plan_len,
    EmbedBwdPlan,
};

const QWEN_V: usize = 151936;
/// Poison of plan and scratch words (the plan's tails are zeros, so not 0).
const POISON_U32: u32 = 0xDEAD_BEEF;

fn up<T: DeviceRepr>(dev: &CudaDevice, x: &[T]) -> CudaSlice<T> {
    dev.stream().clone_htod(x).unwrap()
}

fn down<T: DeviceRepr + Default + Clone>(dev: &CudaDevice, x: &CudaSlice<T>) -> Vec<T> {
    let v = dev.stream().clone_dtoh(x).unwrap();
    dev.synchronize().unwrap();
    v
}

fn ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(dev.stream());
    p
}

/// The device plan of `ids` (plan and scratch poisoned first).
fn device_plan(dev: &CudaDevice, ids: &[u32], v: usize) -> Vec<u32> {
    let n = ids.len();
    // (A zero-size allocation is an error: n = 0 gets one unused word.)
    let idd = up(dev, if n == 0 { &[0u32][..] } else { ids });
    let plan = up(dev, &vec![POISON_U32; plan_len(n)]);
    let scratch = up(dev, &vec![POISON_U32; embed_plan_scratch_len(n)]);
    // SAFETY: ids n u32, plan plan_len(n) u32, scratch embed_plan_scratch_len(n) u32; disjoint.
    unsafe {
        embed::cuda::embed_plan_raw(
            dev,
            ptr(dev, &idd),
            n,
            v,
            ptr(dev, &plan),
            ptr(dev, &scratch),
        )
        .unwrap()
    };
    down(dev, &plan)
}

/// Asserts two packed plans are equal, naming the first differing field.
fn assert_same_plan(what: &str, got: &[u32], want: &[u32], n: usize) {
    assert_eq!(got.len(), want.len(), "{what}: plan length");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let g = max_groups(n);
        let fields = [
            ("header", 4),
            ("item_id", n),
            ("item_off", n + 1),
            ("item_slot", n),
            ("perm", n),
            ("grp_id", g),
            ("grp_slot", g),
            ("grp_cnt", g),
        ];
        let (mut at, mut name, mut k) = (0, "?", 0);
        for (f, len) in fields {
            if i < at + len {
                (name, k) = (f, i - at);
                break;
            }
            at += len;
        }
        panic!(
            "{what}: plan word {i} ({name}[{k}]) is {:#x}, the host plan has {:#x} (header got \
             {:?}, want {:?})",
            got[i],
            want[i],
            &got[..4.min(got.len())],
            &want[..4.min(want.len())]
        );
    }
}

fn check_parity(dev: &CudaDevice, what: &str, ids: &[u32], v: usize) -> Vec<u32> {
    let host = EmbedBwdPlan::new(ids, v).unwrap();
    let got = device_plan(dev, ids, v);
    assert_same_plan(
        &format!("{what} (n {}, v {v})", ids.len()),
        &got,
        host.packed(),
        ids.len(),
    );
    got
}

fn random_ids(rng: &mut Rng, n: usize, v: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % v as u64) as u32).collect()
}

/// 90% of the tokens one id (e.g. padding), the rest random.
fn skewed_ids(rng: &mut Rng, n: usize, v: usize, pad: u32) -> Vec<u32> {
    (0..n)
        .map(|_| {
            if rng.uniform() < 0.9 {
                pad
            } else {
                (rng.next_u64() % v as u64) as u32
            }
        })
        .collect()
}

#[test]
fn plan_scratch_and_passes_are_functions_of_n_and_v() {
    assert_eq!(embed_plan_scratch_len(0), 4);
    assert_eq!(embed_plan_scratch_len(1), 7 + 256 + 4);
    assert_eq!(embed_plan_scratch_len(256), 7 * 256 + 256 + 4);
    assert_eq!(embed_plan_scratch_len(257), 7 * 257 + 512 + 4);
    assert_eq!(embed_plan_scratch_len(65536), 7 * 65536 + 65536 + 4);
    for (v, p) in [
        (1, 1),
        (255, 1),
        (256, 2), // the key v = 256 itself has 9 bits
        (65535, 2),
        (65536, 3),
        (QWEN_V, 3),
        (i32::MAX as usize, 4),
    ] {
        assert_eq!(embed_plan_passes(v), p, "v {v}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_plan_matches_the_host_plan() {
    let Some(dev) = cuda_for_test("cuda_embed_plan_matches_the_host_plan") else {
        return;
    };
    let mut rng = Rng::fresh("cuda_embed_plan_matches_the_host_plan");
    check_parity(&dev, "no tokens", &[], QWEN_V);
    check_parity(&dev, "one token", &random_ids(&mut rng, 1, QWEN_V), QWEN_V);
    check_parity(&dev, "one token, v 1", &[0], 1);
    for n in [63, 64, 65, 129] {
        check_parity(&dev, "random", &random_ids(&mut rng, n, QWEN_V), QWEN_V);
        // Three ids: runs longer than an item at 129 (a split id at 65 only when all equal).
        check_parity(&dev, "few ids", &random_ids(&mut rng, n, 3), 3);
        let p = check_parity(&dev, "all equal", &vec![2; n], 3);
        assert_eq!(p[1] as usize, usize::from(n > 64), "n {n}: groups");
    }
    let n = 4096;
    check_parity(&dev, "random", &random_ids(&mut rng, n, QWEN_V), QWEN_V);
    let p = check_parity(
        &dev,
        "90% padding",
        &skewed_ids(&mut rng, n, QWEN_V, 151643),
        QWEN_V,
    );
    assert!(
        p[1] >= 1 && p[3] > 1,
        "the padding id is split: {:?}",
        &p[..4]
    );
    let p = check_parity(&dev, "all equal", &vec![151935; n], QWEN_V);
    assert_eq!(
        &p[..4],
        &[64, 1, n as u32, 64],
        "one id, 64 items, one group"
    );
    let mut desc = random_ids(&mut rng, n, QWEN_V);
    desc.sort_unstable_by(|a, b| b.cmp(a));
    check_parity(&dev, "descending", &desc, QWEN_V);
    // Vocabularies at a pass boundary (the largest key v - 1 vs the clamp key v).
    for v in [255, 256, 257, 65536] {
        check_parity(&dev, "pass boundary", &random_ids(&mut rng, 1000, v), v);
        check_parity(&dev, "pass boundary, top id", &vec![v as u32 - 1; 300], v);
    }
    // The real batch: 64 x 1024 tokens, Qwen2's vocabulary, 30% padding.
    let n = 65536;
    let ids: Vec<u32> = skewed_ids(&mut rng, n, QWEN_V, 151643)
        .into_iter()
        .enumerate()
        .map(|(t, id)| {
            if t % 3 == 0 {
                (rng.next_u64() % QWEN_V as u64) as u32
            } else {
                id
            }
        })
        .collect();
    let t = std::time::Instant::now();
    check_parity(&dev, "real batch", &ids, QWEN_V);
    eprintln!("n {n}: device plan in {:.2?} (with transfers)", t.elapsed());
    check_parity(
        &dev,
        "real batch, random",
        &random_ids(&mut rng, n, QWEN_V),
        QWEN_V,
    );
}

/// `dtable += ` the plan's sums, in the kernels' order, in f32 (skipping ids `≥ v`).
fn replay_f32(plan: &[u32], dout: &[f32], n: usize, v: usize, d: usize, dtable: &mut [f32]) {
    let (items, groups, gmax) = (plan[0] as usize, plan[1] as usize, max_groups(n));
    let item_id = &plan[4..4 + n];
    let item_off = &plan[4 + n..5 + 2 * n];
    let item_slot = &plan[5 + 2 * n..5 + 3 * n];
    let perm = &plan[5 + 3 * n..5 + 4 * n];
    let grp = &plan[5 + 4 * n..];
    let mut ws = vec![0.0f32; max_slots(n) * d];
    for k in 0..items {
        let id = item_id[k] as usize;
        if id >= v {
            continue;
        }
        let mut acc = vec![0.0f32; d];
        for &t in &perm[item_off[k] as usize..item_off[k + 1] as usize] {
            for (a, &g) in acc
                .iter_mut()
                .zip(&dout[t as usize * d..(t as usize + 1) * d])
            {
                *a += g;
            }
        }
        if item_slot[k] == u32::MAX {
            for (o, a) in dtable[id * d..(id + 1) * d].iter_mut().zip(&acc) {
                *o += a; // the kernel's acc + old (addition commutes bit for bit)
            }
        } else {
            let s = item_slot[k] as usize;
            ws[s * d..(s + 1) * d].copy_from_slice(&acc);
        }
    }
    for g in 0..groups {
        let (id, s0, cnt) = (
            grp[g] as usize,
            grp[gmax + g] as usize,
            grp[2 * gmax + g] as usize,
        );
        if id >= v {
            continue;
        }
        for j in 0..d {
            let mut s = 0.0f32;
            for k in 0..cnt {
                s += ws[(s0 + k) * d + j];
            }
            dtable[id * d + j] += s;
        }
    }
}

/// The CUDA backward (`embed_bwd_raw`) with an uploaded plan on a fresh copy of `t0`.
fn bwd_with(
    dev: &CudaDevice,
    plan: &[u32],
    dout: &CudaSlice<u16>,
    t0: &[f32],
    n: usize,
    v: usize,
    d: usize,
) -> Vec<f32> {
    let pd = up(dev, plan);
    let td = up(dev, t0);
    let ws = up(
        dev,
        &vec![f32::NAN; embed::cuda::embed_bwd_workspace_len(n, d)],
    );
    // SAFETY: plan plan_len(n) u32, dout n·d bf16, dtable v·d f32, workspace of its length.
    unsafe {
        embed::cuda::embed_bwd_raw(
            dev,
            ptr(dev, &pd),
            ptr(dev, dout),
            n,
            v,
            d,
            ptr(dev, &td),
            ptr(dev, &ws),
        )
        .unwrap()
    };
    down(dev, &td)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn bf_round(x: &[f32]) -> (Vec<f32>, Vec<u16>) {
    let b: Vec<u16> = x
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    (
        b.iter()
            .map(|&u| half::bf16::from_bits(u).to_f32())
            .collect(),
        b,
    )
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_bwd_on_the_device_plan_equals_the_host_plan_run() {
    let Some(dev) = cuda_for_test("cuda_embed_bwd_on_the_device_plan_equals_the_host_plan_run")
    else {
        return;
    };
    let mut rng = Rng::fresh("cuda_embed_bwd_on_the_device_plan_equals_the_host_plan_run");
    // d 64: the 16-byte vector path; d 37: the scalar path.
    for &(n, v, d) in &[(1000usize, 5000usize, 64usize), (300, 40, 37), (1, 10, 64)] {
        let what = format!("embed_bwd n {n} v {v} d {d}");
        let ids = skewed_ids(&mut rng, n, v, 3);
        let (dout, dout_bits) = bf_round(&rng.normal_vec(n * d, 1.0));
        let t0 = rng.normal_vec(v * d, 1.0);
        let doutd = up(&dev, &dout_bits);
        let host_plan = EmbedBwdPlan::new(&ids, v).unwrap();
        let dev_plan = check_parity(&dev, &what, &ids, v);
        let with_host = bwd_with(&dev, host_plan.packed(), &doutd, &t0, n, v, d);
        let with_dev = bwd_with(&dev, &dev_plan, &doutd, &t0, n, v, d);
        assert_eq!(
            bits(&with_dev),
            bits(&with_host),
            "{what}: device vs host plan"
        );
        let mut replay = t0.clone();
        replay_f32(&dev_plan, &dout, n, v, d, &mut replay);
        assert_eq!(bits(&with_dev), bits(&replay), "{what}: vs the f32 replay");
        let mut want = t0.clone();
        embed::cpu::embed_bwd(&ids, &dout, v, d, &mut want).unwrap();
        assert_close(&what, &with_dev, &want, 1e-5, 1e-6 * n as f64);
    }
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_plan_sorts_out_of_range_ids_as_v_and_the_backward_skips_them() {
    let test = "cuda_embed_plan_sorts_out_of_range_ids_as_v_and_the_backward_skips_them";
    let Some(dev) = cuda_for_test(test) else {
        return;
    };
    let mut rng = Rng::fresh(test);
    let (n, v, d) = (700usize, 50usize, 16usize);
    // 20% out of range (v, v + 1, u32::MAX: more than one item's worth, so a split group).
    let ids: Vec<u32> = (0..n)
        .map(|_| match rng.next_u64() % 10 {
            0 => v as u32 + (rng.next_u64() % 2) as u32,
            1 => u32::MAX,
            _ => (rng.next_u64() % v as u64) as u32,
        })
        .collect();
    assert!(
        EmbedBwdPlan::new(&ids, v).is_err(),
        "the host builder rejects them"
    );
    let clamped: Vec<u32> = ids.iter().map(|&i| i.min(v as u32)).collect();
    let want = EmbedBwdPlan::new(&clamped, v + 1).unwrap();
    let got = device_plan(&dev, &ids, v);
    assert_same_plan(test, &got, want.packed(), n);
    assert!(got[1] >= 1, "the out-of-range tokens form a split group");
    // The backward adds nothing for them: equal to the CPU backward of the valid tokens only.
    let (dout, dout_bits) = bf_round(&rng.normal_vec(n * d, 1.0));
    let t0 = rng.normal_vec(v * d, 1.0);
    let got_t = bwd_with(&dev, &got, &up(&dev, &dout_bits), &t0, n, v, d);
    let mut replay = t0.clone();
    replay_f32(&got, &dout, n, v, d, &mut replay);
    assert_eq!(bits(&got_t), bits(&replay), "vs the f32 replay");
    let (mut ok_ids, mut ok_dout) = (Vec::new(), Vec::new());
    for (t, &id) in ids.iter().enumerate() {
        if (id as usize) < v {
            ok_ids.push(id);
            ok_dout.extend_from_slice(&dout[t * d..(t + 1) * d]);
        }
    }
    let mut want_t = t0.clone();
    embed::cpu::embed_bwd(&ok_ids, &ok_dout, v, d, &mut want_t).unwrap();
    assert_close(test, &got_t, &want_t, 1e-5, 1e-6 * n as f64);
}

#[test]
#[ignore = "needs a CUDA GPU (run with --include-ignored; DFPO_REQUIRE_CUDA=1 fails when there is none)"]
fn cuda_embed_plan_captured_in_a_graph_replays_with_new_ids() {
    let test = "cuda_embed_plan_captured_in_a_graph_replays_with_new_ids";
    let Some(dev) = cuda_for_test(test) else {
        return;
    };
    let mut rng = Rng::fresh(test);
    let (n, v) = (1500usize, QWEN_V);
    let mut idd = up(&dev, &vec![0u32; n]);
    let mut plan = up(&dev, &vec![POISON_U32; plan_len(n)]);
    let scratch = up(&dev, &vec![POISON_U32; embed_plan_scratch_len(n)]);
    let (ip, pp, sp) = (ptr(&dev, &idd), ptr(&dev, &plan), ptr(&dev, &scratch));
    // SAFETY (both calls): ids n u32, plan plan_len(n), scratch its length; disjoint.
    // A direct build first loads the module (a module load allocates: not during a capture).
    unsafe { embed::cuda::embed_plan_raw(&dev, ip, n, v, pp, sp).unwrap() };
    dev.synchronize().unwrap();
    let st = dev.stream().clone();
    st.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    unsafe { embed::cuda::embed_plan_raw(&dev, ip, n, v, pp, sp).unwrap() };
    let g = st
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph with the plan's launches");
    for (what, ids) in [
        ("random", random_ids(&mut rng, n, v)),
        ("90% padding", skewed_ids(&mut rng, n, v, 151643)),
        ("all equal", vec![7; n]),
    ] {
        st.memcpy_htod(&ids, &mut idd).unwrap();
        st.memcpy_htod(&vec![POISON_U32; plan_len(n)], &mut plan)
            .unwrap();
        g.launch().unwrap();
        let host = EmbedBwdPlan::new(&ids, v).unwrap();
        assert_same_plan(
            &format!("replay, {what}"),
            &down(&dev, &plan),
            host.packed(),
            n,
        );
    }
}
