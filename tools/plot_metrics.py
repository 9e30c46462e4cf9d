#!/usr/bin/env python3
"""Plot dfpo-train metrics: one subplot per metric, one line per run.

    tools/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [...] --out PNG [--keys k1,k2,...]

A RUN_DIR is a dfpo-train output folder (its metrics.jsonl is read). Lines are
{"step": n, "<name>": value, ...}; null values (non-finite in the run) are skipped. Without
--keys the conventional training metrics present in the runs are plotted (all metrics when
none of them is present). Needs matplotlib: pip install -r tools/reference/requirements-plot.txt
"""
import argparse
import json
import math
import os
import sys

DEFAULT_KEYS = [
    "reward/noisy_mean",
    "reward/clean_mean",
    "eval/in_domain/accuracy",
    "eval/out_of_domain/accuracy",
    "actor/pg_loss",
    "actor/clipfrac",
    "actor/ppo_kl",
    "actor/entropy",
    "actor/grad_norm",
    "critic/loss",
    "critic/value_mean",
    "critic/value_std",
    "critic/cvar",
    "response_length/mean",
    "timing/step_s",
    "perf/tokens_per_s",
]


def fail(msg):
    print(f"plot_metrics: error: {msg}", file=sys.stderr)
    sys.exit(2)


def pyplot(fail):
    """matplotlib.pyplot on the Agg backend, or `fail` with how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install -r tools/reference/requirements-plot.txt "
             "(e.g. python3 -m venv ~/.dfpo-plotenv && ~/.dfpo-plotenv/bin/pip install -r "
             "tools/reference/requirements-plot.txt, then run this script with ~/.dfpo-plotenv/bin/python)")
    return plt


def metrics_path(arg):
    """(path of metrics.jsonl, run label) for a run folder or a metrics file."""
    if os.path.isdir(arg):
        path = os.path.join(arg, "metrics.jsonl")
        label = os.path.basename(os.path.normpath(arg))
    else:
        path = arg
        label = os.path.basename(os.path.dirname(os.path.abspath(arg))) or arg
    if not os.path.isfile(path):
        fail(f"{path}: no such metrics file")
    return path, label


def read_metrics(path):
    """[{name: value or None}] per line; errors name the file and line."""
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}: line {lineno}: not valid JSON: {e}")
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                fail(f"{path}: line {lineno}: expected a JSON object with a numeric \"step\"")
            for k, v in row.items():
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    fail(f"{path}: line {lineno}: {k!r}: expected a number or null, got {v!r}")
            rows.append(row)
    return rows


def series(rows, key):
    """(steps, values) of `key`, skipping lines without it and nulls."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is not None and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def main(argv):
    ap = argparse.ArgumentParser(prog="tools/plot_metrics.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_METRICS_JSONL")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--keys", help="comma-separated metric names (default: the conventional ones present)")
    a = ap.parse_args(argv)
    runs = []
    for arg in a.runs:
        path, label = metrics_path(arg)
        runs.append((label, read_metrics(path)))
    present = set()
    for _, rows in runs:
        for r in rows:
            present.update(k for k in r if k != "step")
    if a.keys:
        keys = [k.strip() for k in a.keys.split(",") if k.strip()]
        missing = [k for k in keys if k not in present]
        if missing:
            fail(f"--keys: {', '.join(missing)} not in any run (present: {', '.join(sorted(present)) or 'none'})")
    else:
        keys = [k for k in DEFAULT_KEYS if k in present] or sorted(present)
    if not keys:
        fail("the metrics files have no metrics to plot")
    plt = pyplot(fail)
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for i, key in enumerate(keys):
        ax = axes[i // ncols][i % ncols]
        for label, rows in runs:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    for j in range(len(keys), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    fig.tight_layout()
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out} ({len(keys)} metrics, {len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
