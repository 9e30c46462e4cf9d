#!/usr/bin/env python3
"""Summarises a GPU run: every criterion bench (mean time, throughput) from CRITERION_HOME, and
the dfpo/PyTorch ratio for each pair of benches that time the same work on the same card, and
issue 4's training-step ratios (DFPO/PPO time; ours / torch tokens/s of the DFPO update step).

usage: summarize.py CRITERION_DIR TORCH_JSON [TORCH_JSON ...]
"""
import glob
import json
import os
import re
import sys

# (criterion full id regex, torch key, what): ratio = torch time / dfpo time (> 1: dfpo faster).
PAIRS = [
    (r"^flow_cuda/integrate_euler1/", "flow_integrate_euler1_ms", "flow head + 1 Euler step"),
    (r"^flow_cuda/eval_fwd_bwd/", "flow_eval_fwd_bwd_ms", "flow head eval fwd+bwd"),
    # torch_bench.py times R = its token count (32768) rows; the risk bench names its rows.
    (r"^risk_cuda/stats/R32768xK32$", "risk_stats_k32_ms", "sort + tail stats, K=32"),
    (r"^risk_cuda/stats/R32768xK64$", "risk_stats_k64_ms", "sort + tail stats, K=64"),
    (r"^risk_cuda/stats/R32768xK256$", "risk_stats_k256_ms", "sort + tail stats, K=256"),
    # benches/generate.rs and torch_generate_bench.py: 64 rows x (128 prompt + 256 new tokens),
    # Qwen2-0.5B shape, bf16; torch = transformers generate with a static KV cache.
    (r"^generate_cuda/rollout_graph$", "generate_rollout_ms", "rollout generate, CUDA graph decode"),
    (r"^generate_cuda/rollout_direct$", "generate_rollout_ms", "rollout generate, direct launches"),
]


def load_criterion(root):
    out = {}
    for est in glob.glob(os.path.join(root, "**", "new", "estimates.json"), recursive=True):
        d = os.path.dirname(est)
        try:
            bench = json.load(open(os.path.join(d, "benchmark.json")))
            mean_ns = json.load(open(est))["mean"]["point_estimate"]
        except (OSError, KeyError, ValueError):
            continue
        thr = bench.get("throughput") or {}
        out[bench["full_id"]] = (mean_ns * 1e-6, thr)
    return out


def main():
    crit = load_criterion(sys.argv[1])
    torch = {}
    for path in sys.argv[2:]:
        if os.path.exists(path):
            torch.update(json.load(open(path)))
    # Attention pairs follow one naming rule: attention_cuda/{kind}_{tag} <-> attn_{kind}_{tag}_ms.
    for name in crit:
        m = re.match(r"^attention_cuda/(fwd_bwd|fwd|bwd|decode)_(.+)$", name)
        if m:
            key = f"decode_{m.group(2)}_ms" if m.group(1) == "decode" else f"attn_{m.group(1)}_{m.group(2)}_ms"
            PAIRS.append((re.escape(name) + "$", key, f"attention {m.group(1)} {m.group(2)}"))
    print(f"{'bench':<48} {'mean ms':>10}  throughput")
    for name, (ms, thr) in sorted(crit.items()):
        t = ""
        if "Bytes" in thr:
            t = f"{thr['Bytes'] / (ms * 1e-3) / 1e9:.1f} GB/s"
            if "copy_bandwidth_GBps" in torch:
                t += f" ({100 * thr['Bytes'] / (ms * 1e-3) / 1e9 / torch['copy_bandwidth_GBps']:.0f}% of copy)"
        elif "Elements" in thr:
            t = f"{thr['Elements'] / (ms * 1e-3):.3e} elem/s"
        print(f"{name:<48} {ms:>10.4f}  {t}")
    if torch:
        print(f"\nratios vs eager PyTorch on {torch.get('device')} (torch {torch.get('torch')}, tf32={torch.get('tf32')}):")
        for pat, key, what in PAIRS:
            hits = [(n, v) for n, v in crit.items() if re.search(pat, n)]
            if not hits or key not in torch:
                print(f"  {what}: missing ({'no dfpo bench' if not hits else 'no torch time'})")
                continue
            n, (ms, _) = hits[0]
            print(f"  {what}: dfpo {ms:.4f} ms, torch {torch[key]:.4f} ms -> {torch[key] / ms:.2f}x  [{n}]")
    if "torch_generate" in torch:
        g = torch["torch_generate"]
        print(f"  (rollout generate torch side: {g.get('device')}, {g.get('dtype')}, "
              f"torch.compile {'on' if g.get('compiled') else 'off'}, "
              f"{torch['generate_rollout_tokens_per_s']:.0f} new tokens/s)")
    train_step_ratios(crit, torch.get("torch_dfpo_step"))


def train_step_ratios(crit, ref):
    """Issue 4's targets from benches/train_step.rs (criterion) and torch_dfpo_step.py (ref):
    DFPO/PPO time per section and phase (<= 1.15), and ours / torch tokens/s of the DFPO update
    on the same card (>= 1.5)."""
    sections = sorted({n.split("/")[0] for n in crit if n.startswith("train_step_")})
    if not sections and not ref:
        return
    print("\nDFPO training step (benches/train_step.rs; tools/reference/torch_dfpo_step.py):")
    for sec in sections:
        for phase in ("step", "update"):
            d, p = crit.get(f"{sec}/dfpo/{phase}"), crit.get(f"{sec}/ppo/{phase}")
            if d and p:
                r = d[0] / p[0]
                print(f"  {sec} {phase}: DFPO/PPO time {r:.3f} (dfpo {d[0]:.2f} ms, ppo {p[0]:.2f} ms; "
                      f"target <= 1.15: {'met' if r <= 1.15 else 'NOT met'})")
    if ref:
        if "dfpo_over_ppo" in ref:
            print(f"  torch {ref.get('shape')} update: DFPO/PPO time {ref['dfpo_over_ppo']:.3f}")
        for algo in ("dfpo", "ppo"):
            ours = crit.get(f"train_step_cuda/{algo}/update")
            t = ref.get(algo)
            if not ours or not t:
                print(f"  {algo} update, ours vs torch: missing ({'no dfpo bench' if not ours else 'no torch time'})")
                continue
            ms, thr = ours
            tokens = thr.get("Elements")
            if not tokens:
                print(f"  {algo} update, ours vs torch: the criterion bench has no token count")
                continue
            ours_tps = tokens / (ms * 1e-3)
            r = ours_tps / t["tokens_per_s"]
            note = ""
            if tokens != ref.get("B", 0) * ref.get("S", 0):
                note = f" (SHAPES DIFFER: ours {tokens} tokens, torch {ref.get('B')} x {ref.get('S')})"
            target = f"; target >= 1.5: {'met' if r >= 1.5 else 'NOT met'}" if algo == "dfpo" else ""
            print(f"  {algo} update, ours / torch tokens/s: {ours_tps:.0f} / {t['tokens_per_s']:.0f} = {r:.2f}x"
                  f" on {ref.get('device')} ({ref.get('dtype')}){target}{note}")


if __name__ == "__main__":
    main()
