//! Run metrics: one JSON object per line in `metrics.jsonl` (what the plot and compare tools
//! read), and the progress bar on stderr.
//!
//! A line is `{"step": n, "<name>": value, ...}` with the names in sorted order. Non-finite
//! values are written as `null` so every line stays valid JSON; [`read_metrics`] reads `null`
//! back as NaN. Values are written in the shortest round-trip form; serde_json's default
//! (fast) float parser may read a few of them back an ulp off, which no plot can see.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Appends one line per step to a metrics file, flushing each line (a crash loses nothing
/// written before it).
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for a run. A fresh run (`resume_from_step = None`) starts an empty file; a
    /// resumed run keeps the lines with `step <= resume step` and appends after them, so the
    /// steps redone after the checkpoint are not duplicated. A torn last line (a crash in the
    /// middle of a write) is dropped; a malformed line elsewhere is an error.
    pub fn create(path: &Path, resume_from_step: Option<u64>) -> Result<Self> {
        Self::open_with(path, resume_from_step, |path, i, line| {
            Ok(parse_line(path, i, line)?.get("step").copied())
        })
    }

    /// [`create`](Self::create) for a JSONL file of any objects with a `"step"` (samples.jsonl).
    pub fn create_records(path: &Path, resume_from_step: Option<u64>) -> Result<Self> {
        Self::open_with(path, resume_from_step, |path, i, line| {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Format {
                path: path.display().to_string(),
                msg: format!("line {i}: not valid JSON: {e}"),
            })?;
            Ok(v.get("step").and_then(serde_json::Value::as_f64))
        })
    }

    /// Writes one JSON object as a line and flushes it.
    pub fn write_record(&mut self, v: &serde_json::Value) -> Result<()> {
        self.append(&format!("{v}\n"))
    }

    /// Appends `line` (with its newline) and flushes it.
    fn append(&mut self, line: &str) -> Result<()> {
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|source| Error::Io {
                path: self.path.display().to_string(),
                source,
            })
    }

    fn open_with(path: &Path, resume_from_step: Option<u64>, step_of: StepOf) -> Result<Self> {
        let p = path.display().to_string();
        let io = |source| Error::Io {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        match resume_from_step {
            Some(resume) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(io)?;
                let kept = lines_up_to(path, &text, resume, step_of)?;
                crate::model::checkpoint::write_atomic(path, |w| w.write_all(kept.as_bytes()))?;
            }
            Some(_) => {}
            None => {
                File::create(path).map_err(io)?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes `{"step": step, name: value, ...}` as one line and flushes it. The name "step"
    /// is reserved.
    pub fn write(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        if metrics.contains_key("step") {
            return Err(Error::Invalid(format!(
                "{}: the metric name \"step\" is reserved for the step number",
                self.path.display()
            )));
        }
        self.append(&format_line(step, metrics))
    }
}

/// One metrics line (with its newline).
fn format_line(step: u64, metrics: &BTreeMap<String, f64>) -> String {
    let mut line = format!("{{\"step\":{step}");
    for (name, &v) in metrics {
        let key = serde_json::Value::String(name.clone()).to_string();
        let value = serde_json::Number::from_f64(v)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "null".into());
        line.push_str(&format!(",{key}:{value}"));
    }
    line.push_str("}\n");
    line
}

/// Reads the step of one line (file, 1-based line number, text).
type StepOf = fn(&Path, usize, &str) -> Result<Option<f64>>;

/// The text of the lines of `text` whose step is <= `resume`.
fn lines_up_to(path: &Path, text: &str, resume: u64, step_of: StepOf) -> Result<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut kept = String::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let torn_tail = i + 1 == lines.len() && !line.ends_with('\n');
        match step_of(path, i + 1, line) {
            Ok(step) => {
                if step.is_some_and(|s| s <= resume as f64) {
                    kept.push_str(line);
                    if !line.ends_with('\n') {
                        kept.push('\n');
                    }
                }
            }
            Err(_) if torn_tail => {}
            Err(e) => return Err(e),
        }
    }
    Ok(kept)
}

/// Parses one metrics line; `null` becomes NaN.
fn parse_line(path: &Path, lineno: usize, line: &str) -> Result<BTreeMap<String, f64>> {
    let bad = |msg: String| Error::Format {
        path: path.display().to_string(),
        msg: format!("line {lineno}: {msg}"),
    };
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(bad("expected a JSON object {\"step\": n, ...}".into()));
    };
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let x = match &v {
            serde_json::Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
            serde_json::Value::Null => f64::NAN,
            other => {
                return Err(bad(format!(
                    "{k:?}: expected a number or null, got {other}"
                )))
            }
        };
        out.insert(k, x);
    }
    match out.get("step") {
        Some(s) if s.is_finite() && *s >= 0.0 && s.fract() == 0.0 => Ok(out),
        Some(s) => Err(bad(format!(
            "\"step\" must be a non-negative integer, got {s}"
        ))),
        None => Err(bad("missing \"step\"".into())),
    }
}

/// Every line of a metrics file as name → value (including "step"; `null` reads as NaN).
/// Blank lines are skipped; any other malformed line is an error naming the file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<BTreeMap<String, f64>>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(path, i + 1, l))
        .collect()
}

/// Least time between two plain (non-terminal) progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// Least time between two in-place redraws on a terminal.
const TTY_EVERY: Duration = Duration::from_millis(100);
/// Cells in the bar.
const BAR_WIDTH: usize = 20;

/// Progress bar on stderr: `[#####...............] 12/40 30% ETA 1m05s | reward 0.430 acc 0.510`.
/// Redrawn in place (`\r`) when stderr is a terminal; otherwise one plain line per update, at
/// most every few seconds (and always the last one), so logs stay readable.
pub struct Progress {
    total: u64,
    enabled: bool,
    tty: bool,
    start: Instant,
    last_draw: Option<Instant>,
    /// The last state seen, drawn by `finish` when it was throttled.
    pending: Option<String>,
    /// Length of the last in-place line, to blank out what a shorter one leaves behind.
    last_len: usize,
}

impl Progress {
    /// A bar for `total` steps; `enabled = false` draws nothing.
    pub fn new(total: u64, enabled: bool) -> Self {
        Self::with_mode(total, enabled, std::io::stderr().is_terminal())
    }

    /// Like [`new`](Self::new) with the terminal mode given (for tests and log capture).
    pub fn with_mode(total: u64, enabled: bool, tty: bool) -> Self {
        Progress {
            total,
            enabled,
            tty,
            start: Instant::now(),
            last_draw: None,
            pending: None,
            last_len: 0,
        }
    }

    /// Records that `done` of the total steps are done, with the values to show.
    pub fn update(&mut self, done: u64, shown: &[(&str, f64)]) {
        if let Some(text) = self.step_text(done, shown, Instant::now()) {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }

    /// What [`update`](Self::update) writes at time `now` (None when disabled or throttled);
    /// it updates the throttle state as if written.
    pub fn step_text(&mut self, done: u64, shown: &[(&str, f64)], now: Instant) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let line = Self::render(
            self.total,
            done,
            now.saturating_duration_since(self.start),
            shown,
        );
        let every = if self.tty { TTY_EVERY } else { PLAIN_EVERY };
        let due = done >= self.total
            || self
                .last_draw
                .is_none_or(|t| now.saturating_duration_since(t) >= every);
        if !due {
            self.pending = Some(line);
            return None;
        }
        self.last_draw = Some(now);
        self.pending = None;
        Some(self.frame(line))
    }

    /// Ends the bar: draws a throttled last state and, on a terminal, moves to a new line.
    pub fn finish(&mut self) {
        if let Some(text) = self.finish_text() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }

    /// What [`finish`](Self::finish) writes (None when there is nothing to write).
    pub fn finish_text(&mut self) -> Option<String> {
        if !self.enabled {
            return None;
        }
        let mut out = self
            .pending
            .take()
            .map(|l| self.frame(l))
            .unwrap_or_default();
        if self.tty && self.last_draw.is_some() {
            out.push('\n');
        }
        self.last_draw = None;
        self.last_len = 0;
        (!out.is_empty()).then_some(out)
    }

    /// `\r` + line padded over the previous one on a terminal; line + `\n` otherwise.
    fn frame(&mut self, line: String) -> String {
        if self.tty {
            let pad = self.last_len.saturating_sub(line.chars().count());
            self.last_len = line.chars().count();
            format!("\r{line}{}", " ".repeat(pad))
        } else {
            format!("{line}\n")
        }
    }

    /// The bar's text (no `\r`, no newline): the bar, `done/total`, the percentage, the ETA
    /// (elapsed / done × remaining; `--` before the first step) and the shown values.
    pub fn render(total: u64, done: u64, elapsed: Duration, shown: &[(&str, f64)]) -> String {
        let done_c = done.min(total);
        let frac = if total == 0 {
            1.0
        } else {
            done_c as f64 / total as f64
        };
        let filled = ((frac * BAR_WIDTH as f64).floor() as usize).min(BAR_WIDTH);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled));
        let pct = (frac * 100.0).floor() as u64;
        let eta = if done_c >= total {
            format!("done in {}", format_duration(elapsed))
        } else if done_c == 0 {
            "ETA --".to_string()
        } else {
            let per_step = elapsed.as_secs_f64() / done_c as f64;
            let left = Duration::from_secs_f64(per_step * (total - done_c) as f64);
            format!("ETA {}", format_duration(left))
        };
        let mut line = format!("[{bar}] {done}/{total} {pct}% {eta}");
        if !shown.is_empty() {
            line.push_str(" |");
            for (name, v) in shown {
                line.push_str(&format!(" {name} {}", format_value(*v)));
            }
        }
        line
    }
}

/// `42s`, `1m05s`, `2h03m` (rounded to the second).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// A short rendering of a metric: 3 decimals, or scientific when very large or small.
fn format_value(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}
