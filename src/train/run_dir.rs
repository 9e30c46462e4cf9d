//! The run folder (`run.out_dir`): what a training run may write there, the lock that keeps a
//! second run out while one is using it, the fingerprint that decides whether the folder's
//! checkpoints belong to this configuration, and the cleanup of what killed runs left behind.
//!
//! Rules (README, "Run folders"):
//! - A run writes only the names in [`WRITTEN`] directly under the folder, and never deletes or
//!   replaces anything else.
//! - A new run needs an empty (or missing) folder. A folder holding a run is continued only
//!   when `run.resume` is `auto` or `true` and the newest checkpoint's fingerprint matches;
//!   `run.overwrite = true` starts afresh after removing the [`WRITTEN`] entries of a folder
//!   that `run.json` marks as a dfpo-train run (other files are kept).
//! - `.lock` is held (flock) for the whole run; the kernel releases it when the process dies,
//!   so a killed run never blocks the next one. Its text names the pid for the error message.
//! - With the lock held, temporary entries of earlier (dead) runs are removed: checkpoint
//!   staging folders `.step-N.tmp-PID`, prunes in progress `.step-N.del-PID`, checkpoints
//!   without `meta.json`, `final.tmp-PID` and the `write_atomic` temp files `.NAME.tmp.PID.N`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::checkpoint::write_atomic;

/// The marker of a run folder: written first by a fresh run, with its fingerprint.
pub const RUN_FILE: &str = "run.json";
/// The lock file (flock'd while a run uses the folder).
pub const LOCK_FILE: &str = ".lock";
/// Every entry a training run writes directly under its folder (and the only ones
/// `run.overwrite` removes).
pub const WRITTEN: &[&str] = &[
    RUN_FILE,
    "config.toml",
    "metrics.jsonl",
    "samples.jsonl",
    "summary.json",
    "checkpoints",
    "final",
    "critic_calibration.json",
];

/// Configuration keys that may differ between a checkpoint and the run resuming it, because
/// they do not change what the run computes (where it runs, how often it saves, evaluates or
/// logs, and the other commands' sections). `run.steps` may differ too (see [`compare`]).
const SAFE_KEYS: &[&str] = &[
    "run.out_dir",
    "run.device",
    "run.eval_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.resume",
    "run.overwrite",
    "run.progress",
    "run.log_samples",
    "data.max_unparsed",
];
/// Sections that never change the training (their keys are not fingerprinted).
const SAFE_SECTIONS: &[&str] = &["sft", "score", "export"];
/// Keys that change only the evaluation: they may differ on resume, and then the summary's
/// "before" numbers are measured again with the new settings.
const EVAL_KEYS: &[&str] = &["data.eval_files", "data.eval_size", "eval."];

fn is_eval_key(k: &str) -> bool {
    EVAL_KEYS.iter().any(|e| {
        k == *e || (e.ends_with('.') && k.starts_with(e)) || k.starts_with(&format!("{e}#"))
    })
}

fn io_err(p: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: p.display().to_string(),
        source,
    }
}

// ---- fingerprint ----------------------------------------------------------------------------

/// What a run means: every configuration key except the safe ones, as TOML text, plus content
/// hashes of the model folders and data files it reads (`"model.policy#content"` ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub BTreeMap<String, String>);

impl Fingerprint {
    /// The fingerprint of `cfg` (reads and hashes the model and data files it names).
    pub fn of(cfg: &TrainConfig) -> Result<Fingerprint> {
        let mut m = BTreeMap::new();
        let table = toml::Table::try_from(cfg)
            .map_err(|e| Error::Invalid(format!("config as TOML: {e}")))?;
        for (sec, t) in &table {
            if SAFE_SECTIONS.contains(&sec.as_str()) {
                continue;
            }
            let Some(t) = t.as_table() else { continue };
            for (k, v) in t {
                let key = format!("{sec}.{k}");
                if !SAFE_KEYS.contains(&key.as_str()) {
                    m.insert(key, v.to_string());
                }
            }
        }
        let models = [
            ("model.policy", cfg.model.policy.as_str()),
            ("model.critic", cfg.model.critic.as_str()),
            ("model.reference", cfg.model.reference.as_str()),
        ];
        for (key, spec) in models {
            if !spec.is_empty() {
                let dir = super::trainer::model_dir(spec)?;
                m.insert(format!("{key}#content"), hash_model_dir(&dir)?);
            }
        }
        if cfg.data.task == "jsonl" {
            let p = Path::new(&cfg.data.train_file);
            m.insert("data.train_file#content".into(), hash_files(&[p])?);
            for spec in &cfg.data.eval_files {
                let (name, path) = crate::task::parse_eval_spec(spec)?;
                m.insert(
                    format!("data.eval_files#{name}"),
                    hash_files(&[Path::new(&path)])?,
                );
            }
        }
        Ok(Fingerprint(m))
    }
}

/// How a resumed configuration differs from its checkpoint's.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Differences that change the run's meaning: "key: checkpoint X, now Y".
    pub blocking: Vec<String>,
    /// Evaluation settings changed (the "before" numbers are measured again).
    pub eval_changed: bool,
    /// run.steps changed: (checkpoint's, now).
    pub steps: Option<(String, String)>,
}

/// Compares a checkpoint's fingerprint with the current one.
pub fn compare(saved: &Fingerprint, now: &Fingerprint) -> Comparison {
    let mut c = Comparison::default();
    let keys: std::collections::BTreeSet<&String> = saved.0.keys().chain(now.0.keys()).collect();
    let none = "(absent)".to_string();
    for k in keys {
        let (a, b) = (
            saved.0.get(k).unwrap_or(&none),
            now.0.get(k).unwrap_or(&none),
        );
        if a == b {
            continue;
        }
        if k == "run.steps" {
            c.steps = Some((a.clone(), b.clone()));
        } else if is_eval_key(k) {
            c.eval_changed = true;
        } else if k.ends_with("#content") {
            c.blocking.push(format!(
                "{}: the files' content differs (hash {a} in the checkpoint, {b} now)",
                k.trim_end_matches("#content")
            ));
        } else {
            c.blocking
                .push(format!("{k}: {a} in the checkpoint, {b} now"));
        }
    }
    c
}

/// A 64-bit change detector over bytes (not cryptographic): each 8-byte word goes through a
/// bijective rotate-xor-multiply step, so a change of any one word always changes the result.
#[derive(Clone, Copy)]
struct Hasher(u64);

impl Hasher {
    fn new() -> Self {
        Hasher(0x243f_6a88_85a3_08d3)
    }
    fn word(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(23) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
}

/// The hash of the files' names and contents, in order, as 16 hex digits.
pub fn hash_files(paths: &[&Path]) -> Result<String> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        h.bytes(name.unwrap_or_default().as_bytes());
        let mut f = std::fs::File::open(p).map_err(|e| io_err(p, e))?;
        let mut len = 0u64;
        loop {
            // Whole 8-byte words per read, so the result does not depend on read sizes.
            let mut n = 0;
            while n < buf.len() {
                let got = f.read(&mut buf[n..]).map_err(|e| io_err(p, e))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            h.bytes(&buf[..n]);
            len += n as u64;
            if n < buf.len() {
                break;
            }
        }
        h.word(len);
    }
    Ok(format!("{:016x}", h.0))
}

/// The hash of an HF model folder: its config, generation config, tokenizer files and
/// weights (`*.safetensors` and the shard index), by name.
pub fn hash_model_dir(dir: &Path) -> Result<String> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            p.is_file()
                && (n.ends_with(".safetensors")
                    || matches!(
                        n.as_str(),
                        "config.json"
                            | "generation_config.json"
                            | "model.safetensors.index.json"
                            | "tokenizer.json"
                            | "tokenizer_config.json"
                            | "special_tokens_map.json"
                            | "chat_template.jinja"
                    ))
        })
        .collect();
    files.sort();
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    hash_files(&refs)
}

// ---- the lock -------------------------------------------------------------------------------

/// The folder's lock, held until dropped (then the file is removed).
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    file: std::fs::File,
}

impl RunLock {
    /// Takes `dir/.lock` (the folder must exist). Err when another live process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            if !try_flock(&file, &path)? {
                let mut holder = String::new();
                let _ = (&file).read_to_string(&mut holder);
                return Err(Error::Invalid(format!(
                    "{} is in use by another run ({}): wait for it to finish, or choose another \
                     run.out_dir",
                    dir.display(),
                    describe_holder(holder.trim())
                )));
            }
            // The holder before us may have removed the file after we opened it: lock the file
            // that is at the path now.
            if !same_file(&file, &path) {
                continue;
            }
            let mut lock = RunLock { path, file };
            lock.file.set_len(0).map_err(|e| io_err(&lock.path, e))?;
            let text = format!("{} {}\n", std::process::id(), hostname());
            lock.file
                .write_all(text.as_bytes())
                .and_then(|_| lock.file.flush())
                .map_err(|e| io_err(&lock.path, e))?;
            return Ok(lock);
        }
        Err(Error::Invalid(format!(
            "{}: could not take the lock (it kept being replaced)",
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked; the lock itself goes with the descriptor.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn describe_holder(text: &str) -> String {
    let mut it = text.split_whitespace();
    match (it.next(), it.next()) {
        (Some(pid), Some(host)) => format!("process {pid} on {host}"),
        (Some(pid), None) => format!("process {pid}"),
        _ => "a process that has not written its pid yet".into(),
    }
}

/// flock(LOCK_EX | LOCK_NB): Ok(true) when taken, Ok(false) when another process holds it.
/// Where the file system has no flock, falls back to the pid in the file (alive or not).
fn try_flock(file: &std::fs::File, path: &Path) -> Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            let mut text = String::new();
            let _ = (&*file).read_to_string(&mut text);
            let mut it = text.split_whitespace();
            let pid: Option<i32> = it.next().and_then(|p| p.parse().ok());
            let host = it.next().unwrap_or("");
            let alive = pid.is_some_and(|p| {
                p as u32 != std::process::id() && (host != hostname() || pid_alive(p))
            });
            Ok(!alive)
        }
        _ => Err(io_err(path, err)),
    }
}

fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether a process with this pid exists (on this host).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

// ---- checkpoints on disk --------------------------------------------------------------------

/// Complete checkpoints (`step-NNNNNN` folders with meta.json), oldest first.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("meta.json").exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The staging folder of checkpoint `name` for this process.
pub fn staging_dir(root: &Path, name: &str) -> PathBuf {
    root.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Removes a folder by first renaming it out of the way (`.NAME.del-PID`), so a crash in the
/// middle never leaves a half-removed folder under its real name.
pub fn remove_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let name = dir
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let trash = dir.with_file_name(format!(".{name}.del-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&trash);
    std::fs::rename(dir, &trash).map_err(|e| io_err(dir, e))?;
    std::fs::remove_dir_all(&trash).map_err(|e| io_err(&trash, e))
}

/// Moves the finished staging folder `tmp` to `dst`, replacing an older `dst`.
pub fn publish_dir(tmp: &Path, dst: &Path) -> Result<()> {
    remove_dir(dst)?;
    std::fs::rename(tmp, dst).map_err(|e| io_err(dst, e))
}

/// Keeps the newest `keep` complete checkpoints under `root`.
pub fn prune_checkpoints(root: &Path, keep: usize) -> Result<()> {
    let mut all = list_checkpoints(root)?;
    while all.len() > keep {
        let (_, p) = all.remove(0);
        remove_dir(&p)?;
    }
    Ok(())
}

/// Whether `name` is a temporary entry a run of this project makes in a run folder or its
/// checkpoints/ (see the module doc).
fn is_temporary(name: &str, in_checkpoints: bool) -> bool {
    let hidden_tmp = name.starts_with('.') && (name.contains(".tmp-") || name.contains(".tmp."));
    let trash = name.starts_with('.') && name.contains(".del-");
    let half_checkpoint = in_checkpoints && name.starts_with("step-");
    hidden_tmp || trash || half_checkpoint || (!in_checkpoints && name.starts_with("final.tmp-"))
}

/// Removes the temporary entries of dead runs (call with the lock held); returns their paths.
fn clean_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (folder, in_ck) in [(dir.to_path_buf(), false), (dir.join("checkpoints"), true)] {
        let Ok(rd) = std::fs::read_dir(&folder) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            // A complete checkpoint (step-N with meta.json) is kept; anything else of these
            // names is a dead run's leftover, even when it still holds a meta.json.
            let complete = name.starts_with("step-") && p.join("meta.json").exists();
            if !is_temporary(&name, in_ck) || complete {
                continue;
            }
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| io_err(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

// ---- opening a run folder -------------------------------------------------------------------

/// `run.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunFile {
    kind: String,
    fingerprint: Fingerprint,
}

const RUN_KIND: &str = "dfpo-train run";

/// How the run starts.
#[derive(Debug)]
pub enum Start {
    /// From the initial models (the folder is empty but for the lock and `run.json`).
    Fresh,
    /// From the newest checkpoint, whose fingerprint matched.
    Resume {
        step: u64,
        /// Evaluation settings differ from the checkpoint's: measure "before" again.
        eval_changed: bool,
    },
}

/// An opened run folder: the lock and how the run starts.
#[derive(Debug)]
pub struct RunDir {
    pub lock: RunLock,
    pub start: Start,
    /// Notes for the log (removed temporaries, changed steps).
    pub notes: Vec<String>,
}

/// Reads a checkpoint's fingerprint from its meta.json (None: written before fingerprints).
pub fn checkpoint_fingerprint(dir: &Path) -> Result<Option<Fingerprint>> {
    #[derive(Deserialize)]
    struct M {
        #[serde(default)]
        fingerprint: Option<Fingerprint>,
    }
    let p = dir.join("meta.json");
    let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
    let m: M = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: p.display().to_string(),
        msg: e.to_string(),
    })?;
    Ok(m.fingerprint)
}

fn read_run_file(dir: &Path) -> Option<RunFile> {
    let text = std::fs::read_to_string(dir.join(RUN_FILE)).ok()?;
    serde_json::from_str::<RunFile>(&text)
        .ok()
        .filter(|r| r.kind == RUN_KIND)
}

/// Opens `cfg.run.out_dir` for a run with fingerprint `fp` under the rules of the module doc:
/// creates it if needed, takes the lock, removes dead runs' temporaries, and decides between a
/// fresh start and a resume, or refuses with an error naming what is there and the options.
pub fn open(cfg: &TrainConfig, fp: &Fingerprint) -> Result<RunDir> {
    let dir = PathBuf::from(&cfg.run.out_dir);
    let created = !dir.exists();
    let opened = open_inner(cfg, fp, &dir);
    if opened.is_err() && created {
        // A refused start leaves no folder behind (the lock is gone with the error).
        let _ = std::fs::remove_dir(&dir);
    }
    opened
}

fn open_inner(cfg: &TrainConfig, fp: &Fingerprint, dir: &Path) -> Result<RunDir> {
    let dir = dir.to_path_buf();
    let shown = dir.display().to_string();
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "run.out_dir = {shown} is a file, not a folder"
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let lock = RunLock::acquire(&dir)?;
    let mut notes: Vec<String> = clean_temporaries(&dir)?
        .iter()
        .map(|p| format!("removed {} (left by a run that was killed)", p.display()))
        .collect();
    let marked = read_run_file(&dir);
    let entries = folder_entries(&dir)?;
    let ours: Vec<&String> = entries
        .iter()
        .filter(|n| WRITTEN.contains(&n.as_str()))
        .collect();
    let foreign: Vec<&String> = entries
        .iter()
        .filter(|n| !WRITTEN.contains(&n.as_str()))
        .collect();
    let checkpoints = list_checkpoints(&dir.join("checkpoints"))?;
    let options = format!(
        "choose another run.out_dir, or run.overwrite=true (removes only what dfpo-train wrote \
         there: {}; other files are kept)",
        WRITTEN.join(", ")
    );

    if cfg.run.overwrite {
        if marked.is_none() && !ours.is_empty() {
            return Err(Error::Invalid(format!(
                "run.out_dir = {shown} holds {} but no {RUN_FILE} marks it as a dfpo-train run \
                 folder, so run.overwrite will not remove them: move them away or choose another \
                 run.out_dir",
                list(&ours)
            )));
        }
        for name in &ours {
            let p = dir.join(name.as_str());
            if p.is_dir() {
                remove_dir(&p)?;
            } else {
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
        if !ours.is_empty() {
            notes.push(format!(
                "run.overwrite: removed {} from {shown}",
                list(&ours)
            ));
        }
        write_run_file(&dir, fp)?;
        return Ok(RunDir {
            lock,
            start: Start::Fresh,
            notes,
        });
    }

    let mode = cfg.run.resume.as_str();
    if let Some((step, ck)) = checkpoints.last().filter(|_| mode != "false") {
        let Some(saved) = checkpoint_fingerprint(ck)? else {
            return Err(Error::Invalid(format!(
                "{} was written by an older dfpo-train without a configuration fingerprint, so \
                 resuming it cannot be checked; {options}",
                ck.display()
            )));
        };
        let c = compare(&saved, fp);
        if !c.blocking.is_empty() {
            return Err(Error::Invalid(format!(
                "run.out_dir = {shown} holds another run (checkpoint at step {step}) whose \
                 configuration differs from this one:\n  {}\nResume it with its own \
                 configuration (its config.toml), or {options}",
                c.blocking.join("\n  ")
            )));
        }
        if (cfg.run.steps as u64) < *step {
            return Err(Error::Invalid(format!(
                "run.steps = {} is below the step of the checkpoint being resumed ({step} in {}): \
                 set run.steps >= {step}, or choose another run.out_dir",
                cfg.run.steps,
                ck.display()
            )));
        }
        if let Some((a, b)) = &c.steps {
            notes.push(format!(
                "run.steps changed from {a} (the checkpoint's run) to {b}: the learning-rate \
                 schedule now spans {b} steps, so this run equals neither uninterrupted run"
            ));
        }
        return Ok(RunDir {
            lock,
            start: Start::Resume {
                step: *step,
                eval_changed: c.eval_changed,
            },
            notes,
        });
    }
    if mode == "true" {
        return Err(Error::Invalid(format!(
            "run.resume = true, but {shown} has no checkpoint to resume (no \
             checkpoints/step-N with meta.json); run.resume=auto starts afresh when there is none"
        )));
    }
    // A fresh start: the folder must hold nothing, or (resume = auto) only the files of an
    // unfinished run of this very configuration that had not saved a checkpoint yet.
    let restart = mode == "auto"
        && foreign.is_empty()
        && checkpoints.is_empty()
        && marked
            .as_ref()
            .is_some_and(|r| compare(&r.fingerprint, fp).blocking.is_empty());
    if !entries.is_empty() && !restart {
        let what = describe(&dir, &ours, &foreign, &checkpoints, marked.as_ref(), fp);
        let resume_hint = if !checkpoints.is_empty() {
            "; to continue it, use run.resume=auto with its configuration"
        } else {
            ""
        };
        return Err(Error::Invalid(format!(
            "run.out_dir = {shown} is not empty: {what}{resume_hint}. A new run never writes \
             into a folder holding other files: {options}"
        )));
    }
    write_run_file(&dir, fp)?;
    Ok(RunDir {
        lock,
        start: Start::Fresh,
        notes,
    })
}

fn write_run_file(dir: &Path, fp: &Fingerprint) -> Result<()> {
    let r = RunFile {
        kind: RUN_KIND.into(),
        fingerprint: fp.clone(),
    };
    let js = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(dir.join(RUN_FILE), |w| w.write_all(js.as_bytes()))
}

/// The names in `dir` except the lock, sorted.
fn folder_entries(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != LOCK_FILE)
        .collect();
    v.sort();
    Ok(v)
}

fn list(names: &[&String]) -> String {
    let mut v: Vec<String> = names.iter().take(8).map(|s| s.to_string()).collect();
    if names.len() > 8 {
        v.push(format!("and {} more", names.len() - 8));
    }
    v.join(", ")
}

/// One sentence on what a non-empty folder holds.
fn describe(
    dir: &Path,
    ours: &[&String],
    foreign: &[&String],
    checkpoints: &[(u64, PathBuf)],
    marked: Option<&RunFile>,
    fp: &Fingerprint,
) -> String {
    let mut parts = Vec::new();
    if !ours.is_empty() {
        let run = match marked {
            Some(r) => {
                let c = compare(&r.fingerprint, fp);
                if c.blocking.is_empty() {
                    "a run of this configuration".to_string()
                } else {
                    format!(
                        "a run of another configuration ({})",
                        c.blocking
                            .iter()
                            .take(4)
                            .map(|d| d.split(':').next().unwrap_or(d))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            }
            None => "files named like a run's".to_string(),
        };
        let ck = match checkpoints {
            [] => "no checkpoint".to_string(),
            c => format!(
                "checkpoints at step {}",
                c.iter()
                    .map(|(s, _)| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let summary = if dir.join("summary.json").exists() {
            ", finished"
        } else {
            ""
        };
        parts.push(format!("{run} ({}; {ck}{summary})", list(ours)));
    }
    if !foreign.is_empty() {
        parts.push(format!("other files ({})", list(foreign)));
    }
    parts.join(" and ")
}

// ---- model output folders (sft --out, export --out) ----------------------------------------

/// A command's output folder (sft's HF folder, export's policy/ + critic/): `written` names
/// every entry the command writes directly in it, `marker` the one that marks the folder as
/// the command's output.
pub struct ModelOut<'a> {
    pub flag: &'a str,
    pub dir: &'a Path,
    pub written: &'a [&'a str],
    pub marker: &'a str,
    pub overwrite: bool,
}

/// The names of an HF folder that dfpo-train writes (and sft's report).
pub const HF_FILES: &[&str] = &[
    "sft_eval.json",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

impl ModelOut<'_> {
    /// Checks, before any work, that the output can be written without touching anything
    /// dfpo-train did not write, and removes staging folders of dead processes beside it.
    pub fn check(&self) -> Result<()> {
        let (flag, dir) = (self.flag, self.dir);
        let shown = dir.display();
        self.clean_dead_staging();
        if !dir.exists() {
            return Ok(());
        }
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{flag} {shown} is a file; the output is a folder: choose a new folder name"
            )));
        }
        let entries = folder_entries(dir)?;
        if entries.is_empty() {
            return Ok(());
        }
        let refs: Vec<&String> = entries.iter().collect();
        if !self.overwrite {
            return Err(Error::Invalid(format!(
                "{flag} {shown} is not empty ({}); choose a new folder, or --overwrite to \
                 replace an earlier output of this command there (only the files dfpo-train \
                 writes are replaced; other files are kept)",
                list(&refs)
            )));
        }
        let ours = dir.join(self.marker).is_file();
        let clashes: Vec<&String> = entries
            .iter()
            .filter(|n| self.written.contains(&n.as_str()))
            .collect();
        if !ours && !clashes.is_empty() {
            return Err(Error::Invalid(format!(
                "{flag} {shown} holds {} but no {} marks it as written by dfpo-train, so \
                 --overwrite will not replace them: choose a new folder",
                list(&clashes),
                self.marker
            )));
        }
        Ok(())
    }

    /// The staging folder for this process (a hidden sibling of the output).
    pub fn staging(&self) -> PathBuf {
        sibling(self.dir, &format!("tmp.{}", std::process::id()))
    }

    /// Moves the finished `staging` folder's entries into place: a missing or empty output is
    /// replaced by the folder (one rename); otherwise (`--overwrite` of an earlier output) each
    /// entry replaces its namesake, and `written` entries the new output lacks are removed.
    pub fn publish(&self, staging: &Path) -> Result<()> {
        let dir = self.dir;
        if !dir.exists() || folder_entries(dir)?.is_empty() {
            if dir.exists() {
                std::fs::remove_dir(dir).map_err(|e| io_err(dir, e))?;
            }
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            }
            return std::fs::rename(staging, dir).map_err(|e| io_err(dir, e));
        }
        self.check()?;
        let new = folder_entries(staging)?;
        for name in &new {
            let (src, dst) = (staging.join(name), dir.join(name));
            if dst.is_dir() {
                remove_dir(&dst)?;
            }
            std::fs::rename(&src, &dst).map_err(|e| io_err(&dst, e))?;
        }
        for name in self.written {
            let p = dir.join(name);
            if new.iter().any(|n| n == name) {
                continue;
            }
            if p.is_dir() {
                remove_dir(&p)?;
            } else if p.is_file() {
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
        std::fs::remove_dir_all(staging).map_err(|e| io_err(staging, e))
    }

    /// Removes `.NAME.tmp.PID` siblings whose process is gone.
    fn clean_dead_staging(&self) {
        let Some(parent) = self.dir.parent() else {
            return;
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let prefix = sibling(self.dir, "tmp.")
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let Ok(rd) = std::fs::read_dir(parent) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix(&prefix)
                .and_then(|pid| pid.parse::<i32>().ok())
                .is_some_and(|pid| !pid_alive(pid));
            if dead {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// `.NAME.TAG` beside `path`.
fn sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_sees_any_one_word_change_and_not_read_sizes() {
        let d = std::env::temp_dir().join(format!("dfpo-hash-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let a = d.join("a.bin");
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        let h0 = hash_files(&[&a]).unwrap();
        assert_eq!(h0, hash_files(&[&a]).unwrap());
        for pos in [0usize, 8, 1 << 20, data.len() - 1] {
            let mut d2 = data.clone();
            d2[pos] ^= 1;
            std::fs::write(&a, &d2).unwrap();
            assert_ne!(h0, hash_files(&[&a]).unwrap(), "change at {pos}");
        }
        std::fs::write(&a, &data[..data.len() - 1]).unwrap();
        assert_ne!(h0, hash_files(&[&a]).unwrap(), "a shorter file");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn eval_keys_and_temporaries_are_recognised() {
        assert!(is_eval_key("eval.pass_k"));
        assert!(is_eval_key("data.eval_size"));
        assert!(is_eval_key("data.eval_files#test"));
        assert!(!is_eval_key("data.train_file"));
        assert!(is_temporary(".step-000002.tmp-123", true));
        assert!(is_temporary(".step-000002.del-123", true));
        assert!(is_temporary("step-000002", true));
        assert!(is_temporary("final.tmp-77", false));
        assert!(is_temporary(".summary.json.tmp.77.0", false));
        assert!(!is_temporary("final", false));
        assert!(!is_temporary("notes.tmp", false));
    }
}
