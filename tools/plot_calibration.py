#!/usr/bin/env python3
"""Plot and tabulate dfpo-train's critic calibration (eval.critic_prefixes > 0).

    tools/plot_calibration.py RUN_DIR_OR_JSON [...] --out PNG [--table]

A RUN_DIR is a dfpo-train output folder (its critic_calibration.json is read). The PNG holds
one PIT histogram per critic and truth (a calibrated critic's is flat at 1/bins; mass at the
ends: too narrow; in the middle: too wide). --table prints the scores as a Markdown table.
Needs matplotlib for the PNG: pip install -r tools/reference/requirements-plot.txt
"""
import argparse
import json
import os
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


def table(runs):
    lines = [
        "| critic | truth | value MSE | CRPS (floor) | CVaR_α abs. error | PIT L1 |",
        "|---|---|---|---|---|---|",
    ]
    for _, c in runs:
        for cr in c["critics"]:
            for truth in ("noisy", "clean"):
                s = cr[truth]
                lines.append(
                    f"| {cr['name']} | {truth} | {s['value_mse']:.4f} | {s['crps']:.4f} "
                    f"({s['crps_floor']:.4f}) | {s['cvar_abs_err']:.3f} | {s['pit_l1']:.2f} |"
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
    critics = [(c, cr) for _, c in runs for cr in c["critics"]]
    fig, axes = plt.subplots(len(critics), 2, figsize=(9, 2.2 * len(critics)), squeeze=False)
    for i, (c, cr) in enumerate(critics):
        for j, truth in enumerate(("noisy", "clean")):
            ax = axes[i][j]
            h = cr[truth]["pit"]
            b = len(h)
            ax.bar([(k + 0.5) / b for k in range(b)], h, width=1.0 / b, edgecolor="black")
            ax.axhline(1.0 / b, color="red", linestyle="--", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{cr['name']}, {truth} truth (step {c['step']})", fontsize="small")
            if i == len(critics) - 1:
                ax.set_xlabel("PIT")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out} ({len(critics)} critics)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
