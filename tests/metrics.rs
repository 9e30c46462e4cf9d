//! Metrics file (write/read, null for non-finite, resume truncation), progress bar text and
//! throttling, and the tools/compare report on fake runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dfpo::train::metrics::{format_duration, read_metrics, MetricsWriter, Progress};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dfpo-metrics-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn write_read_round_trip() {
    let p = tmp_dir("round_trip").join("sub/metrics.jsonl");
    let mut w = MetricsWriter::create(&p, None).unwrap();
    let a = m(&[
        ("actor/pg_loss", -0.125),
        ("reward/clean_mean", 0.4375),
        ("critic/k", 3.0),
    ]);
    let b = m(&[("actor/pg_loss", 1e-30), ("weird \"name\"\n", 123456789.5)]);
    w.write(1, &a).unwrap();
    w.write(2, &b).unwrap();
    // Each line is flushed: readable before the writer is dropped.
    let rows = read_metrics(&p).unwrap();
    assert_eq!(rows.len(), 2);
    for (row, (step, want)) in rows.iter().zip([(1.0, &a), (2.0, &b)]) {
        assert_eq!(row["step"], step);
        assert_eq!(row.len(), want.len() + 1);
        for (k, v) in want {
            // serde_json's default float parser may be off by an ulp (exact for most values).
            assert!(
                (row[k] - v).abs() <= 4.0 * f64::EPSILON * v.abs(),
                "{k}: {} vs {v}",
                row[k]
            );
        }
    }
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.starts_with("{\"step\":1,"), "{text}");
    assert!(w
        .write(3, &m(&[("step", 1.0)]))
        .unwrap_err()
        .to_string()
        .contains("reserved"));
}

#[test]
fn non_finite_values_are_null() {
    let p = tmp_dir("null").join("metrics.jsonl");
    let mut w = MetricsWriter::create(&p, None).unwrap();
    w.write(
        0,
        &m(&[
            ("a", f64::NAN),
            ("b", f64::INFINITY),
            ("c", f64::NEG_INFINITY),
            ("d", 1.5),
        ]),
    )
    .unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    assert_eq!(
        text,
        "{\"step\":0,\"a\":null,\"b\":null,\"c\":null,\"d\":1.5}\n"
    );
    // Every line is valid JSON.
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(v["a"].is_null());
    let rows = read_metrics(&p).unwrap();
    assert!(rows[0]["a"].is_nan() && rows[0]["b"].is_nan() && rows[0]["c"].is_nan());
    assert_eq!(rows[0]["d"], 1.5);
}

#[test]
fn resume_truncates_later_steps_and_appends() {
    let p = tmp_dir("resume").join("metrics.jsonl");
    let mut w = MetricsWriter::create(&p, None).unwrap();
    for s in 1..=5 {
        w.write(s, &m(&[("x", s as f64)])).unwrap();
    }
    drop(w);
    // A crash mid-write leaves a torn last line: dropped on resume.
    let mut text = std::fs::read_to_string(&p).unwrap();
    text.push_str("{\"step\":6,\"x\":");
    std::fs::write(&p, &text).unwrap();
    let mut w = MetricsWriter::create(&p, Some(3)).unwrap();
    w.write(4, &m(&[("x", 40.0)])).unwrap();
    let steps: Vec<(f64, f64)> = read_metrics(&p)
        .unwrap()
        .iter()
        .map(|r| (r["step"], r["x"]))
        .collect();
    assert_eq!(steps, vec![(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (4.0, 40.0)]);
    // Resume with no file yet: starts one. A fresh run (None) empties the file.
    let q = p.with_file_name("new.jsonl");
    MetricsWriter::create(&q, Some(10))
        .unwrap()
        .write(11, &m(&[]))
        .unwrap();
    assert_eq!(read_metrics(&q).unwrap().len(), 1);
    MetricsWriter::create(&p, None).unwrap();
    assert!(read_metrics(&p).unwrap().is_empty());
}

#[test]
fn malformed_lines_name_file_and_line() {
    let dir = tmp_dir("malformed");
    let cases = [
        (
            "{\"step\":1}\n\n{\"step\":2,\"x\":\"a\"}\n",
            "line 3",
            "\"x\": expected a number or null",
        ),
        ("{\"step\":1}\nnot json\n", "line 2", "not valid JSON"),
        ("[1,2]\n", "line 1", "expected a JSON object"),
        ("{\"x\":1}\n", "line 1", "missing \"step\""),
        ("{\"step\":-1}\n", "line 1", "non-negative integer"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let p = dir.join(format!("bad{i}.jsonl"));
        std::fs::write(&p, text).unwrap();
        let e = read_metrics(&p).unwrap_err().to_string();
        assert!(
            e.contains(&format!("bad{i}.jsonl")) && e.contains(line) && e.contains(what),
            "{e}"
        );
    }
    // A malformed line that is not the torn tail stops a resume instead of being dropped.
    let p = dir.join("bad1.jsonl");
    let e = MetricsWriter::create(&p, Some(5))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(read_metrics(&dir.join("missing.jsonl"))
        .unwrap_err()
        .to_string()
        .contains("missing.jsonl"));
}

#[test]
fn progress_render_text_and_eta() {
    // 12 of 40 steps in 30 s: 2.5 s per step, 28 steps left = 70 s.
    let line = Progress::render(
        40,
        12,
        Duration::from_secs(30),
        &[("reward", 0.43), ("acc", 0.5104)],
    );
    assert_eq!(
        line,
        "[######..............] 12/40 30% ETA 1m10s | reward 0.430 acc 0.510"
    );
    assert_eq!(
        Progress::render(40, 0, Duration::from_secs(3), &[]),
        "[....................] 0/40 0% ETA --"
    );
    assert_eq!(
        Progress::render(
            3,
            1,
            Duration::from_secs(4000),
            &[("x", 1e-5), ("y", f64::NAN)]
        ),
        "[######..............] 1/3 33% ETA 2h13m | x 1.00e-5 y NaN"
    );
    assert_eq!(
        Progress::render(40, 40, Duration::from_secs(59), &[]),
        "[####################] 40/40 100% done in 59s"
    );
    assert_eq!(format_duration(Duration::from_millis(59_600)), "1m00s");
    assert_eq!(
        format_duration(Duration::from_secs(3 * 3600 + 5 * 60 + 7)),
        "3h05m"
    );
}

#[test]
fn progress_throttles_plain_lines_and_redraws_in_place_on_a_terminal() {
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    // Plain: a line at the first update, then at most every 5 s, and always the last step.
    let mut p = Progress::with_mode(10, true, false);
    let first = p.step_text(1, &[], at(1.0)).unwrap();
    assert!(
        first.ends_with('\n') && first.starts_with("[##"),
        "{first:?}"
    );
    assert!(p.step_text(2, &[], at(2.0)).is_none());
    assert!(p.step_text(3, &[], at(7.0)).is_some());
    assert!(p.step_text(4, &[], at(8.0)).is_none());
    // finish draws the throttled last state.
    let last = p.finish_text().unwrap();
    assert!(last.contains(" 4/10 "), "{last:?}");
    assert!(p
        .step_text(10, &[], at(8.5))
        .unwrap()
        .contains("10/10 100%"));
    // Terminal: \r redraw, blanking a longer previous line, newline at the end.
    let mut p = Progress::with_mode(10, true, true);
    let a = p.step_text(1, &[("loss", 12345.0)], at(1.0)).unwrap();
    assert!(a.starts_with('\r') && !a.ends_with('\n'));
    let b = p.step_text(2, &[], at(2.0)).unwrap();
    assert!(b.starts_with('\r'));
    assert_eq!(
        a.chars().count(),
        b.chars().count(),
        "the shorter line pads over the longer one"
    );
    assert_eq!(p.finish_text().unwrap(), "\n");
    // Disabled: nothing.
    let mut p = Progress::with_mode(10, false, false);
    assert!(p.step_text(1, &[], at(1.0)).is_none() && p.finish_text().is_none());
}

/// A fake summary.json as the trainer writes it.
fn summary(
    algo: &str,
    seed: u64,
    p: f64,
    before: (f64, f64),
    after: (f64, f64),
    secs: f64,
) -> String {
    let split = |a: f64| format!("{{\"accuracy\":{a},\"unparsed\":0.0,\"n\":200}}");
    format!(
        "{{\"algo\":\"{algo}\",\"seed\":{seed},\"flip_prob\":{p},\"steps\":40,\"seconds\":{secs},\
         \"before\":{{\"in_domain\":{},\"out_of_domain\":{}}},\
         \"after\":{{\"in_domain\":{},\"out_of_domain\":{}}}}}",
        split(before.0),
        split(before.1),
        split(after.0),
        split(after.1)
    )
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn compare_report_matches_hand_computed_means() {
    let dir = tmp_dir("compare_report");
    let runs = dir.join("runs");
    let put = |name: &str, text: String| {
        let d = runs.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("summary.json"), text).unwrap();
    };
    // dfpo, p = 0.2: in-domain after 0.50, 0.60, 0.70 → mean 0.600, sample std 0.100;
    // OOD after 0.30, 0.30, 0.36 → mean 0.320, std sqrt((0.0004+0.0004+0.0016)/2) = 0.0346.
    put(
        "dfpo-p0.2-s1",
        summary("dfpo", 1, 0.2, (0.4, 0.2), (0.5, 0.3), 10.0),
    );
    put(
        "dfpo-p0.2-s2",
        summary("dfpo", 2, 0.2, (0.4, 0.2), (0.6, 0.3), 20.0),
    );
    put(
        "dfpo-p0.2-s3",
        summary("dfpo", 3, 0.2, (0.4, 0.2), (0.7, 0.36), 30.0),
    );
    // ppo, p = 0: one seed only → no ± (in-domain after 0.45).
    put(
        "ppo-p0-s1",
        summary("ppo", 1, 0.0, (0.4, 0.2), (0.45, 0.25), 12.0),
    );
    // The report of these runs, written to `results`.
    let report_to = |results: &std::path::Path| {
        Command::new(repo().join("tools/compare"))
            .args([
                "--report-only",
                "--algos",
                "dfpo,ppo",
                "--noise",
                "0,0.2",
                "--seeds",
                "3",
            ])
            .arg("--runs-dir")
            .arg(&runs)
            .arg("--results")
            .arg(results)
            .arg("--png")
            .arg(dir.join("results.png"))
            .output()
            .expect("python3 and tools/compare")
    };
    let out = report_to(&dir.join("RESULTS.md"));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(dir.join("RESULTS.md"))
        .unwrap_or_else(|_| panic!("no RESULTS.md:\n{log}"));
    let row = |algo: &str, p: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {algo} | {p} |")))
            .unwrap_or_else(|| panic!("no row {algo} {p} in\n{md}"))
            .to_string()
    };
    let dfpo = row("dfpo", "0.2");
    assert!(dfpo.contains("| 3 |"), "{dfpo}");
    assert!(dfpo.contains("0.600 ± 0.100"), "{dfpo}");
    assert!(dfpo.contains("0.320 ± 0.035"), "{dfpo}");
    assert!(
        dfpo.contains("0.400") && dfpo.contains("0.200"),
        "warm start: {dfpo}"
    );
    assert!(dfpo.contains("| 20.0 |"), "mean wall time: {dfpo}");
    let ppo = row("ppo", "0");
    assert!(
        ppo.contains("| 1 |") && ppo.contains("0.450 |") && !ppo.contains("0.450 ±"),
        "{ppo}"
    );
    // Missing cells are marked, not invented.
    assert!(row("dfpo", "0").contains("n/a"), "{md}");
    assert!(row("ppo", "0.2").contains("n/a"), "{md}");
    assert!(md.contains("--report-only"), "the exact command: {md}");
    assert!(
        !out.status.success(),
        "missing runs must make the exit status non-zero:\n{log}"
    );
    // A results file with the smoke markers (docs/RESULTS.md) keeps everything around them.
    let marked = dir.join("MARKED.md");
    std::fs::write(
        &marked,
        "# Title\nhand-written head\n<!-- smoke:begin -->\nstale table\n<!-- smoke:end -->\nhand-written tail\n",
    )
    .unwrap();
    report_to(&marked);
    let m = std::fs::read_to_string(&marked).unwrap();
    assert!(
        m.starts_with("# Title\nhand-written head\n<!-- smoke:begin -->\n"),
        "{m}"
    );
    assert!(
        m.ends_with("<!-- smoke:end -->\nhand-written tail\n"),
        "{m}"
    );
    assert!(!m.contains("stale table"), "{m}");
    assert!(m.contains("0.600 ± 0.100"), "{m}");
}

#[test]
fn compare_runs_the_matrix_with_a_fake_trainer_and_resumes() {
    let dir = tmp_dir("compare_matrix");
    let runs = dir.join("runs");
    let run = |jobs: &str| {
        Command::new(repo().join("tools/compare"))
            .env("DFPO_TRAIN", repo().join("tools/compare-fake-train"))
            .args([
                "--algos",
                "dfpo,grpo",
                "--noise",
                "0,0.4",
                "--seeds",
                "2",
                "--jobs",
                jobs,
            ])
            .args(["--set", "run.steps=3"])
            .arg("--runs-dir")
            .arg(&runs)
            .arg("--results")
            .arg(dir.join("RESULTS.md"))
            .arg("--png")
            .arg(dir.join("results.png"))
            .output()
            .unwrap()
    };
    let out = run("2");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    // The fake trainer records its arguments: the matrix --sets plus the extra one.
    let args = std::fs::read_to_string(runs.join("grpo-p0.4-s2/args.txt")).unwrap();
    for want in [
        "train",
        &format!("run.out_dir={}", runs.join("grpo-p0.4-s2").display()),
        "algo.name=grpo",
        "reward.flip_prob=0.4",
        "run.seed=2",
        "run.progress=false",
        "run.steps=3",
    ] {
        assert!(args.lines().any(|l| l == want), "{want:?} not in {args}");
    }
    // The fake's accuracy is 0.4 - p/2 + 0.01 * seed (+0.1 for dfpo): dfpo p=0.4 → 0.31, 0.32.
    let md = std::fs::read_to_string(dir.join("RESULTS.md")).unwrap();
    let row = md
        .lines()
        .find(|l| l.starts_with("| dfpo | 0.4 |"))
        .unwrap();
    assert!(row.contains("0.315 ± 0.007"), "{row}");
    // A second run skips every finished run.
    let out = run("1");
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    assert!(log.contains("8 of 8 runs already done"), "{log}");
    // A matrix key in the extra --sets is refused.
    let out = Command::new(repo().join("tools/compare"))
        .env("DFPO_TRAIN", repo().join("tools/compare-fake-train"))
        .args(["--set", "algo.name=ppo", "--runs-dir"])
        .arg(&runs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("algo.name"));
}
