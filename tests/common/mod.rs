//! Helpers shared by the integration tests: a seeded RNG, poisoned buffers and closeness checks.
#![allow(dead_code)]

/// Poison for CUDA output buffers: any element a kernel forgets to write stays NaN and fails.
pub const POISON: f32 = f32::NAN;

/// xorshift64* generator: deterministic per seed, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(dfpo::kernels::splitmix64(seed) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9007199254740992.0)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normal_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
    pub fn normal_vec_f64(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.range(lo, hi) as f32).collect()
    }
    /// A seed that differs every run (tests use fresh random inputs), printed for replay.
    pub fn fresh(test: &str) -> Self {
        let seed = std::env::var("DFPO_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: seed {seed} (replay with DFPO_TEST_SEED={seed})");
        Rng::new(seed)
    }
}

/// Asserts |got − want| ≤ atol + rtol·|want| elementwise, and that nothing is NaN.
/// Reports the worst element, so a failure says where and by how much.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        assert!(
            !g.is_nan(),
            "{what}[{i}] is NaN (want {w}): element never written?"
        );
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i} got {} want {} (|diff| {:.3e} > atol {atol:.1e} + rtol {rtol:.1e}·|want|)",
            got[i],
            want[i],
            (got[i] as f64 - want[i] as f64).abs()
        );
    }
}

/// f64 variant of [`assert_close`].
pub fn assert_close_f64(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            !g.is_nan() && (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g} want {w}"
        );
    }
}

/// The committed fixtures folder: `$DFPO_FIXTURES` when set (the GPU bundle runs the tests from
/// another checkout path), else `tests/fixtures` of the source tree this was built from.
pub fn fixtures_dir() -> std::path::PathBuf {
    match std::env::var("DFPO_FIXTURES") {
        Ok(p) => p.into(),
        Err(_) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// Byte sizes, in order, of the parameters of kernel `name` in a PTX module: `.u64` 8, other
/// scalars 4, `.b8 name[N]` (a by-value struct) N. Panics when the entry is missing.
pub fn ptx_param_sizes(ptx: &str, name: &str) -> Vec<usize> {
    let entry = format!(".entry {name}(");
    let at = ptx
        .find(&entry)
        .unwrap_or_else(|| panic!("no kernel {name} in the PTX"));
    let rest = &ptx[at + entry.len()..];
    rest[..rest.find(')').unwrap()]
        .lines()
        .filter(|l| l.contains(".param"))
        .map(|l| match l.find('[') {
            Some(i) => l[i + 1..l.find(']').unwrap()].parse().unwrap(),
            None if l.contains(".u64") => 8,
            None => 4,
        })
        .collect()
}

/// A random tiny arithmetic model folder (`dfpo::task::arith::write_random_model` with `seed`),
/// written once per test binary under the temp folder as `{prefix}-{pid}`.
pub fn tiny_model(prefix: &str, seed: u64) -> std::path::PathBuf {
    static ONCE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        dfpo::task::arith::write_random_model(&dir, seed).unwrap();
        dir
    })
    .clone()
}

/// `{temp}/{prefix}-{pid}-{tag}`, removed if it exists.
pub fn out_dir(prefix: &str, tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `--set`s of a fast CPU run of `model` into `out` (2 prompts x 2 samples of up to 4 tokens,
/// 4 eval prompts per split; a random model's unreadable answers allowed).
pub fn small_run_sets(model: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    vec![
        format!("model.policy={}", model.display()),
        format!("run.out_dir={}", out.display()),
        "run.device=cpu".into(),
        "run.progress=false".into(),
        "rollout.prompts_per_step=2".into(),
        "rollout.n_samples=2".into(),
        "rollout.max_new_tokens=4".into(),
        "data.eval_size=4".into(),
        "data.max_unparsed=1".into(),
    ]
}
