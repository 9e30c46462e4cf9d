#!/usr/bin/env python3
"""Times rollout generation with transformers' `generate` and a static KV cache, for the ratio
against dfpo's device generation (benches/generate.rs, criterion id generate_cuda/rollout_graph):

  a Qwen2-0.5B-shaped Qwen2ForCausalLM (24 layers, d 896, I 4864, 14 q / 2 kv heads of 64,
  V 151936, tied) with random weights in bf16 (--dtype), 8 prompts x 8 samples
  (num_return_sequences) = 64 rows, 128 prompt tokens (no padding), exactly 256 new tokens per
  row (min_new_tokens = max_new_tokens, so no row stops early), multinomial sampling at
  temperature 1 with top-k and top-p off, cache_implementation="static".

With --compile the forward is torch.compile'd (mode reduce-overhead, CUDA graphs: transformers'
recommended use of the static cache); it adds minutes of compile time, so it is off by default
and the JSON says which was timed. Times are medians of --reps runs after --warmup runs,
synchronised wall clock. Writes JSON to --out: generate_rollout_ms and tokens/s of new tokens.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 8, 8, 128, 256


def qwen05b():
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                       tie_word_embeddings=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--out", default="torch_generate_bench.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen05b(), torch_dtype=getattr(torch, a.dtype))
    model = model.to("cuda").eval()
    if a.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(3, 151936, (PROMPTS, PROMPT_LEN), device="cuda")
    mask = torch.ones_like(ids)
    gc = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        num_return_sequences=SAMPLES, cache_implementation="static",
        eos_token_id=None, pad_token_id=0,
    )

    def run():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert out.shape == (PROMPTS * SAMPLES, PROMPT_LEN + NEW_TOKENS), out.shape
        return dt

    for _ in range(a.warmup):
        run()
    ts = [run() for _ in range(a.reps)]
    t = statistics.median(ts)
    rows = PROMPTS * SAMPLES
    # Top-level keys are what summarize.py pairs; the rest sits under "torch_generate" so that
    # merging this file with torch_bench.py's JSON overwrites nothing.
    res = {
        "generate_rollout_ms": t * 1e3,
        "generate_rollout_tokens_per_s": rows * NEW_TOKENS / t,
        "torch_generate": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(),
            "dtype": a.dtype,
            "compiled": bool(a.compile),
            "rows": rows, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
            "runs_ms": [x * 1e3 for x in ts],
        },
    }
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
