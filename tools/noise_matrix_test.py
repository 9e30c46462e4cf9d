#!/usr/bin/env python3
"""Tests of tools/noise_matrix.py (`tools/compare --experiment noise`) against the stand-in
trainer tools/noise-fake-train, whose accuracies are known in closed form. Run:
    python3 tools/noise_matrix_test.py
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

TOOLS = os.path.dirname(os.path.abspath(__file__))


def read(path):
    with open(path) as f:
        return f.read()


def run(tmp, *extra):
    env = dict(os.environ, DFPO_TRAIN=os.path.join(TOOLS, "noise-fake-train"))
    cmd = [os.path.join(TOOLS, "compare"), "--experiment", "noise", "--runs-dir", os.path.join(tmp, "runs"),
           "--results", os.path.join(tmp, "r.md"), "--records", os.path.join(tmp, "records"), "--png", os.path.join(tmp, "r.png"),
           "--algos", "dfpo,ppo", "--noise-models", "flip,fneg", "--seeds", "4", "--sweep-seeds", "2",
           "--lr-grid", "1e-5,3e-5,1e-4", "--steps", "20", "--eval-every", "5", "--jobs", "2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


class NoiseMatrix(unittest.TestCase):
    def test_matrix_statistics_and_resume(self):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(tmp)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            runs = os.path.join(tmp, "runs")
            # The learning rate with the best validation AUC (3e-5 in the fake) is chosen.
            choice = json.loads(read(os.path.join(runs, "lr_choice.json")))
            self.assertEqual(choice["dfpo"]["lr"], 3e-5)
            self.assertEqual(choice["ppo"]["lr"], 3e-5)
            # Main runs at the sweep setting reuse the sweep's runs (seeds 1-2); no dir twice.
            self.assertFalse(os.path.exists(os.path.join(runs, "main", "dfpo-flip0.2-s1")))
            self.assertTrue(os.path.exists(os.path.join(runs, "main", "dfpo-flip0.2-s3")))
            self.assertTrue(os.path.exists(os.path.join(runs, "main", "dfpo-fneg0.6-s1")))
            # Every run is told its noise model; the non-flip models switch the flips off.
            a = read(os.path.join(runs, "main", "ppo-fneg0.3-s2", "args.txt"))
            for want in ("reward.flip_prob=0", "reward.fn_prob=0.3", "data.task=chain", "optim.actor_lr=3e-05"):
                self.assertIn(want + "\n", a)
            md = read(os.path.join(tmp, "r.md"))
            # dfpo - ppo is exactly +0.05 per seed: the interval is a point.
            self.assertIn("| dfpo | 4 | 0.675 ± 0.013 | +0.050 [+0.050, +0.050] * ", md)
            # AUC of a linear curve from 0.5 to a: (0.5 + a)/2; ppo mean a = 0.625.
            self.assertIn("| ppo | 4 | 0.625 ± 0.013 | (base) | 0.562 ± 0.006 |", md)
            self.assertIn("+0.025 [+0.025, +0.025] *", md)  # ΔAUC = 0.05 / 2
            # The ladder and the references (dfpo/ppo/grpo with the chosen or default lr).
            self.assertIn("BCFM only", md)
            self.assertIn("group of 8", md)
            # The probe is judged on validation against the main cells, paired per seed:
            # dfpo - dfpo at lambda 0.8 is 0 in the fake (it ignores ppo.lam).
            self.assertIn("| DFPO, GAE lambda 0.8 | dfpo (main cell) | 4 |", md)
            self.assertIn("+0.000 [+0.000, +0.000]", md)
            # calib: every finished run with a critic got its scores (noisy value MSE 0.01 * seed:
            # seeds 1-4 -> mean 0.025, sample std 0.013), grpo none.
            rec = json.loads(read(os.path.join(tmp, "records", "main", "dfpo-fneg0.3-s3.json")))
            self.assertEqual(rec["calibration"]["critics"][0]["noisy"]["value_mse"], 0.03)
            self.assertIn("| dfpo, fneg0.3 | fake critic | noisy | 4 | 0.025 ± 0.013 |", md)
            self.assertNotIn("grpo", md.split("Critic calibration")[1].split("distinct runs")[0])
            # Resume: nothing runs again.
            r2 = run(tmp)
            self.assertEqual(r2.returncode, 0, r2.stderr)
            self.assertNotIn(": ok", r2.stdout)
            self.assertIn("starting 0", r2.stdout)
            # The records alone resume the matrix (a new checkout has no run folders) and give
            # the same report.
            rec = json.loads(read(os.path.join(tmp, "records", "main", "ppo-fneg0.3-s2.json")))
            self.assertIn("reward.fn_prob=0.3", rec["args"])
            # The record names the trainer binary that made it.
            import hashlib
            fake = os.path.join(TOOLS, "noise-fake-train")
            self.assertEqual(rec["trainer_sha256"], hashlib.sha256(open(fake, "rb").read()).hexdigest()[:16])
            self.assertEqual(rec["curves"]["in_domain"][0][0], 0)
            shutil.rmtree(runs)
            r3 = run(tmp)
            self.assertEqual(r3.returncode, 0, r3.stderr)
            self.assertIn("starting 0", r3.stdout)
            self.assertEqual(read(os.path.join(tmp, "r.md")).split("\n")[6:], md.split("\n")[6:])
            # calib on a fresh checkout (no run folders): --calib-rerun-seeds N trains the runs of
            # seeds <= N again, checks them against their records and calibrates them; a rerun that
            # does not reproduce its record is a failure and gets no calibration.
            recs = os.path.join(tmp, "records", "main")
            for name in ("dfpo-fneg0.3-s3", "ppo-fneg0.6-s3", "dfpo-fneg0.6-s4", "dfpo-flip0.4-s3"):
                path = os.path.join(recs, name + ".json")
                rec = json.loads(read(path))
                del rec["calibration"]
                if name == "dfpo-flip0.4-s3":
                    rec["after"]["in_domain"] += 0.01  # a record the trainer no longer reproduces
                with open(path, "w") as f:
                    json.dump(rec, f)
            r5 = run(tmp, "--phases", "calib", "--calib-rerun-seeds", "3")
            self.assertEqual(r5.returncode, 1, r5.stdout + r5.stderr)
            self.assertIn("calib: 3 finished runs with a critic to calibrate (3 of them rerun first", r5.stdout)
            self.assertIn("calib main/dfpo-flip0.4-s3: FAILED rerun: its after differ from the record's", r5.stdout)
            for name, calibrated in (("dfpo-fneg0.3-s3", True), ("ppo-fneg0.6-s3", True),
                                     ("dfpo-fneg0.6-s4", False), ("dfpo-flip0.4-s3", False)):
                rec = json.loads(read(os.path.join(recs, name + ".json")))
                self.assertEqual("calibration" in rec, calibrated, name)
            self.assertEqual(json.loads(read(os.path.join(recs, "dfpo-fneg0.3-s3.json")))["calibration"]
                             ["critics"][0]["noisy"]["value_mse"], 0.03)
            # A record made with other settings (here: another run length) is not reused.
            r4 = run(tmp, "--steps", "10", "--phases", "sweep")
            self.assertEqual(r4.returncode, 0, r4.stderr)
            self.assertIn("0 of 12 runs done; starting 12", r4.stdout)

    def test_bad_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(tmp, "--set", "reward.flip_prob=0.3")
            self.assertEqual(r.returncode, 2)
            self.assertIn("set by the experiment itself", r.stderr)
            r = run(tmp, "--noise-models", "nonsense")
            self.assertEqual(r.returncode, 2)
            self.assertIn("unknown 'nonsense'", r.stderr)


sys.path.insert(0, TOOLS)
import noise_matrix  # noqa: E402


class Bootstrap(unittest.TestCase):
    def test_interval_covers_the_mean_and_is_deterministic(self):
        ds = [0.1, -0.05, 0.02, 0.07, 0.0, 0.03]
        lo, hi = noise_matrix.bootstrap_ci(ds)
        m = sum(ds) / len(ds)
        self.assertLess(lo, m)
        self.assertGreater(hi, m)
        self.assertEqual((lo, hi), noise_matrix.bootstrap_ci(ds))
        self.assertIsNone(noise_matrix.bootstrap_ci([0.1]))


if __name__ == "__main__":
    unittest.main()
