#!/usr/bin/env python3
"""Times, in PyTorch on the same card, the attention work of dfpo's benches/attention.rs, for ratios:

  attn_fwd_{tag}       causal scaled_dot_product_attention forward, bf16, tensors laid out as dfpo's
                       ([B][S][H][D] storage, viewed as [B, H, S, D] without a copy)
  attn_fwd_bwd_{tag}   the same forward and its backward (autograd, grads of q, k, v)
  attn_bwd_{tag}       fwd_bwd minus fwd (derived)
  decode_{tag}         one new query per sequence over a [B, Hkv, L, D] bf16 KV cache (not causal)

with tag = b{B}_s{S}_h{Hq}_kv{Hkv}_d{D} (the criterion ids of benches/attention.rs carry the same
tag: attention_cuda/fwd_{tag}, bwd_{tag}, fwd_bwd_{tag}, decode_b64_h14_kv2_d64_len2048).
GQA (Hq != Hkv) uses enable_gqa=True where this torch has it, else K/V heads repeated before the call
(the repeat is then timed too; the JSON says which). Every time is the median of --reps runs timed
with CUDA events; FLOPs follow the FlashAttention accounting: causal forward 4*B*Hq*S^2*D/2,
backward 2.5x the forward. The default SDPA dispatch is timed, and each of the flash, cuDNN and
memory-efficient backends that accepts the shape is timed too (keys *_{backend}_ms).

Writes a JSON to --out. `--device cpu --small` runs tiny shapes on the CPU as a check.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (B, S, Hq, Hkv, D): the CUDA shapes of benches/attention.rs
    (4, 2048, 16, 16, 128),
    (4, 2048, 16, 4, 128),
    (4, 2048, 16, 16, 64),
    (4, 2048, 14, 2, 64),
]
DECODE = (64, 14, 2, 64, 2048)  # (B, Hq, Hkv, D, cache length)


def timeit(fn, device, reps):
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def sdpa(q, k, v, causal, native_gqa):
    """q [B, Hq, S, D], k/v [B, Hkv, L, D]."""
    if q.shape[1] != k.shape[1]:
        if native_gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def has_native_gqa(device):
    q = torch.zeros(1, 2, 4, 16, device=device)
    k = torch.zeros(1, 1, 4, 16, device=device)
    try:
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return True
    except TypeError:
        return False


def backends():
    """(name, context factory) for each SDPA backend this torch can force, default first."""
    out = [("default", None)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        if hasattr(SDPBackend, name):
            out.append((name.split("_")[0].lower(), lambda b=getattr(SDPBackend, name): sdpa_kernel(b)))
    return out


def run(fn, ctx, device, reps):
    """Median ms of fn under the backend context, or None when the backend rejects the shape."""
    try:
        if ctx is None:
            return timeit(fn, device, reps)
        with ctx():
            return timeit(fn, device, reps)
    except RuntimeError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU check)")
    ap.add_argument("--out", default="torch_attention.json")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    native_gqa = has_native_gqa(dev)
    shapes = [(2, 128, 4, 2, 64), (2, 64, 4, 4, 16)] if a.small else SHAPES
    decode = (4, 14, 2, 64, 128) if a.small else DECODE
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "gqa": "enable_gqa" if native_gqa else "repeat_interleave (timed)"}
    gen = torch.Generator().manual_seed(0)

    for (b, s, hq, hkv, d) in shapes:
        tag = f"b{b}_s{s}_h{hq}_kv{hkv}_d{d}"
        # dfpo's storage [B][S][H][D], viewed as [B, H, S, D].
        q = torch.randn(b, s, hq, d, generator=gen).to(dev, dtype).transpose(1, 2)
        k = torch.randn(b, s, hkv, d, generator=gen).to(dev, dtype).transpose(1, 2)
        v = torch.randn(b, s, hkv, d, generator=gen).to(dev, dtype).transpose(1, 2)
        dout = torch.randn(b, s, hq, d, generator=gen).to(dev, dtype).transpose(1, 2)
        flops = 4 * b * hq * s * s * d / 2
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

        def fwd():
            with torch.no_grad():
                return sdpa(q, k, v, True, native_gqa)

        def fwd_bwd():
            qg.grad = kg.grad = vg.grad = None
            sdpa(qg, kg, vg, True, native_gqa).backward(dout)

        for name, ctx in backends():
            if dev != "cuda" and name != "default":
                continue
            suffix = "" if name == "default" else f"_{name}"
            t_f = run(fwd, ctx, dev, a.reps)
            t_fb = run(fwd_bwd, ctx, dev, a.reps)
            if t_f is not None:
                res[f"attn_fwd_{tag}{suffix}_ms"] = t_f
                res[f"attn_fwd_{tag}{suffix}_TFLOPs"] = flops / (t_f * 1e-3) / 1e12
            if t_fb is not None:
                res[f"attn_fwd_bwd_{tag}{suffix}_ms"] = t_fb
                res[f"attn_fwd_bwd_{tag}{suffix}_TFLOPs"] = 3.5 * flops / (t_fb * 1e-3) / 1e12
            if t_f is not None and t_fb is not None:
                res[f"attn_bwd_{tag}{suffix}_ms"] = t_fb - t_f
                res[f"attn_bwd_{tag}{suffix}_TFLOPs"] = 2.5 * flops / max((t_fb - t_f) * 1e-3, 1e-12) / 1e12

    b, hq, hkv, d, cache = decode
    tag = f"b{b}_h{hq}_kv{hkv}_d{d}_len{cache}"
    q = torch.randn(b, hq, 1, d, generator=gen).to(dev, dtype)
    kc = torch.randn(b, hkv, cache, d, generator=gen).to(dev, dtype)
    vc = torch.randn(b, hkv, cache, d, generator=gen).to(dev, dtype)

    def dec():
        with torch.no_grad():
            return sdpa(q, kc, vc, False, native_gqa)

    t = timeit(dec, dev, a.reps)
    res[f"decode_{tag}_ms"] = t
    res[f"decode_{tag}_GBps"] = 2 * kc.numel() * kc.element_size() / (t * 1e-3) / 1e9

    for key, val in res.items():
        print(f"torch {key}: {val:.4f}" if isinstance(val, float) else f"torch {key}: {val}")
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
