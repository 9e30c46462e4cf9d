#!/usr/bin/env python3
"""Mutation check of the emulator harness: applies one deliberate bug at a time to a copy of
kernels/attention.cu, rebuilds the emulator against it and expects `run.sh quick` to fail.
Prints CAUGHT or MISSED per mutation (the query mask of the backward is redundant with the
zero-filled padded rows, so removing it is expected to be MISSED).

    python3 tools/attention-emu/mutate.py [name ...]
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MUTATIONS = {
    "fwd K loaded as trans-B layout": ("att_ldsm_x4(bk, sK + off_b +", "att_ldsm_x4(bk, sK + off_bt +"),
    "B fragments without .trans": ("att_ldsm_x4_t(b, rows + off_bt", "att_ldsm_x4(b, rows + off_bt"),
    "fwd mid-loop barrier dropped": ("        __syncthreads();  // V_j landed; every warp is done with K_j", ""),
    "fwd waits for V too early": ("        att_cp_wait<0>();\n        __syncthreads();  // V_j landed",
                                  "        att_cp_wait<1>();\n        __syncthreads();  // V_j landed"),
    "fwd causal mask off by one": ("if (key > row || row >= len) x = neg_inf;", "if (key > row + 1 || row >= len) x = neg_inf;"),
    "padded rows not zero-filled": ("const bf16* s = ok ? src + (long long)(row0 + r) * stride + c : src;\n            att_cp16(dst + (r * LD + c) * 2, s, ok);",
                                    "const bf16* s = src + (long long)(row0 + r) * stride + c;\n            att_cp16(dst + (r * LD + c) * 2, s, true);"),
    "C to A fragment halves swapped": ("a[1] = att_pack_bf16(lo[2], lo[3]);", "a[1] = att_pack_bf16(lo[3], lo[2]);"),
    "fwd P from the wrong n8 tiles": ("att_c_to_a(pa[kk], s[2 * kk], s[2 * kk + 1]);", "att_c_to_a(pa[kk], s[2 * kk + 1], s[2 * kk]);"),
    "bwd query mask dropped (redundant)": ("if (query < key || query >= len) p = 0.f;", "if (query < key) p = 0.f;"),
    "bwd top barrier dropped": ("        __syncthreads();  // tile `it` landed", "        //"),
    "dq top barrier dropped": ("        __syncthreads();  // K_j, V_j (and Q, dO) landed; every warp is done with tile j-1", ""),
    "dq leaves the current tile in flight": ("        att_cp_wait<0>();\n        __syncthreads();  // K_j, V_j",
                                            "        att_cp_wait<1>();\n        __syncthreads();  // K_j, V_j"),
    "dq dS from the wrong n8 tiles": ("att_c_to_a(dsa, dp[2 * kk], dp[2 * kk + 1]);", "att_c_to_a(dsa, dp[2 * kk + 1], dp[2 * kk]);"),
    "dq dS times V instead of K": ("att_mma_a_bt<D>(acc, dsa, cK", "att_mma_a_bt<D>(acc, dsa, cV"),
    "dq causal mask off by one": ("if (key > row || row >= len) p = 0.f;", "if (key > row + 1 || row >= len) p = 0.f;"),
    "dq delta of the other row": ("dp[nt][e] = p * (dp[nt][e] - dl_r[e >> 1]);", "dp[nt][e] = p * (dp[nt][e] - dl_r[(e >> 1) ^ 1]);"),
    "dq skips the last key tile": ("const int n_kv = (kv_end + BN - 1) / BN;\n    const int wrow0 = q0 + warp * 16;\n    const bool warp_rows = wrow0 < len;\n    // lse",
                                   "const int n_kv = kv_end / BN;\n    const int wrow0 = q0 + warp * 16;\n    const bool warp_rows = wrow0 < len;\n    // lse"),
    "bwd delta columns swapped": ("((e & 1) ? d1 : d0));", "((e & 1) ? d0 : d1));"),
    "decode scores barrier dropped": ("            __syncthreads();  // scores complete", ""),
    "decode end-of-chunk barrier dropped": ("            __syncthreads();  // sP, sA and this chunk's buffers are free", ""),
    "decode combine ignores the maxima": ("const float w = exp2f(part_ml[(base + s) * 2] - M);", "const float w = 1.f;"),
}


def main():
    src = open(os.path.join(ROOT, "kernels", "attention.cu")).read()
    names = sys.argv[1:] or list(MUTATIONS)
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "kernels"))
        shutil.copytree(HERE, os.path.join(tmp, "tools", "attention-emu"))
        shutil.copy(os.path.join(ROOT, "kernels", "common.cuh"), os.path.join(tmp, "kernels"))
        for name in names:
            a, b = MUTATIONS[name]
            if src.count(a) != 1:
                print(f"{name:40s} SKIP (pattern found {src.count(a)} times)")
                continue
            open(os.path.join(tmp, "kernels", "attention.cu"), "w").write(src.replace(a, b))
            r = subprocess.run(["bash", os.path.join(tmp, "tools", "attention-emu", "run.sh"), "quick", "2"],
                               capture_output=True, text=True)
            lines = [l for l in (r.stdout + r.stderr).splitlines()
                     if any(x in l for x in ("MISMATCH", "RACE", "FAIL", "error"))]
            print(f"{name:40s} {'CAUGHT' if r.returncode else 'MISSED'}  {lines[0][:110] if lines else ''}")


if __name__ == "__main__":
    main()
