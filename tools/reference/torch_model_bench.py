#!/usr/bin/env python3
"""Times, in PyTorch eager, the decoder forward+backward of dfpo's benches/model.rs, for ratios:

  qwen2_0.5b_fwd_bwd   a Qwen2-0.5B-shaped Qwen2ForCausalLM (24 layers, d 896, I 4864, 14 q / 2 kv
                       heads of 64, V 151936, tied) with random weights, bf16 (--dtype), B = 8,
                       S = 512, loss = mean next-token cross-entropy, backward to every parameter
                       (criterion id model_cuda/qwen2_0.5b_fwd_bwd)
  tiny_llama_fwd_bwd   with --device cpu: the tiny-llama fixture in fp32 at B = 4, S = 64
                       (criterion id model_cpu/tiny_llama_fwd_bwd)

Attention is transformers' default for the installed version (sdpa). Times are medians of --reps
runs (CUDA: synchronised wall clock around each step). Writes JSON to --out with ms and tokens/s.
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config


def qwen05b():
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                       tie_word_embeddings=True)


def step(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for p in model.parameters():
        p.grad = None
    return out.loss


def time_it(model, ids, reps, device):
    for _ in range(2):
        step(model, ids)
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(model, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="torch_model_bench.json")
    a = ap.parse_args()
    res = {"torch": torch.__version__, "device": a.device}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
        b, s = 8, 512
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(qwen05b(), torch_dtype=getattr(torch, a.dtype))
        model = model.to("cuda").train()
        ids = torch.randint(0, 151936, (b, s), device="cuda")
        t = time_it(model, ids, a.reps, "cuda")
        res["qwen2_0.5b_fwd_bwd"] = {"B": b, "S": s, "ms": t * 1e3, "tokens_per_s": b * s / t}
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        d = os.path.join(here, "..", "..", "tests", "fixtures", "tiny-llama")
        b, s = 4, 64
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).train()
        ids = torch.randint(0, model.config.vocab_size, (b, s))
        t = time_it(model, ids, a.reps, "cpu")
        res["tiny_llama_fwd_bwd"] = {"B": b, "S": s, "ms": t * 1e3, "tokens_per_s": b * s / t,
                                     "threads": torch.get_num_threads()}
    print(json.dumps(res, indent=1))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
