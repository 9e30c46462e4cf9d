#!/usr/bin/env python3
"""The noisy-reward experiment of issue 12 on the built-in chain task (`tools/compare --experiment noise`).

Phases (every run is one `dfpo-train train` in <runs-dir>/<phase>/<name>-s<seed>). Each finished run
leaves a small record, <records>/<phase>/<name>-s<seed>.json (its settings, the eval curves, the
final accuracies, its time, the checkout's commit when the driver started and the SHA-256 of the
trainer binary that ran it; committed to the repository by default, as
checkouts and run folders do not outlive a session). A run with a record of the same settings, or
a summary.json in its run folder, is skipped, so the matrix resumes and can be run in pieces, on
different days and machines:

1. sweep:  per algorithm, a 3-point actor learning-rate sweep (3e-6, 1e-5, 3e-5 = optim.actor_lr)
           at the sweep noise setting, --sweep-seeds seeds. The learning rate of each algorithm is
           chosen by its mean area under the VALIDATION accuracy curve (prompts carved from the
           training side; the eval splits are never used for a choice). Written to
           <runs-dir>/lr_choice.json.
2. main:   algorithms x noise models x 2 levels x --seeds seeds, at the chosen learning rates.
3. ladder: DFPO's ablation ladder at the ladder setting: flow critic with BCFM only
           (critic.w_dcfm = w_gc = w_cvar = w_gain = w_shape = 0), + DCFM (w_dcfm back),
           + consistency (w_gc back), + risk terms (= dfpo, the main cell); PPO is the main cell.
4. refs:   references at the ladder setting: PPO and GRPO with the debiased reward
           (reward.debias = true, the known rates), GRPO with a group of 8 (rollout.n_samples = 8).
5. probe:  the one change to DFPO most likely to help (PROBES below), at the ladder setting, judged
           on the VALIDATION split against the main DFPO cell (paired per seed), with the same
           change to PPO as its control.
6. calib:  the critic calibration of issue 10 (`eval.critic_prefixes`, src/train/calibration.rs) for
           the finished runs with a critic whose run folder is still there: the run is resumed at
           its last step in a copy of its folder with --calib-prefixes prefixes x
           --calib-continuations continuations (the training is not repeated; ~8 CPU-s per run at
           the defaults)
           and the scores are added to its record. Run folders do not outlive a checkout, so the
           cells that have it are those whose runs were made in the checkout that ran this phase;
           the report says how many seeds each row has.

Every run is scored on the same fixed eval sets (the whole held-out pools of the chain task:
in_domain 400 prompts, out_of_domain 200, validation 200; independent of the seed), clean and
greedy, every --eval-every steps. Statistics: per cell the mean ± sample std over seeds of the
final in-domain accuracy and of the area under the in-domain accuracy curve (trapezoid over the
evals at steps 0, e, 2e, ..., T, divided by T); per seed the difference to PPO at the same noise
setting and seed (paired), its mean and a percentile bootstrap 95% interval over seeds (10 000
resamples, fixed seed).

Standard library only; matplotlib (optional) draws the curves.
"""
import argparse
import concurrent.futures
import datetime
import hashlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (description, level key, levels, sets(level))
NOISE_MODELS = {
    "flip": ("symmetric flips (correct <-> incorrect with p)", "p", (0.2, 0.4),
             lambda v: [f"reward.flip_prob={v}"]),
    "fneg": ("asymmetric false negatives (correct -> 0 with p)", "p", (0.3, 0.6),
             lambda v: ["reward.flip_prob=0", f"reward.fn_prob={v}"]),
    "fpos": ("asymmetric false positives (wrong -> 1 with p)", "p", (0.1, 0.2),
             lambda v: ["reward.flip_prob=0", f"reward.fp_prob={v}"]),
    "heavy": ("heavy-tailed additive noise: s * Student-t(nu = 2)", "s", (0.3, 1.0),
              lambda v: ["reward.flip_prob=0", f"reward.t_scale={v}", "reward.t_nu=2"]),
    "outlier": ("rare outliers: +-5 with probability p", "p", (0.02, 0.1),
                lambda v: ["reward.flip_prob=0", f"reward.outlier_prob={v}", "reward.outlier_mag=5"]),
    "state": ("state-dependent flips: p on prompts with an odd first operand, 0.05 elsewhere", "p", (0.3, 0.45),
              lambda v: ["reward.flip_prob=0.05", "reward.subset=odd_first", f"reward.subset_flip_prob={v}"]),
    "partial": ("flawed verifier: partial credit c for a wrong full scratchpad", "c", (0.3, 0.6),
                lambda v: ["reward.flip_prob=0", f"reward.partial_credit={v}"]),
}
ALGOS = ("dfpo", "ppo", "grpo", "quantile")
# The actor learning-rate grid (a factor ~3 apart). On the 700-step warm start, clean
# reward, 60 steps, seed 1: grpo/ppo gain at 1e-5 and 3e-5 (in-domain 0.785 -> 0.82-0.83) and lose
# at 1e-4 (grpo 0.732), so the grid brackets 1e-5 from below and above (docs/RESULTS.md, issue 12).
# The first sweep chose 3e-6, the grid's lower edge, for every algorithm; 1e-6 was added so that
# the grid brackets the choice (docs/RESULTS.md, issue 12).
LR_GRID = (1e-6, 3e-6, 1e-5, 3e-5)
# The rate used without a sweep (--no-sweep) and the one that wins sweep ties: the grid's middle,
# not the trainer's optim.actor_lr default (1e-4, tuned for the arith task), which loses here.
DEFAULT_ACTOR_LR = 1e-5
LADDER = [
    ("dfpo-bcfm", "flow critic, BCFM only",
     ["critic.w_dcfm=0", "critic.w_gc=0", "critic.w_cvar=0", "critic.w_gain=0", "critic.w_shape=0"]),
    ("dfpo-dcfm", "+ DCFM", ["critic.w_gc=0", "critic.w_cvar=0", "critic.w_gain=0", "critic.w_shape=0"]),
    ("dfpo-gc", "+ consistency", ["critic.w_cvar=0", "critic.w_gain=0", "critic.w_shape=0"]),
]
REFS = [
    ("ppo-debias", "ppo", "PPO, debiased reward (r - p)/(1 - 2p)", ["reward.debias=true"]),
    ("grpo-debias", "grpo", "GRPO, debiased reward", ["reward.debias=true"]),
    ("grpo-g8", "grpo", "GRPO, group of 8 (rollout.n_samples = 8)", ["rollout.n_samples=8"]),
]

# The change to DFPO most likely to help under reward noise, tested on validation. A noisy reward
# reaches the policy through the Monte-Carlo part of the advantage: with gamma = 1 and lambda = 0.95
# the first of ~40 response tokens still carries 0.95^40 = 13% of the final reward's noise
# undamped by the critic, the last ten 60-100%. A critic trained on many rollouts averages the
# noise out; a smaller lambda lets the advantage lean on it (0.8^10 = 0.11). This is the only
# way the distributional critic, whose mean is the baseline, can change what the policy sees.
PROBES = [
    ("dfpo-lam0.8", "dfpo", "DFPO, GAE lambda 0.8", ["ppo.lam=0.8"]),
    ("ppo-lam0.8", "ppo", "PPO, GAE lambda 0.8 (control)", ["ppo.lam=0.8"]),
]


def fail(msg):
    print(f"tools/compare --experiment noise: error: {msg}", file=sys.stderr)
    sys.exit(2)


def fmt(v):
    return "%g" % v


def parse_setting(s):
    """'flip:0.4' -> ('flip', 0.4)."""
    name, _, lvl = s.partition(":")
    if name not in NOISE_MODELS:
        fail(f"unknown noise model {name!r} (one of {', '.join(NOISE_MODELS)})")
    try:
        return name, float(lvl)
    except ValueError:
        fail(f"{s!r}: expected MODEL:LEVEL, e.g. flip:0.4")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="tools/compare --experiment noise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="dfpo,ppo,grpo", help="comma-separated (default: %(default)s)")
    ap.add_argument("--noise-models", default="flip,fneg,heavy",
                    help=f"main-matrix noise models, comma-separated, of {','.join(NOISE_MODELS)} (default: %(default)s)")
    ap.add_argument("--levels", default="", help="override the two levels of every model, e.g. 0.2,0.4")
    ap.add_argument("--seeds", type=int, default=10, help="seeds 1..N of the main matrix, ladder and references (default: %(default)s)")
    ap.add_argument("--ladder-seeds", type=int, default=0, help="seeds of the ladder and references (default: --seeds)")
    ap.add_argument("--sweep-seeds", type=int, default=2, help="seeds of the learning-rate sweep (default: %(default)s)")
    ap.add_argument("--sweep-setting", default="flip:0.2", help="noise setting of the sweep (default: %(default)s)")
    ap.add_argument("--ladder-setting", default="flip:0.4", help="noise setting of the ladder and references (default: %(default)s)")
    ap.add_argument("--phases", default="sweep,main,ladder,refs,probe,calib", help="which phases (default: %(default)s)")
    ap.add_argument("--calib-prefixes", type=int, default=100, help="calib: states per run (default: %(default)s)")
    ap.add_argument("--calib-continuations", type=int, default=32,
                    help="calib: continuations per state (default: %(default)s)")
    ap.add_argument("--calib-rerun-seeds", type=int, default=0,
                    help="calib: also rerun the training of recorded runs of seeds 1..N whose run folder is gone "
                         "(a fresh checkout), check that the rerun reproduces the record's curves, then calibrate "
                         "it (default: %(default)s = only runs with a folder)")
    ap.add_argument("--no-sweep", action="store_true", help=f"skip the sweep: every algorithm at actor lr {DEFAULT_ACTOR_LR:g}")
    ap.add_argument("--lr-grid", default=",".join(fmt(x) for x in LR_GRID),
                    help="the sweep's actor learning rates (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=60, help="RL steps per run (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=15, help="clean evals every this many steps (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (default: %(default)s)")
    ap.add_argument("--max-runs", type=int, default=0, help="stop after starting this many runs (0: all), to run the matrix in pieces")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra option for every run (repeatable)")
    ap.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "noise"), help="(default: runs/noise)")
    ap.add_argument("--records", default=os.path.join(REPO, "docs", "results-noise", "runs"),
                    help="one small JSON per finished run, read instead of the run folder (default: docs/results-noise/runs)")
    ap.add_argument("--results", default=os.path.join(REPO, "docs", "results-noise.md"), help="report (default: docs/results-noise.md)")
    ap.add_argument("--splice", default=None,
                    help="also write the report into this markdown file between the lines "
                         "'<!-- noise-matrix:begin -->' and '<!-- noise-matrix:end -->' (default: docs/RESULTS.md "
                         "when --results is the default; 'none': nowhere)")
    ap.add_argument("--png", default=os.path.join(REPO, "docs", "results-noise.png"), help="curves (default: docs/results-noise.png)")
    ap.add_argument("--title", default="The noisy-reward matrix on the chain task", help="heading of the report")
    ap.add_argument("--report-only", action="store_true", help="run nothing; report what exists")
    ap.add_argument("--dry-run", action="store_true", help="print the runs that would start, run nothing")
    a = ap.parse_args(argv)
    a.algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    for x in a.algos:
        if x not in ALGOS:
            fail(f"--algos: unknown algorithm {x!r} ({', '.join(ALGOS)})")
    if "ppo" not in a.algos:
        fail("--algos must include ppo (the paired differences are against it)")
    a.noise_models = [x.strip() for x in a.noise_models.split(",") if x.strip()]
    for x in a.noise_models:
        if x not in NOISE_MODELS:
            fail(f"--noise-models: unknown {x!r} ({', '.join(NOISE_MODELS)})")
    a.level_override = None
    if a.levels:
        try:
            a.level_override = tuple(float(v) for v in a.levels.split(","))
        except ValueError:
            fail(f"--levels: expected numbers, got {a.levels!r}")
    try:
        a.lr_grid = tuple(float(x) for x in a.lr_grid.split(",") if x.strip())
    except ValueError:
        fail(f"--lr-grid: expected numbers, got {a.lr_grid!r}")
    if not a.lr_grid or min(a.lr_grid) <= 0:
        fail("--lr-grid: expected positive learning rates")
    a.sweep_setting = parse_setting(a.sweep_setting)
    a.ladder_setting = parse_setting(a.ladder_setting)
    a.phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    for x in a.phases:
        if x not in ("sweep", "main", "ladder", "refs", "probe", "calib"):
            fail(f"--phases: unknown phase {x!r} (sweep, main, ladder, refs, probe, calib)")
    if a.no_sweep and "sweep" in a.phases:
        a.phases.remove("sweep")
    for n, what in ((a.seeds, "--seeds"), (a.sweep_seeds, "--sweep-seeds"), (a.steps, "--steps"),
                    (a.calib_prefixes, "--calib-prefixes"), (a.calib_continuations, "--calib-continuations"),
                    (a.eval_every, "--eval-every"), (a.jobs, "--jobs")):
        if n < 1:
            fail(f"{what} must be >= 1, got {n}")
    if a.calib_rerun_seeds < 0:
        fail(f"--calib-rerun-seeds must be >= 0, got {a.calib_rerun_seeds}")
    for s in a.sets:
        if "=" not in s:
            fail(f"--set {s!r}: expected KEY=VALUE")
        key = s.partition("=")[0].strip()
        if key in ("run.out_dir", "run.seed", "algo.name", "optim.actor_lr", "data.task") or key.startswith("reward."):
            fail(f"--set {s!r}: {key} is set by the experiment itself")
    if a.ladder_seeds < 0:
        fail(f"--ladder-seeds must be >= 0, got {a.ladder_seeds}")
    a.ladder_seeds = a.ladder_seeds or a.seeds
    default_results = os.path.join(REPO, "docs", "results-noise.md")
    if a.splice is None:
        a.splice = os.path.join(REPO, "docs", "RESULTS.md") if os.path.abspath(a.results) == default_results else ""
    elif a.splice == "none":
        a.splice = ""
    a.runs_dir = os.path.abspath(a.runs_dir)
    a.records = os.path.abspath(a.records)
    return a


def levels_of(a, model):
    return a.level_override or NOISE_MODELS[model][2]


def setting_name(model, level):
    return f"{model}{fmt(level)}"


class Run:
    """One training run: the cell it belongs to (phase, name), where it goes and what it sets.
    `same_as` points a run at an identical earlier one (a main run at the sweep setting, seed and
    chosen learning rate IS that sweep run), which is then reused, not run twice."""

    def __init__(self, phase, name, algo, seed, setting, sets, label, same_as=None):
        self.phase, self.name, self.algo, self.seed = phase, name, algo, seed
        self.setting, self.sets, self.label = setting, sets, label
        self.same_as = same_as

    @property
    def out_dir(self):
        return os.path.join(RUNS_DIR, self.key)

    @property
    def base(self):
        """The run that is actually trained: this one, or the identical earlier one."""
        return self.same_as if self.same_as is not None else self

    @property
    def key(self):
        return f"{self.base.phase}/{self.base.name}-s{self.base.seed}"

    def args(self):
        """The trainer's settings that make the run what it is (not where it writes)."""
        return [f"algo.name={self.base.algo}", f"run.seed={self.base.seed}"] + common_sets(ARGS) + self.base.sets

    def record_path(self):
        return os.path.join(ARGS.records, self.key + ".json")

    def record(self):
        """The run's record when it exists and was made with the same settings, else None."""
        try:
            with open(self.record_path()) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return None
        return rec if rec.get("args") == self.args() else None

    def done(self):
        if self.record() is not None:
            return True
        if os.path.exists(self.record_path()):
            return False  # a record of other settings (e.g. another --steps): run again
        return os.path.isfile(os.path.join(self.out_dir, "summary.json"))


RUNS_DIR = None
ARGS = None
COMMIT = False  # not read yet


def common_sets(a):
    return ["data.task=chain", f"run.steps={a.steps}", f"run.eval_every={a.eval_every}",
            "run.progress=false", "run.save_every=0", "run.log_samples=2"] + a.sets


def noise_sets(model, level):
    return NOISE_MODELS[model][3](level)


def sweep_runs(a):
    out = []
    model, level = a.sweep_setting
    for algo in a.algos:
        for lr in a.lr_grid:
            for seed in range(1, a.sweep_seeds + 1):
                out.append(Run("sweep", f"{algo}-lr{fmt(lr)}", algo, seed, (model, level),
                               noise_sets(model, level) + [f"optim.actor_lr={fmt(lr)}"], f"{algo} lr {fmt(lr)}"))
    return out


def lr_choice(a, results):
    """algo -> (chosen lr, {lr: mean validation AUC}) from the sweep runs (None when incomplete)."""
    path = os.path.join(RUNS_DIR, "lr_choice.json")
    if a.no_sweep:
        return {algo: (DEFAULT_ACTOR_LR, {}) for algo in a.algos}
    choice = {}
    for algo in a.algos:
        scores = {}
        for lr in a.lr_grid:
            vals = [r["auc"]["validation"] for r in results.get(("sweep", f"{algo}-lr{fmt(lr)}"), [])
                    if "validation" in r["auc"]]
            if len(vals) < a.sweep_seeds:
                return None
            scores[lr] = sum(vals) / len(vals)
        # Ties go to the default learning rate (then the smaller one).
        best = max(scores, key=lambda lr: (round(scores[lr], 6), lr == DEFAULT_ACTOR_LR, -lr))
        choice[algo] = (best, scores)
    os.makedirs(RUNS_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump({k: {"lr": v[0], "validation_auc": {fmt(x): y for x, y in v[1].items()}} for k, v in choice.items()},
                  f, indent=2)
    return choice


def main_runs(a, choice):
    out = []
    for model in a.noise_models:
        for level in levels_of(a, model):
            for algo in a.algos:
                lr = choice[algo][0]
                sets = noise_sets(model, level) + [f"optim.actor_lr={fmt(lr)}"]
                for seed in range(1, a.seeds + 1):
                    same = None
                    if not a.no_sweep and (model, level) == a.sweep_setting and seed <= a.sweep_seeds:
                        same = Run("sweep", f"{algo}-lr{fmt(lr)}", algo, seed, (model, level), sets, "")
                    out.append(Run("main", f"{algo}-{setting_name(model, level)}", algo, seed, (model, level),
                                   sets, algo, same))
    return out


def ladder_runs(a, choice):
    model, level = a.ladder_setting
    lr = choice.get("dfpo", (DEFAULT_ACTOR_LR,))[0]
    return [Run("ladder", f"{name}-{setting_name(model, level)}", "dfpo", seed, (model, level),
                noise_sets(model, level) + [f"optim.actor_lr={fmt(lr)}"] + extra, label)
            for name, label, extra in LADDER for seed in range(1, a.ladder_seeds + 1)]


def setting_runs(a, choice, phase, cells):
    """The runs of `cells` ((name, algo, label, extra sets)) at the ladder setting, each at its
    algorithm's chosen learning rate, seeds 1..--ladder-seeds."""
    model, level = a.ladder_setting
    out = []
    for name, algo, label, extra in cells:
        lr = choice.get(algo, (DEFAULT_ACTOR_LR,))[0]
        for seed in range(1, a.ladder_seeds + 1):
            out.append(Run(phase, f"{name}-{setting_name(model, level)}", algo, seed, (model, level),
                           noise_sets(model, level) + [f"optim.actor_lr={fmt(lr)}"] + extra, label))
    return out


def ref_runs(a, choice):
    return setting_runs(a, choice, "refs", REFS)


def probe_runs(a, choice):
    return setting_runs(a, choice, "probe", PROBES)


def trainer_path():
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


def run_one(exe, run, a):
    os.makedirs(os.path.dirname(run.out_dir), exist_ok=True)
    cmd = [exe, "train", "--set", f"run.out_dir={run.out_dir}"]
    for s in run.args():
        cmd += ["--set", s]
    log_path = run.out_dir.rstrip("/") + ".log"
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    # CPU seconds of the run (the machine is shared: wall time says little).
    with open(run.out_dir.rstrip("/") + ".time.json", "w") as f:
        json.dump({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}, f)
    if p.returncode != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-5:])
        return f"exit status {p.returncode} (log: {log_path}):\n{tail}", wall
    if not os.path.isfile(os.path.join(run.out_dir, "summary.json")):
        return f"finished without writing summary.json (log: {log_path})", wall
    try:
        rec = record_from_folder(run)
        rec["trainer_sha256"] = trainer_hash(exe)
        write_record(run, rec)
    except (OSError, ValueError, KeyError) as e:
        return f"cannot record the run: {e}", wall
    return None, wall


def has_critic(run):
    return run.base.algo in ("dfpo", "ppo", "quantile")


def calib_todo(runs, rerun_seeds=0):
    """Finished runs with a critic and no calibration in their record that have a run folder or,
    with seed <= rerun_seeds, can have it made again (their training rerun)."""
    out, seen = [], set()
    for r in runs:
        if r.key in seen or not has_critic(r):
            continue
        seen.add(r.key)
        rec = r.record()
        if rec is None or "calibration" in rec:
            continue
        if os.path.isfile(os.path.join(r.out_dir, "summary.json")) or r.seed <= rerun_seeds:
            out.append(r)
    return out


def train_logged(exe, out_dir, sets):
    """Runs `dfpo-train train` into out_dir with `sets`, its output in out_dir.log; returns
    (None or the error with the log's tail, wall seconds)."""
    cmd = [exe, "train", "--set", f"run.out_dir={out_dir}"]
    for s in sets:
        cmd += ["--set", s]
    log_path = out_dir.rstrip("/") + ".log"
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-5:])
        return f"exit status {rc} (log: {log_path}):\n{tail}", wall
    return None, wall


def rerun_one(exe, run, a):
    """Trains a recorded run again into its (missing) run folder and checks that it reproduces
    the record (every eval curve and the final accuracies); the record is left as it was."""
    import shutil
    rec = run.record()
    shutil.rmtree(run.out_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(run.out_dir), exist_ok=True)
    err, wall = train_logged(exe, run.out_dir, run.args())
    if err is not None:
        return "rerun: " + err, wall
    try:
        new = record_from_folder(run)
    except (OSError, ValueError, KeyError) as e:
        return f"rerun: cannot read the run: {e}", wall
    for field in ("after", "curves"):
        if new.get(field) != rec.get(field):
            # Not the recorded run: its calibration would describe another critic.
            shutil.rmtree(run.out_dir, ignore_errors=True)
            return (f"rerun: its {field} differ from the record's (recorded at {rec.get('commit')}): "
                    f"{json.dumps(new.get(field))[:200]} vs {json.dumps(rec.get(field))[:200]}"), wall
    return None, wall


def calib_or_rerun_one(exe, run, a):
    """calib_one, after rerun_one when the run folder is gone."""
    wall = 0.0
    if not os.path.isfile(os.path.join(run.out_dir, "summary.json")):
        err, wall = rerun_one(exe, run, a)
        if err is not None:
            return err, wall
    err, w2 = calib_one(exe, run, a)
    return err, wall + w2


def calib_one(exe, run, a):
    """Resumes the finished run in a copy of its folder with the calibration on; adds the scores
    to its record."""
    import shutil
    tmp = os.path.join(RUNS_DIR, "calib-tmp", run.key)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.copytree(run.out_dir, tmp)
    err, wall = train_logged(exe, tmp, run.args() + [f"eval.critic_prefixes={a.calib_prefixes}",
                                                     f"eval.critic_continuations={a.calib_continuations}"])
    if err is not None:
        return err, wall
    try:
        with open(os.path.join(tmp, "critic_calibration.json")) as f:
            cal = json.load(f)
        rec = run.record()
        if rec is None:
            return "its record changed meanwhile", wall
        if cal.get("step") != rec["steps"]:
            return f"calibrated at step {cal.get('step')}, the run has {rec['steps']}", wall
        rec["calibration"] = cal
        write_record(run, rec)
    except (OSError, ValueError, KeyError) as e:
        return f"cannot read the calibration: {e}", wall
    shutil.rmtree(tmp, ignore_errors=True)
    return None, wall


def run_pool(a, todo, work, name, key):
    """Runs work(exe, run, a) -> (error or None, seconds) for every run of `todo`, --jobs at a
    time; prints one line per run and returns {key(run): error} of the failures."""
    failures = {}
    if not todo:
        return failures
    exe = trainer_path()
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futs = {pool.submit(work, exe, r, a): r for r in todo}
        for fut in concurrent.futures.as_completed(futs):
            r = futs[fut]
            err, secs = fut.result()
            print(f"{name(r)}: {'ok' if err is None else 'FAILED ' + err} ({secs:.0f} s)", flush=True)
            if err is not None:
                failures[key(r)] = err
    return failures


def take(todo, budget):
    """The first runs of `todo` that --max-runs still allows."""
    if budget[0] is not None:
        todo = todo[:max(0, budget[0])]
        budget[0] -= len(todo)
    return todo


def execute_calib(a, runs, budget):
    todo = take(calib_todo(runs, a.calib_rerun_seeds), budget)
    reruns = sum(not os.path.isfile(os.path.join(r.out_dir, "summary.json")) for r in todo)
    print(f"calib: {len(todo)} finished runs with a critic to calibrate ({reruns} of them rerun first: "
          f"their folder is gone)", flush=True)
    if a.dry_run:
        for r in todo:
            print(f"  would calibrate {r.key}")
        return {}
    return run_pool(a, todo, calib_or_rerun_one, lambda r: f"calib {r.key}", lambda r: ("calib", r.key, r.seed))


def execute(a, runs, budget):
    """Runs the runs not done yet (at most budget[0] more); returns the failures."""
    todo = take([r for r in runs if not r.done()], budget)
    print(f"{len(runs) - len([r for r in runs if not r.done()])} of {len(runs)} runs done; "
          f"starting {len(todo)}", flush=True)
    if a.dry_run:
        for r in todo:
            print(f"  would run {r.phase}/{r.name}-s{r.seed}: {' '.join(r.sets)}")
        return {}
    return run_pool(a, todo, run_one, lambda r: f"{r.phase}/{r.name}-s{r.seed}", lambda r: (r.phase, r.name, r.seed))


TRAINER_HASH = {}


def trainer_hash(exe):
    """The first 16 hex digits of the trainer binary's SHA-256: which build made a run, whatever
    the checkout's HEAD was when the driver started (`commit`)."""
    if exe not in TRAINER_HASH:
        h = hashlib.sha256()
        with open(exe, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        TRAINER_HASH[exe] = h.hexdigest()[:16]
    return TRAINER_HASH[exe]


def git_commit():
    """The checkout's commit when the driver started (the trainer it runs is built from it)."""
    global COMMIT
    if COMMIT is not False:
        return COMMIT
    COMMIT = None
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        if r.returncode == 0:
            COMMIT = r.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        pass
    return COMMIT


def record_from_folder(run):
    """The run's record (settings, eval curves, final accuracies, time) from its run folder."""
    d = run.out_dir
    with open(os.path.join(d, "summary.json")) as f:
        s = json.load(f)
    if s.get("algo") != run.algo or s.get("seed") != run.seed:
        raise ValueError(f"{d}/summary.json belongs to algo={s.get('algo')} seed={s.get('seed')}")
    steps = int(s["steps"])
    curves = {}
    for split in ("in_domain", "out_of_domain", "validation"):
        if split not in s["before"]:
            continue
        pts = [(0, s["before"][split]["accuracy"])]
        with open(os.path.join(d, "metrics.jsonl")) as f:
            for line in f:
                m = json.loads(line)
                k = f"eval/{split}/accuracy"
                if k in m and 0 < m["step"] < steps:
                    pts.append((m["step"], m[k]))
        pts.append((steps, s["after"][split]["accuracy"]))
        pts.sort()
        curves[split] = [list(p) for p in pts]
    cpu = None
    try:
        with open(d.rstrip("/") + ".time.json") as f:
            cpu = json.load(f)["cpu_s"]
    except (OSError, ValueError, KeyError):
        pass
    return {
        "run": run.key, "algo": run.algo, "seed": run.seed, "args": run.args(), "steps": steps,
        "seconds": s["seconds"], "cpu_s": cpu, "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "before": {k: v["accuracy"] for k, v in s["before"].items()},
        "after": {k: v["accuracy"] for k, v in s["after"].items()},
        "curves": curves,
    }


def write_record(run, rec):
    path = run.record_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def load_run(run):
    """Final accuracies, the in-domain/validation curves and their areas: from the run's record, or
    from its run folder (then the record is written)."""
    rec = run.record()
    if rec is None:
        rec = record_from_folder(run)
        write_record(run, rec)
    curves = {split: [tuple(p) for p in pts] for split, pts in rec["curves"].items()}
    auc = {}
    for split, pts in curves.items():
        area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
        auc[split] = area / max(1, pts[-1][0] - pts[0][0])
    return {
        "seed": rec["seed"], "steps": rec["steps"], "seconds": rec["seconds"], "cpu": rec.get("cpu_s"),
        "commit": rec.get("commit"), "before": rec["before"], "after": rec["after"], "auc": auc, "curves": curves,
        "calibration": rec.get("calibration"),
    }


def mean_std(xs):
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_ms(xs):
    if not xs:
        return "n/a"
    m, s = mean_std(xs)
    return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"


def bootstrap_ci(ds, n=10000, seed=12345):
    """Percentile bootstrap 95% interval of the mean of ds (resampling seeds)."""
    if len(ds) < 2:
        return None
    rng = random.Random(seed)
    k = len(ds)
    means = sorted(sum(rng.choice(ds) for _ in range(k)) / k for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def paired(rows, base, key):
    """Per-seed differences rows - base on `key` (a function of a run), over the seeds in both."""
    b = {r["seed"]: key(r) for r in base}
    ds = [key(r) - b[r["seed"]] for r in rows if r["seed"] in b]
    if not ds:
        return "n/a"
    m = sum(ds) / len(ds)
    ci = bootstrap_ci(ds)
    if ci is None:
        return f"{m:+.3f} (n = 1)"
    mark = " *" if ci[0] > 0 or ci[1] < 0 else ""
    return f"{m:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{mark}"


def cpu_mean(rows):
    xs = [r["cpu"] for r in rows if r.get("cpu") is not None]
    return f"{sum(xs) / len(xs):.0f}" if xs else "n/a"


def table(rows_by_label, base_rows):
    """Markdown rows: label | seeds | final ID | Δ vs PPO | AUC ID | ΔAUC vs PPO | final OOD | ΔOOD | s/run."""
    fin = lambda r: r["after"]["in_domain"]
    auc = lambda r: r["auc"]["in_domain"]
    ood = lambda r: r["after"]["out_of_domain"]
    out = ["| run | seeds | in-domain final | Δ vs PPO [95% CI] | in-domain AUC | ΔAUC vs PPO [95% CI] | OOD final | ΔOOD vs PPO [95% CI] | wall s/run | CPU s/run |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in rows_by_label:
        if not rows:
            out.append(f"| {label} | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        is_base = rows is base_rows
        out.append(
            f"| {label} | {len(rows)} | {fmt_ms([fin(r) for r in rows])} | {'(base)' if is_base else paired(rows, base_rows, fin)} "
            f"| {fmt_ms([auc(r) for r in rows])} | {'(base)' if is_base else paired(rows, base_rows, auc)} "
            f"| {fmt_ms([ood(r) for r in rows])} | {'(base)' if is_base else paired(rows, base_rows, ood)} "
            f"| {sum(r['seconds'] for r in rows) / len(rows):.0f} | {cpu_mean(rows)} |")
    return out


def validation_table(rows):
    """Markdown rows for the probe: (label, rows, base label, base rows), judged on VALIDATION."""
    fin = lambda r: r["after"]["validation"]
    auc = lambda r: r["auc"]["validation"]
    out = ["| run | against | seeds | validation final | Δ final [95% CI] | validation AUC | ΔAUC [95% CI] | CPU s/run |",
           "|---|---|---|---|---|---|---|---|"]
    for label, rs, base_label, base in rows:
        if not rs:
            out.append(f"| {label} | {base_label} | 0 | n/a | n/a | n/a | n/a | n/a |")
            continue
        out.append(f"| {label} | {base_label} | {len(rs)} | {fmt_ms([fin(r) for r in rs])} | {paired(rs, base, fin)} "
                   f"| {fmt_ms([auc(r) for r in rs])} | {paired(rs, base, auc)} | {cpu_mean(rs)} |")
    return out


def calibration_table(cells):
    """Markdown rows: per cell (label, runs), per critic readout and truth, the mean ± std over the
    seeds whose record has the calibration."""
    out = ["| run | critic | truth | seeds | value MSE | CRPS | CRPS floor | CVaR_α abs. error | PIT L1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, rows in cells:
        cals = [r["calibration"] for r in rows if r.get("calibration")]
        if not cals:
            continue
        # Readouts by position, named without K (the same in every seed of a cell).
        names = [c["name"] for c in cals[0]["critics"]]
        for i, name in enumerate(names):
            for truth in ("noisy", "clean"):
                xs = [c["critics"][i][truth] for c in cals if len(c["critics"]) > i and c["critics"][i]["name"] == name]
                col = lambda k: fmt_ms([x[k] for x in xs])
                out.append(f"| {label} | {name} | {truth} | {len(xs)} | {col('value_mse')} | {col('crps')} "
                           f"| {col('crps_floor')} | {col('cvar_abs_err')} | {col('pit_l1')} |")
    return out if len(out) > 2 else []


def plot(a, results, settings):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the curves", flush=True)
        return False
    if not settings:
        return False
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), sharey=True, squeeze=False)
    for ax, (model, level) in zip(axes[0], settings):
        for algo in a.algos:
            rows = results.get(("main", f"{algo}-{setting_name(model, level)}"), [])
            if not rows:
                continue
            xs = [x for x, _ in rows[0]["curves"]["in_domain"]]
            if any([x for x, _ in r["curves"]["in_domain"]] != xs for r in rows):
                continue
            ys = [sum(r["curves"]["in_domain"][i][1] for r in rows) / len(rows) for i in range(len(xs))]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{algo} (n={len(rows)})")
        ax.set_title(f"{model} {fmt(level)}", fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean in-domain accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.png)), exist_ok=True)
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")
    return True


def report(a, runs, results, choice, problems, command):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    L = [f"## {a.title}", "",
         f"Generated by `tools/compare --experiment noise` on {now}. Command (from `{os.getcwd()}`):", "",
         "    " + command, "",
         f"Task `data.task = chain` (the warm start `assets/chain-sft`), {a.steps} RL steps of 16 prompts x 4 "
         f"samples (GRPO g8: x 8), KL {kl_statement(a)}; every run is scored clean and greedy on the same fixed "
         f"sets (whole held-out pools: in_domain 400, out_of_domain 200, validation 200) every "
         f"{a.eval_every} steps. Cells: mean ± sample std over seeds; Δ: mean paired per-seed difference to PPO "
         "at the same noise setting and seed with a percentile-bootstrap 95% interval over seeds (`*`: the "
         "interval excludes 0); AUC: area under the in-domain accuracy curve / steps.", ""]
    if choice:
        L += ["Learning rates (optim.actor_lr) chosen on the validation split (mean validation AUC over "
              f"{a.sweep_seeds} sweep seeds at {setting_name(*a.sweep_setting)}):", "",
              "| algo | chosen | " + " | ".join(f"lr {fmt(lr)}" for lr in a.lr_grid) + " |",
              "|---|---|" + "---|" * len(a.lr_grid)]
        for algo, (lr, scores) in choice.items():
            L.append(f"| {algo} | {fmt(lr)} | " + " | ".join(
                f"{scores[lr]:.3f}" if lr in scores else "n/a" for lr in a.lr_grid) + " |")
        L.append("")
    settings = []
    for model in a.noise_models:
        for level in levels_of(a, model):
            settings.append((model, level))
            rows = [(algo, results.get(("main", f"{algo}-{setting_name(model, level)}"), [])) for algo in a.algos]
            base = dict(rows)["ppo"]
            if not any(r for _, r in rows):
                continue
            L += [f"### {NOISE_MODELS[model][0]}, {NOISE_MODELS[model][1]} = {fmt(level)}", ""]
            before = [r["before"]["in_domain"] for _, rs in rows for r in rs]
            L.append(f"Warm start: in-domain {before[0]:.3f}.")
            L.append("")
            L += table(rows, base) + [""]
    mdl, lvl = a.ladder_setting
    sname = setting_name(mdl, lvl)
    base = results.get(("main", f"ppo-{sname}"), [])
    ladder = [("ppo", base)] + [(label, results.get(("ladder", f"{n}-{sname}"), [])) for n, label, _ in LADDER] \
        + [("+ risk terms (= dfpo)", results.get(("main", f"dfpo-{sname}"), []))]
    if any(r for _, r in ladder[1:-1]):
        L += [f"### Ablation ladder at {NOISE_MODELS[mdl][0]}, {NOISE_MODELS[mdl][1]} = {fmt(lvl)}", ""]
        L += table(ladder, base) + [""]
    refs = [("ppo", base)] + [(label, results.get(("refs", f"{n}-{sname}"), [])) for n, _, label, _ in REFS]
    if any(r for _, r in refs[1:]):
        L += [f"### References at {NOISE_MODELS[mdl][0]}, {NOISE_MODELS[mdl][1]} = {fmt(lvl)}", ""]
        L += table(refs, base) + [""]
    probes = [(label, results.get(("probe", f"{n}-{sname}"), []), f"{algo} (main cell)",
               results.get(("main", f"{algo}-{sname}"), [])) for n, algo, label, _ in PROBES]
    if any(p[1] for p in probes):
        dfpo_main = results.get(("main", f"dfpo-{sname}"), [])
        probes.append(("dfpo (main cell)", dfpo_main, "ppo (main cell)", base))
        # The change's own paired comparison: DFPO with it against PPO with it.
        probes.append((probes[0][0], probes[0][1], probes[1][0], probes[1][1]))
        L += [f"### Probe on the validation split at {NOISE_MODELS[mdl][0]}, {NOISE_MODELS[mdl][1]} = {fmt(lvl)}", "",
              "The change to DFPO most likely to help (tools/noise_matrix.py, PROBES), judged on the validation "
              "split (200 prompts from the training side), paired per seed against the run named in `against`.", ""]
        L += validation_table(probes) + [""]
    cal_cells = []
    for model, level in settings:
        for algo in a.algos:
            cal_cells.append((f"{algo}, {setting_name(model, level)}",
                              results.get(("main", f"{algo}-{setting_name(model, level)}"), [])))
    cal_cells += [(f"{label}, {sname}", results.get(("ladder", f"{n}-{sname}"), [])) for n, label, _ in LADDER]
    cal_cells += [(f"{label}, {sname}", results.get(("probe", f"{n}-{sname}"), [])) for n, _, label, _ in PROBES]
    cal = calibration_table(cal_cells)
    if cal:
        probe = next((r for _, rows in cal_cells for r in rows if r.get("calibration")), None)["calibration"]
        L += ["### Critic calibration of the same runs", "",
              f"The critics at the end of the runs scored against a Monte-Carlo truth (the `calib` phase; "
              f"src/train/calibration.rs): {probe['prefixes']} states per run (a training prompt and a random "
              f"cut of one response of the final policy), {probe['continuations']} continuations of the final "
              "policy from each, scored clean and with the run's training noise. CRPS floor: the truth scored "
              f"against itself; CVaR at α = {probe['alpha']:g}; PIT L1 = Σ over 10 bins of |frequency − 0.1|. "
              "Mean ± sample std over the seeds whose run folder existed when the phase ran (column `seeds`).", ""]
        L += cal + [""]
    uniq = {}
    for r in runs:
        rec = r.record()
        if rec is not None:
            uniq[r.key] = rec
    walls = [rec["seconds"] for rec in uniq.values()]
    cpus = [rec["cpu_s"] for rec in uniq.values() if rec.get("cpu_s") is not None]
    commits = sorted({rec.get("commit") or "?" for rec in uniq.values()})
    L.append(f"{len(uniq)} distinct runs (a main run at the sweep setting, seed and chosen learning rate is "
             f"the sweep's run), {sum(walls) / 3600:.2f} h of wall time summed over runs"
             + (f", {sum(cpus) / 3600:.2f} CPU-hours over the {len(cpus)} runs that recorded it" if cpus else "")
             + f". Records: `{os.path.relpath(ARGS.records, REPO)}` (made at commit"
             + ("s " if len(commits) > 1 else " ") + ", ".join(commits) + ").")
    if problems:
        L += ["", "Missing or failed runs:", ""] + [f"- {p}" for p in problems[:40]]
        if len(problems) > 40:
            L.append(f"- ... and {len(problems) - 40} more")
    if plot(a, results, settings):
        rel = os.path.relpath(a.png, os.path.dirname(os.path.abspath(a.results)))
        L += ["", f"![mean clean in-domain accuracy during training]({rel})"]
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results, "w") as f:
        f.write("\n".join(L) + "\n")
    print(f"wrote {a.results}")
    if a.splice:
        splice(a.splice, L, a.png)


BEGIN, END = "<!-- noise-matrix:begin -->", "<!-- noise-matrix:end -->"


def splice(path, lines, png):
    """Replaces the text between the markers of `path` with the report, its headings one level
    deeper and the image path relative to `path`."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        fail(f"--splice {path}: {e}")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        fail(f"--splice {path}: expected one line {BEGIN} followed by one line {END}")
    rel = os.path.relpath(os.path.abspath(png), os.path.dirname(os.path.abspath(path)))
    body = []
    for line in lines:
        if line.startswith("#"):
            line = "#" + line
        if line.startswith("![") and line.endswith(")"):
            line = line[:line.index("](") + 2] + rel + ")"
        body.append(line)
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    out = head + BEGIN + "\n" + "\n".join(body) + "\n" + END + tail
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, path)
    print(f"wrote the report into {path}")


def kl_statement(a):
    coef = next((s.partition("=")[2] for s in reversed(a.sets) if s.startswith("kl.coef=")), "0.001")
    return (f"kl.coef = {coef} (the default: k1 in the reward for ppo/dfpo/quantile, k3 in the loss for grpo; "
            "reference = the warm start)")


def main(argv):
    global RUNS_DIR, ARGS
    a = parse_args(argv)
    RUNS_DIR = a.runs_dir
    ARGS = a
    git_commit()
    command = " ".join(shlex.quote(x) for x in ["tools/compare", "--experiment", "noise"] + argv)
    budget = [a.max_runs if a.max_runs > 0 else None]
    failures = {}
    results = {}

    def collect(runs):
        problems = []
        for r in runs:
            key = (r.phase, r.name)
            results.setdefault(key, [])
            if (r.phase, r.name, r.seed) in failures:
                problems.append(f"{r.phase}/{r.name}-s{r.seed}: failed: {failures[(r.phase, r.name, r.seed)].splitlines()[0]}")
            elif not r.done():
                problems.append(f"{r.phase}/{r.name}-s{r.seed}: not run yet")
            else:
                try:
                    results[key].append(load_run(r))
                except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                    problems.append(f"{r.phase}/{r.name}-s{r.seed}: {e}")
        return problems

    problems = []
    sweep = sweep_runs(a) if not a.no_sweep else []
    if "sweep" in a.phases and not a.report_only:
        failures.update(execute(a, sweep, budget))
    problems += collect(sweep)
    choice = lr_choice(a, results)
    if choice is None and a.dry_run:
        print("(the sweep is not done: the later phases are listed at the default learning rate)")
        choice = {algo: (DEFAULT_ACTOR_LR, {}) for algo in a.algos}
    later = []
    if choice is None:
        problems.append("the learning-rate sweep is incomplete: main, ladder and refs wait for it")
    else:
        # Every phase's runs are reported (what the records hold), only --phases' are run.
        for phase, make in (("main", main_runs), ("ladder", ladder_runs), ("refs", ref_runs), ("probe", probe_runs)):
            runs = make(a, choice)
            if phase in a.phases and not a.report_only:
                failures.update(execute(a, runs, budget))
            later += runs
        if "calib" in a.phases and not a.report_only:
            failures.update(execute_calib(a, later, budget))
        problems += collect(later)
    if a.dry_run:
        return 0
    report(a, sweep + later, results, choice, [p for p in problems if "not run yet" not in p] +
           ([f"{sum('not run yet' in p for p in problems)} runs not run yet"] if any("not run yet" in p for p in problems) else []),
           command)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
