#!/usr/bin/env python3
"""Times, in eager PyTorch on the same card, the work dfpo's kernels do, for ratios:

  flow_integrate_euler1  the flow head (same parameterisation as src/kernels/flow.rs: per-token
                         u = c·W_cond + b_in precomputed, then [u + w_z z + w_t τ] -> GELU(tanh) ->
                         LayerNorm, hidden layers Linear -> GELU -> LayerNorm, Linear to 1) and one
                         Euler step, over T tokens × K samples, fp32, no grad
  flow_eval_fwd_bwd      one evaluation with grad and its backward (autograd), fp32
  risk_stats_k{K}        sort each row of K samples + mean, var, lower CVaR, upper mean, tail
                         variances (torch.sort + reductions), fp32
  copy_bandwidth         a device-to-device copy of 1 GiB (read + write bytes / time)

Defaults are the perf-model sizes (T = 64 × 512 tokens, K = 32, width 256, depth 3). Writes a
JSON of median milliseconds to --out. Also runs on the CPU (--device cpu --small) for a check.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


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


def make_head(width, depth, device, gen):
    def u(*shape, scale):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) * scale).to(device)

    p = {
        "w_z": u(width, scale=1.0),
        "w_t": u(width, scale=1.0),
        "gamma": [torch.ones(width, device=device) for _ in range(depth)],
        "beta": [torch.zeros(width, device=device) for _ in range(depth)],
        "W": [u(width, width, scale=width ** -0.5) for _ in range(depth - 1)],
        "b": [torch.zeros(width, device=device) for _ in range(depth - 1)],
        "w_out": u(width, scale=0.1 * width ** -0.5),
        "b_out": torch.zeros(1, device=device),
    }
    return p


def head(p, u_rows, z, tau):
    h = u_rows + z[:, None] * p["w_z"] + tau[:, None] * p["w_t"]
    h = F.layer_norm(F.gelu(h, approximate="tanh"), h.shape[-1:], p["gamma"][0], p["beta"][0], 1e-5)
    for l, (W, b) in enumerate(zip(p["W"], p["b"])):
        h = F.layer_norm(F.gelu(h @ W + b, approximate="tanh"), h.shape[-1:], p["gamma"][l + 1], p["beta"][l + 1], 1e-5)
    return h @ p["w_out"] + p["b_out"]


def risk_stats(x, alpha=0.1, beta=0.1):
    k = x.shape[1]
    ka, kb = max(1, int(alpha * k)), max(1, int(beta * k))
    s, _ = torch.sort(x, dim=1)
    lo, hi = s[:, :ka], s[:, k - kb:]
    return torch.stack([x.mean(1), x.var(1, unbiased=False), lo.mean(1), hi.mean(1),
                        lo.var(1, unbiased=False), hi.var(1, unbiased=False)], 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU check)")
    ap.add_argument("--out", default="torch.json")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dev = a.device
    tokens, k, width, depth = (256, 32, 256, 3) if a.small else (64 * 512, 32, 256, 3)
    gen = torch.Generator().manual_seed(0)
    p = make_head(width, depth, dev, gen)
    u = torch.randn(tokens, width, generator=gen).to(dev)
    rows = tokens * k
    z0 = torch.randn(rows, generator=gen).to(dev)
    tau = torch.zeros(rows, device=dev)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "tf32": torch.backends.cuda.matmul.allow_tf32, "tokens": tokens, "k": k, "width": width, "depth": depth}

    @torch.no_grad()
    def integrate():
        u_rows = u.repeat_interleave(k, 0)
        return z0 + 1.0 * head(p, u_rows, z0, tau)

    res["flow_integrate_euler1_ms"] = timeit(integrate, dev, a.reps)

    params = [p["w_z"], p["w_t"], p["w_out"], p["b_out"], *p["W"], *p["b"], *p["gamma"], *p["beta"]]
    for t in params:
        t.requires_grad_(True)
    u.requires_grad_(True)
    dv = torch.randn(rows, generator=gen).to(dev)

    def fwd_bwd():
        for t in params + [u]:
            t.grad = None
        v = head(p, u.repeat_interleave(k, 0), z0, tau)
        v.backward(dv)

    res["flow_eval_fwd_bwd_ms"] = timeit(fwd_bwd, dev, a.reps)

    for kk in (32, 64, 256):
        x = torch.randn(tokens if a.small else 32768, kk, generator=gen).to(dev)
        res[f"risk_stats_k{kk}_ms"] = timeit(lambda: risk_stats(x), dev, a.reps)

    if dev == "cuda":
        n = (1 << 30) // 4
        src = torch.empty(n, device=dev)
        dst = torch.empty_like(src)
        ms = timeit(lambda: dst.copy_(src), dev, a.reps)
        res["copy_bandwidth_GBps"] = 2 * n * 4 / (ms * 1e-3) / 1e9

    flops = rows * (depth - 1) * 2 * width * width
    res["flow_integrate_euler1_TFLOPs"] = flops / (res["flow_integrate_euler1_ms"] * 1e-3) / 1e12
    for key, v in res.items():
        print(f"torch {key}: {v:.4f}" if isinstance(v, float) else f"torch {key}: {v}")
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
