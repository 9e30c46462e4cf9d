#!/usr/bin/env python3
"""Compare DFPO with its baselines under reward noise.

Runs `dfpo-train train` for every algorithm x reward flip probability x seed (skipping runs whose
summary.json already exists, so an interrupted comparison resumes), then writes a Markdown
report (clean in-domain and out-of-domain accuracy before and after training, mean +- sample
std over seeds) and, when matplotlib is installed, a plot of accuracy against noise.

Each run gets
  --set run.out_dir=<runs-dir>/<algo>-p<noise>-s<seed> --set algo.name=<algo>
  --set reward.flip_prob=<noise> --set run.seed=<seed> --set run.progress=false
plus the extra --set options given here (e.g. --set run.steps=10).

The trainer is $DFPO_TRAIN, else target/release/dfpo-train (built with cargo when missing).
Standard library only; matplotlib is optional.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX_KEYS = ("run.out_dir", "algo.name", "reward.flip_prob", "run.seed")
SPLITS = ("in_domain", "out_of_domain")


def fail(msg):
    print(f"tools/compare: error: {msg}", file=sys.stderr)
    sys.exit(2)


def fmt_p(p):
    """0.0 -> '0', 0.2 -> '0.2' (the spelling used in run names and the table)."""
    return "%g" % p


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="tools/compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--algos", default="dfpo,ppo,grpo,quantile", help="comma-separated (default: %(default)s)")
    ap.add_argument("--noise", default="0,0.2,0.4", help="reward flip probabilities, comma-separated (default: %(default)s)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N per cell (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra option for every run (repeatable), e.g. --set run.steps=10")
    ap.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "compare"), help="where the runs go (default: runs/compare)")
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "RESULTS.md"), help="report (default: docs/RESULTS.md)")
    ap.add_argument("--png", default=os.path.join(REPO, "docs", "results.png"), help="plot (default: docs/results.png)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; report the summaries that exist")
    a = ap.parse_args(argv)
    a.algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    for algo in a.algos:
        if algo not in ("dfpo", "ppo", "grpo", "quantile"):
            fail(f"--algos: unknown algorithm {algo!r} (dfpo, ppo, grpo, quantile)")
    try:
        a.noise = [float(x) for x in a.noise.split(",") if x.strip()]
    except ValueError:
        fail(f"--noise: expected comma-separated numbers, got {a.noise!r}")
    for p in a.noise:
        if not 0.0 <= p <= 1.0:
            fail(f"--noise: flip probability {p} is outside [0, 1]")
    if not a.algos or not a.noise:
        fail("--algos and --noise must not be empty")
    if a.seeds < 1:
        fail(f"--seeds must be >= 1, got {a.seeds}")
    if a.jobs < 1:
        fail(f"--jobs must be >= 1, got {a.jobs}")
    for s in a.sets:
        key = s.partition("=")[0].strip()
        if "=" not in s:
            fail(f"--set {s!r}: expected KEY=VALUE")
        if key in MATRIX_KEYS:
            fail(f"--set {s!r}: {key} is set by the comparison matrix itself")
    a.runs_dir = os.path.abspath(a.runs_dir)
    return a


def run_name(algo, p, seed):
    return f"{algo}-p{fmt_p(p)}-s{seed}"


def trainer_path():
    """$DFPO_TRAIN, else the release binary (built when missing)."""
    env = os.environ.get("DFPO_TRAIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            fail(f"DFPO_TRAIN={env} is not an executable file")
        return env
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    exe = os.path.join(target, "release", "dfpo-train")
    if not os.path.isfile(exe):
        print(f"{exe} missing: cargo build --release --bin dfpo-train", flush=True)
        r = subprocess.run(["cargo", "build", "--release", "--bin", "dfpo-train"], cwd=REPO)
        if r.returncode != 0 or not os.path.isfile(exe):
            fail("cargo build --release --bin dfpo-train failed")
    return exe


def run_one(exe, out_dir, algo, p, seed, extra):
    """Runs one training; returns None on success or an error message."""
    # The log sits next to the run folder: a run folder holds only what dfpo-train writes.
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    cmd = [exe, "train",
           "--set", f"run.out_dir={out_dir}", "--set", f"algo.name={algo}",
           "--set", f"reward.flip_prob={fmt_p(p)}", "--set", f"run.seed={seed}",
           "--set", "run.progress=false"]
    for s in extra:
        cmd += ["--set", s]
    log_path = out_dir.rstrip("/") + ".log"
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-5:])
        return f"exit status {r.returncode} (log: {log_path}):\n{tail}"
    if not os.path.isfile(os.path.join(out_dir, "summary.json")):
        return f"finished without writing summary.json (log: {log_path})"
    return None


def get(d, path, kind, where):
    """d[path...] checked to be a number (kind='num') or a string (kind='str')."""
    cur = d
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            raise ValueError(f"{where}: missing field {'.'.join(path)}")
        cur = cur[k]
    ok = isinstance(cur, str) if kind == "str" else (isinstance(cur, (int, float)) and not isinstance(cur, bool))
    if not ok:
        raise ValueError(f"{where}: field {'.'.join(path)}: expected a {'string' if kind == 'str' else 'number'}, got {cur!r}")
    return cur


def load_summary(path, algo, p, seed):
    """The numbers of one summary.json, checked against the run it should belong to."""
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}")
    out = {
        "algo": get(s, ["algo"], "str", path),
        "seed": get(s, ["seed"], "num", path),
        "flip_prob": get(s, ["flip_prob"], "num", path),
        "steps": get(s, ["steps"], "num", path),
        "seconds": get(s, ["seconds"], "num", path),
    }
    if (out["algo"], out["seed"]) != (algo, seed) or abs(out["flip_prob"] - p) > 1e-9:
        raise ValueError(f"{path}: belongs to algo={out['algo']} seed={out['seed']} flip_prob={out['flip_prob']}, "
                         f"expected algo={algo} seed={seed} flip_prob={fmt_p(p)}")
    for when in ("before", "after"):
        for split in SPLITS:
            a = get(s, [when, split, "accuracy"], "num", path)
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"{path}: field {when}.{split}.accuracy = {a} is outside [0, 1]")
            out[f"{when}/{split}"] = a
    return out


def mean_std(xs):
    """Mean and sample standard deviation (n - 1); std is None for one value."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_ms(xs):
    if not xs:
        return "n/a"
    m, s = mean_std(xs)
    return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"


def fmt_mean(xs, spec=".3f"):
    return "n/a" if not xs else format(sum(xs) / len(xs), spec)


def report(a, cells, problems, png_written, command):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Generated by `tools/compare` on {now}. Command (from `{os.getcwd()}`):",
        "",
        "    " + command,
        "",
        "Clean accuracy (the training reward is noisy, the evaluation is not) on the in-domain and",
        "out-of-domain eval splits: `before` is the warm-start policy, `after` the policy after",
        "training. Training rewards were flipped (correct <-> incorrect) with probability",
        "`flip_prob`. Cells are the mean ± the sample standard deviation (n - 1) over the seeds that",
        "finished (no ± with one seed; n/a when none did). Wall time is the mean per run.",
        "",
        "| algo | flip_prob | seeds | steps | in-domain before | in-domain after | OOD before | OOD after | wall s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for algo in a.algos:
        for p in a.noise:
            runs = cells[(algo, p)]
            col = lambda k: [r[k] for r in runs]
            steps = sorted({int(r["steps"]) for r in runs})
            total += sum(col("seconds"))
            lines.append(
                f"| {algo} | {fmt_p(p)} | {len(runs)} | {'/'.join(map(str, steps)) or 'n/a'} "
                f"| {fmt_mean(col('before/in_domain'))} | {fmt_ms(col('after/in_domain'))} "
                f"| {fmt_mean(col('before/out_of_domain'))} | {fmt_ms(col('after/out_of_domain'))} "
                f"| {fmt_mean(col('seconds'), '.1f')} |"
            )
    lines += ["", f"Total wall time of the runs in the table: {total:.1f} s. Runs: `{a.runs_dir}`."]
    if problems:
        lines += ["", "Missing or failed runs:", ""] + [f"- {p}" for p in problems]
    if png_written:
        rel = os.path.relpath(a.png, os.path.dirname(os.path.abspath(a.results)))
        lines += ["", f"![accuracy against reward noise]({rel})"]
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    write_between_markers(a.results, lines)


BEGIN, END = "<!-- smoke:begin -->", "<!-- smoke:end -->"


def write_between_markers(path, lines):
    """docs/RESULTS.md holds more than this report (the noise matrix, hand-written readings): when
    `path` has the markers, only the text between them is replaced; otherwise the file is the
    report under its own title."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    body = "\n".join(lines) + "\n"
    if text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        out = head + BEGIN + "\n" + body + END + rest.split(END, 1)[1]
    elif BEGIN in text or END in text:
        sys.exit(f"tools/compare: error: {path}: expected one line {BEGIN} followed by one line {END}")
    else:
        out = "# DFPO and its baselines under reward noise\n\n" + body
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, path)


def plot(a, cells):
    """docs/results.png: accuracy against flip_prob per algo (mean ± std), one panel per split."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot "
              "(pip install -r tools/reference/requirements-plot.txt)", flush=True)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, split, title in zip(axes, SPLITS, ("in-domain", "out-of-domain")):
        before = [r[f"before/{split}"] for runs in cells.values() for r in runs]
        if before:
            ax.axhline(sum(before) / len(before), color="gray", linestyle="--", label="warm start")
        for algo in a.algos:
            xs, ms, ss = [], [], []
            for p in a.noise:
                vals = [r[f"after/{split}"] for r in cells[(algo, p)]]
                if vals:
                    m, s = mean_std(vals)
                    xs.append(p)
                    ms.append(m)
                    ss.append(s or 0.0)
            if xs:
                ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=algo)
        ax.set_title(f"{title} accuracy after training")
        ax.set_xlabel("reward flip probability")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clean accuracy")
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.png)), exist_ok=True)
    fig.savefig(a.png, dpi=120)
    print(f"wrote {a.png}")
    return True


def main(argv):
    a = parse_args(argv)
    command = " ".join(shlex.quote(x) for x in ["tools/compare"] + argv)
    matrix = [(algo, p, seed) for algo in a.algos for p in a.noise for seed in range(1, a.seeds + 1)]
    summary = lambda algo, p, seed: os.path.join(a.runs_dir, run_name(algo, p, seed), "summary.json")
    todo = [m for m in matrix if not os.path.isfile(summary(*m))]
    failures = {}
    if not a.report_only:
        print(f"{len(matrix) - len(todo)} of {len(matrix)} runs already done; {len(todo)} to run", flush=True)
        if todo:
            exe = trainer_path()
            with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
                futures = {
                    pool.submit(run_one, exe, os.path.join(a.runs_dir, run_name(*m)), *m, a.sets): m
                    for m in todo
                }
                for fut in concurrent.futures.as_completed(futures):
                    m = futures[fut]
                    err = fut.result()
                    print(f"{run_name(*m)}: {'ok' if err is None else 'FAILED ' + err}", flush=True)
                    if err is not None:
                        failures[m] = err
    cells = {(algo, p): [] for algo in a.algos for p in a.noise}
    problems = []
    for m in matrix:
        path = summary(*m)
        if m in failures:
            problems.append(f"{run_name(*m)}: failed: {failures[m].splitlines()[0]}")
        elif not os.path.isfile(path):
            problems.append(f"{run_name(*m)}: no {path}")
        else:
            try:
                cells[(m[0], m[1])].append(load_summary(path, *m))
            except ValueError as e:
                problems.append(f"{run_name(*m)}: {e}")
    png_written = plot(a, cells) if any(cells.values()) else False
    report(a, cells, problems, png_written, command)
    print(f"wrote {a.results}")
    if problems:
        print(f"{len(problems)} of {len(matrix)} runs missing or failed:", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
