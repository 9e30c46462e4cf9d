#!/usr/bin/env python3
"""Plot and tabulate dfpo-train's critic calibration (eval.critic_prefixes > 0).

    tools/plot_calibration.py RUN_DIR_OR_JSON [...] --out PNG [--table]

A RUN_DIR is a dfpo-train output folder (its critic_calibration.json is read). The PNG holds
one PIT histogram per critic and truth (a calibrated critic's is flat at 1/bins; mass at the
ends: too narrow; in the middle: too wide). --table prints the scores as a Markdown table;
runs whose folder names differ only by a "-sN" seed suffix are one row, mean ± sample std
over the seeds (the PNG shows their mean histogram).
Needs matplotlib for the PNG: pip install -r tools/reference/requirements-plot.txt
"""
import argparse
import json
import os
import re
import sys

from plot_metrics import pyplot


def fail(msg):
    print(f"plot_calibration: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load(arg):
    path = os.path.join(arg, "critic_calibration.json") if os.path.isdir(arg) else arg
    if not os.path.isfile(path):
        fail(f"{path}: no such file (run dfpo-train with --set eval.critic_prefixes=N)")
    try:
        with open(path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON: {e}")
    for key in ("critics", "prefixes", "continuations", "step"):
        if key not in c:
            fail(f"{path}: no {key!r}: not a critic_calibration.json")
    return path, c


def run_label(path):
    """The run's folder name without a "-sN" seed suffix."""
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return re.sub(r"-s\d+$", "", name)


def groups(runs):
    """[(run label, critic name, [critic entries over seeds], step)] in first-seen order."""
    out = {}
    for path, c in runs:
        for cr in c["critics"]:
            key = (run_label(path), cr["name"])
            out.setdefault(key, (c["step"], []))[1].append(cr)
    return [(label, name, crs, step) for (label, name), (step, crs) in out.items()]


def stat(xs, digits):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.{digits}f}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def table(runs):
    lines = [
        "| run | critic | seeds | truth | value MSE | CRPS | CRPS floor | CVaR_α abs. error | PIT L1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, name, crs, _ in groups(runs):
        for truth in ("noisy", "clean"):
            col = lambda k, d: stat([cr[truth][k] for cr in crs], d)
            lines.append(
                f"| {label} | {name} | {len(crs)} | {truth} | {col('value_mse', 4)} | "
                f"{col('crps', 3)} | {col('crps_floor', 3)} | {col('cvar_abs_err', 3)} | "
                f"{col('pit_l1', 2)} |"
            )
    return "\n".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(prog="tools/plot_calibration.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_JSON")
    ap.add_argument("--out", help="PNG to write")
    ap.add_argument("--table", action="store_true", help="print a Markdown table of the scores")
    a = ap.parse_args(argv)
    if not a.out and not a.table:
        fail("nothing to do: give --out PNG and/or --table")
    runs = [load(arg) for arg in a.runs]
    if a.table:
        print(table(runs))
    if not a.out:
        return 0
    plt = pyplot(fail)
    rows = groups(runs)
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 2.5 * len(rows)), squeeze=False)
    for i, (label, name, crs, step) in enumerate(rows):
        for j, truth in enumerate(("noisy", "clean")):
            ax = axes[i][j]
            b = len(crs[0][truth]["pit"])
            h = [sum(cr[truth]["pit"][k] for cr in crs) / len(crs) for k in range(b)]
            ax.bar([(k + 0.5) / b for k in range(b)], h, width=1.0 / b, edgecolor="black")
            ax.axhline(1.0 / b, color="red", linestyle="--", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            seeds = f", {len(crs)} seeds" if len(crs) > 1 else ""
            ax.set_title(f"{label}: {name}\n{truth} truth, step {step}{seeds}", fontsize="small")
            if i == len(rows) - 1:
                ax.set_xlabel("PIT")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out} ({len(rows)} critics)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
