#!/usr/bin/env bash
# The GPU check within a device lease's budget (15 minutes for everything, start included).
# Run on the GPU machine from the repository root, after `tools/gpu-bundle` here:
#   tools/gpu-check.sh OUTDIR [SECONDS]
# Phases, each with its own deadline so the whole thing ends inside SECONDS (default 420):
#   1. correctness, in parallel: every test binary with DFPO_REQUIRE_CUDA=1 --include-ignored,
#      compute-sanitizer memcheck on each CUDA parity binary, racecheck on the shared-memory
#      kernels' binaries, and the default `dfpo-train` run (CUDA);
#   2. the criterion benches' CUDA groups, one at a time (the GPU to themselves);
#   3. the PyTorch timings of the same work, then summarize.py's ratios.
# A rerun can narrow each phase (space-separated lists; unset = everything):
#   GPU_CHECK_TESTS="cuda_flow cli"  GPU_CHECK_MEMCHECK="cuda_flow"  GPU_CHECK_RACECHECK="cuda_flow"
#   GPU_CHECK_BENCHES="model train_step"  GPU_CHECK_TORCH=0  GPU_CHECK_DEFAULT=0
# Logs go to a scratch folder that is tarred into OUTDIR/logs.tgz every 20 s (so a killed run
# still returns them); OUTDIR/SUMMARY.txt has one line per job.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?OUTDIR}"
budget="${2:-420}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
logs=/tmp/dfpo-gpu-logs
rm -rf "$logs"; mkdir -p "$logs"
summary="$logs/SUMMARY.txt"
say() { echo "$*" | tee -a "$summary"; }
snapshot() { tar -C "$logs" -czf "$out/logs.tgz.tmp" . 2>/dev/null && mv "$out/logs.tgz.tmp" "$out/logs.tgz"; cp "$summary" "$out/SUMMARY.txt" 2>/dev/null; }
( while sleep 20; do snapshot; done ) &
snap_pid=$!

bundle="$root/gpu-bundle"
u="$bundle/unpacked"
if [[ ! -x "$u/run.sh" ]]; then
  rm -rf "$u"; mkdir -p "$u"
  tar -C "$u" -xJf "$bundle/dfpo-gpu.tar.xz" || { say "unpack failed"; snapshot; exit 1; }
fi
bin="$u/bin"
# tests/cli.rs runs the binary at the path cargo compiled into it (this repo's target/release).
if [[ -f "$bundle/dfpo-train.xz" ]]; then
  exe_dir="$(cat "$bundle/dfpo-train.dir")"
  mkdir -p "$exe_dir"
  xz -dc "$bundle/dfpo-train.xz" > "$exe_dir/dfpo-train" && chmod +x "$exe_dir/dfpo-train"
fi
export DFPO_REQUIRE_CUDA=1
export DFPO_FIXTURES="$root/tests/fixtures"
say "dfpo GPU check, commit $(cat "$u/COMMIT"), $(date -u +%Y-%m-%dT%H:%MZ), budget ${budget}s"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$summary"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
say "compute-sanitizer: ${san:-not found}; unpacked at $(( $(date +%s) - start ))s"

# ---- phase 1: correctness, in parallel ----
p1=$(( $(left) * 45 / 100 ))
jobs="$logs/jobs.txt"; : > "$jobs"
all_cuda=$(cd "$bin" && ls test-cuda_* | sed 's/^test-//')
all_tests=$(cd "$bin" && ls test-* | sed 's/^test-//' | grep -v '^cuda_')
for n in ${GPU_CHECK_TESTS-$all_cuda}; do [[ -x "$bin/test-$n" ]] && echo "test test-$n" >> "$jobs"; done
if [[ -n "$san" ]]; then
  for n in ${GPU_CHECK_MEMCHECK-$all_cuda}; do echo "memcheck test-$n" >> "$jobs"; done
  for n in ${GPU_CHECK_RACECHECK-cuda_attention cuda_risk cuda_flow cuda_lmops cuda_layers cuda_rl}; do
    echo "racecheck test-$n" >> "$jobs"; done
fi
[[ -n "${exe_dir:-}" && "${GPU_CHECK_DEFAULT:-1}" == 1 ]] && echo "default dfpo-train" >> "$jobs"
[[ -z "${GPU_CHECK_TESTS+x}" ]] && for n in $all_tests; do echo "test test-$n" >> "$jobs"; done
export bin san logs summary exe_dir root
run_job() {
  local kind="$1" name="$2" lim="$3" t0=$(date +%s) r
  case $kind in
    test) timeout "$lim" "$bin/$name" --include-ignored --test-threads=4 > "$logs/$name.log" 2>&1 ;;
    memcheck|racecheck) timeout "$lim" "$san" --tool "$kind" --error-exitcode 9 "$bin/$name" \
        --include-ignored --test-threads=1 > "$logs/$name.$kind.log" 2>&1 ;;
    default) (cd "$root" && timeout "$lim" "$exe_dir/dfpo-train" train --set run.out_dir=/tmp/dfpo-default) \
        > "$logs/dfpo-train-default.log" 2>&1 ;;
  esac
  r=$?
  local res; case $r in 0) res=ok ;; 124) res=TIMEOUT ;; *) res="FAILED($r)" ;; esac
  local log="$logs/$name.log"; [[ $kind == memcheck || $kind == racecheck ]] && log="$logs/$name.$kind.log"
  [[ $kind == default ]] && log="$logs/dfpo-train-default.log"
  echo "$kind $name: $res in $(( $(date +%s) - t0 ))s | $(grep -E '^test result|ERROR SUMMARY|RACECHECK SUMMARY' "$log" 2>/dev/null | tail -1)" >> "$summary"
}
export -f run_job
say "== phase 1: tests + sanitizer + default run ($(wc -l < "$jobs") jobs, ${p1}s) =="
deadline1=$(( $(date +%s) + p1 ))
export deadline1
# Each job gets what is left of the phase (a job started late gets less).
xargs -P 14 -L 1 bash -c 'l=$(( deadline1 - $(date +%s) )); if (( l < 5 )); then echo "$0 $1: NOT RUN (phase 1 out of time)" >> "$summary"; else run_job "$0" "$1" "$l"; fi' < "$jobs"
snapshot

# ---- phase 2: benches (CUDA groups only), one at a time ----
p2=$(( $(left) * 60 / 100 ))
say "== phase 2: benches (${p2}s) =="
deadline2=$(( $(date +%s) + p2 ))
export CRITERION_HOME="$logs/criterion"
for n in ${GPU_CHECK_BENCHES-flow risk rl attention lmops layers model generate train_step}; do
  l=$(( deadline2 - $(date +%s) ))
  (( l < 10 )) && { say "bench-$n: NOT RUN (out of time)"; continue; }
  lim=$(( l < 45 ? l : 45 )); [[ $n == train_step ]] && lim=$l; [[ $n == generate ]] && lim=$(( l < 90 ? l : 90 ))
  DFPO_BENCH_CUDA_STEPS=1 timeout "$lim" "$bin/bench-$n" --bench _cuda --warm-up-time 0.5 --measurement-time 1.5 \
    > "$logs/bench-$n.log" 2>&1
  say "bench-$n: exit $?"
  grep -E "time:|thrpt:|^[a-z_]+_cuda/|DFPO/PPO|: (dfpo|ppo) |^cuda: rollout" "$logs/bench-$n.log" | head -60 >> "$summary"
done
snapshot

# ---- phase 3: PyTorch on the same card ----
say "== phase 3: PyTorch ($(left)s left) =="
ref="$u/reference"
if [[ "${GPU_CHECK_TORCH:-1}" != 1 ]]; then
  say "PyTorch: skipped (GPU_CHECK_TORCH=0)"
elif python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  l=$(( $(left) - 5 )); (( l > 60 )) && l=60
  (( l > 5 )) && timeout "$l" python3 "$ref/torch_bench.py" --reps 10 --out "$logs/torch.json" > "$logs/torch_bench.log" 2>&1; say "torch_bench: exit $?"
  l=$(( $(left) - 5 )); (( l > 40 )) && l=40
  (( l > 5 )) && timeout "$l" python3 "$ref/torch_attention_bench.py" --reps 10 --out "$logs/torch_attention.json" > "$logs/torch_attention.log" 2>&1; say "torch_attention: exit $?"
  l=$(( $(left) - 5 )); (( l > 75 )) && l=75
  (( l > 5 )) && timeout "$l" python3 "$ref/torch_generate_bench.py" --warmup 1 --reps 2 --out "$logs/torch_generate.json" > "$logs/torch_generate.log" 2>&1; say "torch_generate: exit $?"
  l=$(( $(left) - 5 ))
  (( l > 5 )) && timeout "$l" python3 "$ref/torch_dfpo_step.py" --warmup 2 --reps 5 --out "$logs/torch_dfpo_step.json" > "$logs/torch_dfpo_step.log" 2>&1; say "torch_dfpo_step: exit $?"
  grep -h '"bench": "torch_dfpo_step"' "$logs/torch_dfpo_step.log" >> "$summary" 2>/dev/null
  python3 "$ref/summarize.py" "$logs/criterion" "$logs/torch.json" "$logs/torch_attention.json" "$logs/torch_generate.json" "$logs/torch_dfpo_step.json" >> "$summary" 2>&1
else
  say "PyTorch with CUDA not available: comparison NOT run"
fi
say "done at $(( $(date +%s) - start ))s"
kill "$snap_pid" 2>/dev/null
snapshot
cat "$summary"
