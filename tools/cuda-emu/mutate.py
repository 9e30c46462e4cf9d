#!/usr/bin/env python3
"""Mutation proof of the emulated CUDA driver: injects one fault at a time into a copy of
kernels/, builds the emulator from it (in its own folder, reusing the unchanged objects) and runs
the kernel family's CUDA test binary (already built by cargo: the kernels are found by name, so
the mutated C++ runs) on it. A mutant is CAUGHT when the test fails; the first emulator error or
panic line says what caught it. Writes the table to docs/EMULATOR.md with --write.

    cargo test --release --no-run --test cuda_attention ...   (the test binaries)
    python3 tools/cuda-emu/mutate.py [--write] [name-substring ...]
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# (name, file, old, new, test binary, test filter)
MUTANTS = [
    # a removed barrier protecting shared memory, in every kernel file that has one
    ("adamw: norm-partial barrier removed", "adamw.cu", "__syncthreads();", "", "cuda_lmops", "cuda_grad_norm"),
    ("attention: fwd mid-loop barrier removed", "attention.cu",
     "        __syncthreads();  // V_j landed; every warp is done with K_j", "", "cuda_attention", "cuda_attention_fwd"),
    ("decoder: bias-grad barrier removed", "decoder.cu", "__syncthreads();", "", "cuda_decoder", ""),
    ("flow: tile-matmul barrier removed", "flow.cu",
     "    __syncthreads();  // every thread has finished reading X (Y may alias X)", "", "cuda_flow",
     "eval_forward_matches_cpu"),
    ("loss: mse partial-sum barrier removed", "loss.cu", "__syncthreads();", "", "cuda_graph", ""),
    ("norm: dw-finalize barrier removed", "norm.cu", "__syncthreads();", "", "cuda_layers", "cuda_rmsnorm"),
    ("rl: first barrier removed", "rl.cu", "__syncthreads();", "", "cuda_rl", ""),
    ("rope: table barrier removed", "rope.cu", "__syncthreads();", "", "cuda_layers", "cuda_rope"),
    ("sample: first barrier removed", "sample.cu", "__syncthreads();", "", "cuda_lmops",
     "cuda_sample_flags_rows_that_cannot_be_sampled"),
    ("xent: block-reduction barrier removed", "xent.cu", "__syncthreads();", "", "cuda_lmops", "cuda_xent_forward"),
    ("generate: step-bookkeeping barrier removed", "generate.cu",
     "    __syncthreads();\n    if (threadIdx.x == 0) {\n        st->active = s_active;",
     "    if (threadIdx.x == 0) {\n        st->active = s_active;", "cuda_generate", "stop_ids_end_rows"),
    ("heads: finish partial-sum barrier removed", "heads.cu", "__syncthreads();", "", "cuda_heads", ""),
    ("step: sum partial barrier removed", "step.cu",
     "    if (lane == 0) part[warp] = acc;\n    __syncthreads();", "    if (lane == 0) part[warp] = acc;",
     "cuda_step_ops", ""),
    ("step: pooled-sort barrier removed (global scratch)", "step.cu",
     "        sorted[rank] = v;\n    }\n    __syncthreads();", "        sorted[rank] = v;\n    }",
     "cuda_step_ops", ""),
    ("embed: plan-scan warp-total barrier removed", "embed.cu",
     "        if (lane == DFPO_WARP - 1) warp_tot[warp] = inc;\n        __syncthreads();",
     "        if (lane == DFPO_WARP - 1) warp_tot[warp] = inc;", "cuda_embed_plan", "cuda_embed_plan_matches"),
    ("embed: plan scatter walks its tile backwards (unstable sort)", "embed.cu",
     "for (int j = 0; j < len; ++j) dst[j] = next[", "for (int j = len - 1; j >= 0; --j) dst[j] = next[",
     "cuda_embed_plan", "cuda_embed_plan_matches"),
    ("embed: plan tails not zeroed", "embed.cu", "        item_id[p] = 0u;\n", "",
     "cuda_embed_plan", "cuda_embed_plan_matches"),
    ("step: seq_rows targets one token too far", "step.cu", "(t >= t0 && t + 1 < len) ? q[t + 1]",
     "(t >= t0 && t < len) ? q[t + 1]", "cuda_seq_rows", ""),
    ("step: seq_rows ignores use_skip", "step.cu", "r >= 0 && use_skip ? max(", "r >= 0 ? max(",
     "cuda_seq_rows", ""),
    ("step: token list skips each row's first token", "step.cu",
     "if (t >= t0 && t < t0 + rlen[r]) list[", "if (t > t0 && t < t0 + rlen[r]) list[", "cuda_step_ops",
     "step_bookkeeping"),
    ("step: segments drop the last token of each", "step.cu", "for (int k = threadIdx.x; k < len; k += blockDim.x) out[",
     "for (int k = threadIdx.x; k + 1 < len; k += blockDim.x) out[", "cuda_step_ops", "graph_input_writes"),
    ("attention: bwd split slice drops a head (non-dividing G)", "attention.cu",
     "    const int gs = (split + 1) * G / n_splits - split * G / n_splits;",
     "    const int gs = G / n_splits;", "cuda_attention", "cuda_attention_bwd_split"),
    ("attention: bwd finalize skips the last slice", "attention.cu",
     "        for (int sp = 1; sp < n_splits; ++sp) {", "        for (int sp = 1; sp < n_splits - 1; ++sp) {",
     "cuda_attention", "cuda_attention_bwd_split"),
    ("risk: staging __syncwarp removed", "risk.cu", "        __syncwarp();  // the next row group reuses the staging area",
     "", "cuda_risk", "stats_match_cpu"),
    # other fault kinds
    ("attention: causal mask off by one", "attention.cu", "if (key > row || row >= len) x = neg_inf;",
     "if (key > row + 1 || row >= len) x = neg_inf;", "cuda_attention", "cuda_attention_fwd"),
    # (xor 3 instead of 1 in the last step is an equivalent mutant: {16, 8, 4, 2, 3} still spans
    # every lane, so the sum is the same; xor 2 twice is not)
    ("common: wrong shuffle lane in warp_sum", "common.cuh",
     "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(DFPO_FULL_MASK, v, o);\n    return v;\n}\n\n__device__ __forceinline__ double",
     "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(DFPO_FULL_MASK, v, o == 1 ? 2 : o);\n    return v;\n}\n\n__device__ __forceinline__ double",
     "cuda_layers", "cuda_rmsnorm_matches_cpu"),
    ("attention: C-to-A fragment halves swapped", "attention.cu", "a[1] = att_pack_bf16(lo[2], lo[3]);",
     "a[1] = att_pack_bf16(lo[3], lo[2]);", "cuda_attention", "cuda_attention_fwd"),
    ("attention: fwd waits for V one group too early (missing cp.async wait)", "attention.cu",
     "        att_cp_wait<0>();\n        __syncthreads();  // V_j landed",
     "        att_cp_wait<1>();\n        __syncthreads();  // V_j landed", "cuda_attention", "cuda_attention_fwd"),
    ("act: 16-byte load 8 bytes off (misaligned vector access)", "act.cu",
     "unpack8(*(const uint4*)(g + inter), uf);", "unpack8(*(const uint4*)(g + inter + 4), uf);", "cuda_layers",
     "cuda_swiglu"),
    # 32-bit offsets: wrong only past 2^31 / 2^32 elements, caught by the real-size tests (65536 x
    # 151936 logits; the emulator runs only the checked rows' blocks)
    ("xent: 32-bit row offset (wraps only past 2^31 logits)", "xent.cu",
     "const unsigned short* rowp = logits + row * V;", "const unsigned short* rowp = logits + (int)(row * V);",
     "cuda_lmops", "cuda_xent_real_size"),
    ("sample: 32-bit row offset", "sample.cu",
     "const unsigned short* rowp = logits + row * V;", "const unsigned short* rowp = logits + (int)(row * V);",
     "cuda_lmops", "cuda_sample_real_size"),
    ("sample: 32-bit element counters", "sample.cu",
     "const u64 ctr0 = (counter + (u64)row) * (u64)V;", "const u64 ctr0 = (u32)((counter + (u64)row) * (u64)V);",
     "cuda_lmops", "cuda_sample_real_size"),
    # the launch: a parameter narrowed in the kernel (the launcher still pushes an i64; the emulator
    # compares the sizes the launch recorded with the signature), a write before the allocation
    ("decoder: add_bf16's n narrowed to int (launcher pushes 8 bytes)", "decoder.cu",
     "decoder_add_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,\n                                            long long n)",
     "decoder_add_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,\n                                            int n)",
     "cuda_device", ""),
    ("decoder: add_bf16 also writes the element before its output", "decoder.cu",
     "        y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(x[i]));",
     "        { if (i == 0) y[-1] = y[0]; y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + __bfloat162float(x[i])); }",
     "cuda_device", "cuda_empty_grid"),
    # attention (ported from the retired tools/attention-emu/mutate.py)
    ("attention: fwd K loaded in the trans-B layout", "attention.cu", "att_ldsm_x4(bk, sK + off_b +",
     "att_ldsm_x4(bk, sK + off_bt +", "cuda_attention", "cuda_attention_fwd"),
    ("attention: B fragments without .trans", "attention.cu", "att_ldsm_x4_t(b, rows + off_bt",
     "att_ldsm_x4(b, rows + off_bt", "cuda_attention", "cuda_attention_fwd"),
    ("attention: padded rows not zero-filled", "attention.cu",
     "const bf16* s = ok ? src + (long long)(row0 + r) * stride + c : src;\n            att_cp16(dst + (r * LD + c) * 2, s, ok);",
     "const bf16* s = src + (long long)(row0 + r) * stride + c;\n            att_cp16(dst + (r * LD + c) * 2, s, true);",
     "cuda_attention", "cuda_attention_fwd"),
    ("attention: fwd P from the wrong n8 tiles", "attention.cu", "att_c_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);",
     "att_c_to_a(pa[kk], s[2 * kk + 1], s[2 * kk]);", "cuda_attention", "cuda_attention_fwd"),
    ("attention: bwd query mask dropped (equivalent)", "attention.cu", "if (query < key || query >= len) p = 0.f;",
     "if (query < key) p = 0.f;", "cuda_attention", "cuda_attention_bwd"),
    ("attention: bwd top barrier removed", "attention.cu", "        __syncthreads();  // tile `it` landed", "        //",
     "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq top barrier removed", "attention.cu",
     "        __syncthreads();  // K_j, V_j (and Q, dO) landed; every warp is done with tile j-1", "",
     "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq leaves the current tile in flight (missing cp.async wait)", "attention.cu",
     "        att_cp_wait<0>();\n        __syncthreads();  // K_j, V_j",
     "        att_cp_wait<1>();\n        __syncthreads();  // K_j, V_j", "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq dS from the wrong n8 tiles", "attention.cu", "att_c_to_a(dsa, dp[2 * kk], dp[2 * kk + 1]);",
     "att_c_to_a(dsa, dp[2 * kk + 1], dp[2 * kk]);", "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq dS times V instead of K", "attention.cu", "att_mma_a_bt<D>(acc, dsa, cK",
     "att_mma_a_bt<D>(acc, dsa, cV", "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq causal mask off by one", "attention.cu", "if (key > row || row >= len) p = 0.f;",
     "if (key > row + 1 || row >= len) p = 0.f;", "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq delta of the other row", "attention.cu", "dp[nt][e] = p * (dp[nt][e] - dl_r[e >> 1]);",
     "dp[nt][e] = p * (dp[nt][e] - dl_r[(e >> 1) ^ 1]);", "cuda_attention", "cuda_attention_bwd"),
    ("attention: dq skips the last key tile", "attention.cu",
     "const int n_kv = (kv_end + BN - 1) / BN;\n    const int wrow0 = q0 + warp * 16;\n    const bool warp_rows = wrow0 < len;\n    // lse",
     "const int n_kv = kv_end / BN;\n    const int wrow0 = q0 + warp * 16;\n    const bool warp_rows = wrow0 < len;\n    // lse",
     "cuda_attention", "cuda_attention_bwd"),
    ("attention: bwd delta columns swapped", "attention.cu", "((e & 1) ? d1 : d0));", "((e & 1) ? d0 : d1));",
     "cuda_attention", "cuda_attention_bwd"),
    ("attention: decode scores barrier removed", "attention.cu", "            __syncthreads();  // scores complete", "",
     "cuda_attention", "cuda_decode"),
    ("attention: decode end-of-chunk barrier removed", "attention.cu",
     "            __syncthreads();  // sP, sA and this chunk's buffers are free", "", "cuda_attention", "cuda_decode"),
    ("attention: decode combine ignores the maxima", "attention.cu",
     "const float w = exp2f(part_ml[(base + s) * 2] - M);", "const float w = 1.f;", "cuda_attention", "cuda_decode"),
]


def test_binary(name):
    c = [p for p in glob.glob(os.path.join(ROOT, "target", "release", "deps", name + "-*"))
         if os.access(p, os.X_OK) and not p.endswith(".d")]
    return max(c, key=os.path.getmtime) if c else None


def run(mutant, tmp):
    name, fname, old, new, binary, filt = mutant
    src_dir = os.path.join(ROOT, "kernels")
    kdir = os.path.join(tmp, "kernels")
    if os.path.exists(kdir):
        shutil.rmtree(kdir)
    shutil.copytree(src_dir, kdir)
    path = os.path.join(kdir, fname)
    text = open(path).read()
    n = text.count(old)
    if n == 0:
        return "SKIP", f"pattern not found in kernels/{fname}"
    open(path, "w").write(text.replace(old, new, 1))
    env = dict(os.environ, DFPO_EMU_KERNELS=kdir, DFPO_EMU_OUT=os.path.join(tmp, "emu"))
    b = subprocess.run([sys.executable, os.path.join(HERE, "build.py"), "--quiet"], env=env, capture_output=True,
                       text=True)
    if b.returncode != 0:
        return "CAUGHT", "does not compile: " + (b.stderr.strip().splitlines() or ["?"])[-1][:150]
    exe = test_binary(binary)
    if not exe:
        return "SKIP", f"no test binary {binary} (cargo test --release --no-run --test {binary})"
    env.update(LD_LIBRARY_PATH=b.stdout.strip(), DFPO_REQUIRE_CUDA="1", DFPO_EMU="1")
    cmd = [exe, "--include-ignored", "--test-threads=1"] + ([filt] if filt else [])
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=int(os.environ.get("MUTANT_TIMEOUT", "600")))
    except subprocess.TimeoutExpired:
        return "TIMEOUT", "the test ran past the time limit"
    out = r.stdout + r.stderr
    lines = [l for l in out.splitlines() if "CUDA-EMU ERROR" in l]
    lines += [l for l in out.splitlines() if "panicked" in l or "assert" in l.lower() or "mismatch" in l.lower()]
    if r.returncode == 0:
        return "MISSED", ""
    what = lines[0] if lines else out.strip().splitlines()[-1]
    return "CAUGHT", what.replace("|", "/")[:220]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    todo = [m for m in MUTANTS if not args or any(a in m[0] for a in args)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(ROOT, "target", "cuda-emu")
        if os.path.isdir(base):
            shutil.copytree(base, os.path.join(tmp, "emu"), symlinks=True)
        for m in todo:
            verdict, what = run(m, tmp)
            print(f"{m[0]:70s} {verdict:7s} {what}", flush=True)
            rows.append((m, verdict, what))
    if "--write" in sys.argv:
        doc = os.path.join(ROOT, "docs", "EMULATOR.md")
        with open(doc, "a") as fh:
            if "| mutant |" not in open(doc).read():
                fh.write("\n| mutant | kernel file | test run | result | what caught it |\n|---|---|---|---|---|\n")
            for m, verdict, what in rows:
                fh.write(f"| {m[0]} | kernels/{m[1]} | {m[4]} {m[5]} | {verdict} | {what} |\n")


if __name__ == "__main__":
    main()
