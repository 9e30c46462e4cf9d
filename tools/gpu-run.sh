#!/usr/bin/env bash
# The GPU check, run on a GPU machine from inside the bundle made by tools/gpu-bundle:
#   ./run.sh LOGDIR
# 1. the GPU (nvidia-smi); 2. every test with DFPO_REQUIRE_CUDA=1 (a skipped GPU test fails);
# 3. compute-sanitizer memcheck + racecheck on the CUDA parity tests; 4. criterion benches;
# 5. PyTorch timings of the same work (incl. the DFPO/PPO update step); 6. a summary with ratios. Exit status: 1 if any test or
# sanitizer run failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
logs="${1:-$here/../gpu-logs}"
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
export DFPO_REQUIRE_CUDA=1
# Tests read committed fixtures: from the repository checkout the bundle sits in.
export DFPO_FIXTURES="${DFPO_FIXTURES:-$here/../tests/fixtures}"
status=0
summary="$logs/SUMMARY.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
say "dfpo GPU check, commit $(cat "$here/COMMIT"), $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$summary"
nvidia-smi > "$logs/nvidia-smi.txt" 2>&1

say "== tests (DFPO_REQUIRE_CUDA=1) =="
for t in "$here"/bin/test-*; do
  name=$(basename "$t")
  if timeout 300 "$t" --include-ignored --test-threads=1 > "$logs/$name.log" 2>&1; then r=ok; else r=FAILED; status=1; fi
  say "$name: $r ($(grep -E '^test result' "$logs/$name.log" | tail -1))"
done

san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n "$san" ]]; then
  say "== compute-sanitizer on the CUDA parity tests =="
  # The real-size tests (65536 x 151936 logits, 40 GB) ran above; instrumented, their ten
  # billion logit reads would take the whole time limit, so the sanitizers skip them.
  for t in "$here"/bin/test-cuda_*; do
    name=$(basename "$t")
    for tool in memcheck racecheck; do
      if timeout 300 "$san" --tool "$tool" --error-exitcode 9 "$t" --include-ignored --test-threads=1 \
        --skip _real_size_ > "$logs/$name.$tool.log" 2>&1; then
        r=clean
      else r=FAILED; status=1; fi
      say "$name $tool: $r ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/$name.$tool.log" | tail -1))"
    done
  done
else
  say "compute-sanitizer: not found, sanitizer NOT run"
fi

say "== benches =="
export CRITERION_HOME="$logs/criterion"
for b in "$here"/bin/bench-*; do
  name=$(basename "$b")
  # train_step builds Qwen2-0.5B-shaped trainers and times updates of seconds each: more time.
  limit=300; [[ $name == bench-train_step ]] && limit=600
  timeout $limit "$b" --bench --warm-up-time 1 --measurement-time 3 > "$logs/$name.log" 2>&1 || say "$name: exit $?"
  grep -E "^[a-z_/0-9 -]+time:|thrpt:" -B0 "$logs/$name.log" | head -60 >> "$summary"
  # train_step's own lines: per-algo times, DFPO/PPO ratios, the hand-timed CUDA whole step.
  grep -E "^train_step_[a-z]+(/[a-z]+/(step|update): |: DFPO/PPO )" "$logs/$name.log" >> "$summary"
done

say "== PyTorch (eager) on the same card =="
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  python3 "$here/reference/torch_bench.py" --out "$logs/torch.json" 2>&1 | tee -a "$summary"
  python3 "$here/reference/torch_attention_bench.py" --out "$logs/torch_attention.json" > "$logs/torch_attention.log" 2>&1
  # The DFPO / PPO update step in PyTorch (Qwen2-0.5B shape, bf16, B = 8, S = 512).
  timeout 600 python3 "$here/reference/torch_dfpo_step.py" --out "$logs/torch_dfpo_step.json" > "$logs/torch_dfpo_step.log" 2>&1 ||
    say "torch_dfpo_step.py: exit $? (see torch_dfpo_step.log)"
  grep -h '"bench": "torch_dfpo_step"' "$logs/torch_dfpo_step.log" >> "$summary"
  # Rollout generation: transformers generate with a static KV cache (pairs with benches/generate.rs).
  timeout 300 python3 "$here/reference/torch_generate_bench.py" --out "$logs/torch_generate.json" > "$logs/torch_generate.log" 2>&1 ||
    say "torch_generate_bench.py: exit $? (see torch_generate.log)"
  python3 "$here/reference/summarize.py" "$logs/criterion" "$logs/torch.json" "$logs/torch_attention.json" "$logs/torch_dfpo_step.json" "$logs/torch_generate.json" 2>&1 | tee -a "$summary"
else
  say "PyTorch with CUDA not available: comparison NOT run"
fi
say "overall: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
