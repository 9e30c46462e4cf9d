#!/usr/bin/env python3
"""Builds the tiny Hugging Face fixtures used by tests/hf_io.rs and the decoder golden tests.

Regenerate (from the repository root; CPU only, a few seconds):

    python3 -m venv /tmp/hfref && /tmp/hfref/bin/pip install -r tools/reference/requirements.txt
    /tmp/hfref/bin/python tools/reference/make_tiny_models.py            # writes tests/fixtures/
    /tmp/hfref/bin/python tools/reference/make_tiny_models.py --out DIR  # anywhere else

Check that transformers loads a folder exported by the Rust side and reproduces a golden file:

    /tmp/hfref/bin/python tools/reference/make_tiny_models.py \
        --check-export EXPORTED_DIR --golden tests/fixtures/tiny-llama/golden.safetensors

What it writes (everything seeded and computed on the CPU, so a rerun with the versions pinned in
requirements.txt gives the same numbers; the BPE training is deterministic too):

  (in every model folder)    byte-level BPE tokenizer (~128 tokens over digits, arithmetic symbols
                             and a few words) with special tokens <|endoftext|> (eos), <|pad|>,
                             <|bos|> (prepended by the post-processor), <|im_start|>, <|im_end|>,
                             <unk>, and a ChatML-style chat template (uses trim_blocks/lstrip_blocks
                             whitespace rules, loop.first, `in` tests, str.strip() and
                             raise_exception for an unknown role), saved by transformers
                             (tokenizer.json, tokenizer_config.json, chat_template.jinja).
  tokenizer_cases.json       encode/decode cases and rendered chat templates recorded through
                             transformers (AutoTokenizer + apply_chat_template) for the Rust tests.
  tiny-llama/                LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16,
                             intermediate 128, untied LM head, no biases, rope_theta 1e4, eps 1e-5.
                             Weights rounded to bf16 and saved as BF16 (so the f32 values are exact).
  tiny-llama-sharded/        the same weights saved as F16 in several shards
                             (model.safetensors.index.json), to exercise the index loader.
  tiny-qwen2/                Qwen2ForCausalLM of the same size with q/k/v biases, tied embeddings,
                             rope_theta 1e6, eps 1e-6, saved as F32.
  param_shapes.json          parameter names/shapes (and config.json) of three more config variants
                             as transformers builds them: Llama with attention_bias + tied
                             embeddings, Llama with heads * head_dim != hidden, untied Qwen2.
  <model>/golden.safetensors for tiny-llama and tiny-qwen2, a right-padded batch of 2 sequences:
      input_ids [2,T] I64, attention_mask [2,T] I64 (1 = token, 0 = padding, positions 0..T-1),
      logits [2,T,V] F32 (every position; rows at padding positions are what transformers computes
        there and are not meaningful), token_logprobs [2,T-1] F32 (log p(ids[t+1] | ids[..=t]),
        0 where masked), logprob_mask [2,T-1] I64 (attention_mask[:, 1:]), loss [] F32 (mean of
        -token_logprobs over unmasked entries), grad.<param> F32 for EVERY parameter (d loss /
        d param, tied embedding gradient includes the LM-head contribution), and param.<name>
        copies of two parameters. The forward/backward runs in float64 (eager attention) from the
        stored weights, so the golden numbers are the exact function of the stored checkpoint up
        to f64 rounding; they are stored as f32.
"""

import argparse
import copy
import json
import os
import random
import shutil
import sys
import tempfile

import torch
import transformers
import tokenizers
import safetensors
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<unk>"]
VOCAB_SIZE = 128

CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou compute.<|im_end|>\\n' }}
    {%- endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' -}}
{% endif %}"""

WORDS = ["what", "is", "the", "answer", "plus", "minus", "times", "compute", "result",
         "question", "equals", "yes", "no", "so"]

GOLDEN_TEXTS = [
    "what is 12 + 7? the answer is 19.",
    "3 * 4 = 12",
]


def corpus(seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice(["+", "-", "*", "/"])
        word = {"+": "plus", "-": "minus", "*": "times", "/": "over"}[op]
        r = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        lines.append(rng.choice([
            f"{a} {op} {b} = {r}",
            f"what is {a} {word} {b}? the answer is {r}.",
            f"question: compute ({a} {op} {b}).\nresult: {r}",
            f"{a}{op}{b}={r}",
        ]))
    lines.append(" ".join(WORDS) + " Hello, world! [x] <y> {z} % ^ & | ~ ' \" ; _ # @ $")
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789")
    return lines


def build_tokenizer(out_dir):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  show_progress=False, min_frequency=2)
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>", unk_token="<unk>", chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def record_tokenizer_cases(tok, path):
    texts = GOLDEN_TEXTS + [
        "",
        "the answer is 42",
        "question: compute (5 - 3).\nresult: 2",
        "  leading and trailing spaces  ",
        "Hello, world!",
        "<|im_start|>user\n2+2<|im_end|>",
        "xyzzy 9999 ^&|~",
    ]
    enc = []
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        ids_sp = tok.encode(t, add_special_tokens=True)
        enc.append({
            "text": t,
            "ids": ids,
            "ids_special": ids_sp,
            "decoded_skip_special": tok.decode(ids_sp, skip_special_tokens=True),
            "decoded": tok.decode(ids_sp, skip_special_tokens=False),
        })
    conversations = [
        [{"role": "user", "content": "what is 2 + 2?"}],
        [{"role": "system", "content": "  be brief  "},
         {"role": "user", "content": "3 * 4"},
         {"role": "assistant", "content": "12\n"},
         {"role": "user", "content": "and 12 - 5?"}],
    ]
    chats = []
    for msgs in conversations:
        for agp in (False, True):
            text = tok.apply_chat_template(msgs, add_generation_prompt=agp, tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            chats.append({"messages": msgs, "add_generation_prompt": agp, "text": text,
                          "ids": ids})
    bad = [{"role": "tool", "content": "x"}]
    try:
        tok.apply_chat_template(bad, tokenize=False)
        raise SystemExit("the chat template accepted an unknown role")
    except SystemExit:
        raise
    except Exception as e:  # jinja2 TemplateError from raise_exception
        bad_error = str(e)
    cases = {
        "vocab_size": len(tok),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "special_ids": sorted(tok.all_special_ids),
        "encode": enc,
        "chat": chats,
        "chat_bad_role": {"messages": bad, "error": bad_error},
        "versions": versions(),
    }
    with open(path, "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return cases


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def common_config(tok):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def randomize(model, seed):
    """Weights of O(1) effect everywhere (norm gains and biases too), so every golden gradient
    is sensitive to every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def round_to(model, dtype):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def golden_batch(tok):
    seqs = [tok.encode(t, add_special_tokens=True) for t in GOLDEN_TEXTS]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def forward_backward(model, ids, mask):
    """float64 forward + backward of the mean next-token cross-entropy over unmasked targets."""
    m = copy.deepcopy(model).double()
    m.zero_grad()
    T = ids.shape[1]
    pos = torch.arange(T).unsqueeze(0).expand_as(ids)
    logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    lp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = lp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lmask = mask[:, 1:]
    lp = lp * lmask
    loss = -lp.sum() / lmask.sum()
    loss.backward()
    grads = {n: p.grad.detach().float().contiguous() for n, p in m.named_parameters()}
    return logits.detach().float(), lp.detach().float(), lmask, loss.detach().float(), grads


def write_golden(model, tok, path, param_copies):
    ids, mask = golden_batch(tok)
    logits, lp, lmask, loss, grads = forward_backward(model, ids, mask)
    out = {"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous(),
           "token_logprobs": lp.contiguous(), "logprob_mask": lmask.contiguous(),
           "loss": loss.reshape(())}
    for n, g in grads.items():
        out["grad." + n] = g
    params = dict(model.named_parameters())
    for n in param_copies:
        out["param." + n] = params[n].detach().float().contiguous()
    # One metadata key: safetensors writes several in random order, and the file should be
    # byte-identical across reruns.
    meta = {"info": json.dumps({"texts": GOLDEN_TEXTS, "loss": float(loss),
                                "versions": versions()}, sort_keys=True)}
    save_file(out, path, metadata=meta)
    return float(loss)


def make_model(cls, cfg, seed):
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.config._attn_implementation = "eager"
    randomize(model, seed)
    return model


def copy_tokenizer(tok_dir, model_dir):
    for f in sorted(os.listdir(tok_dir)):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(model_dir, f))


def save_model(model, out_dir, tok_dir, dtype, **kw):
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    m = copy.deepcopy(model).to(dtype)
    m.save_pretrained(out_dir, **kw)
    copy_tokenizer(tok_dir, out_dir)


def main_build(out):
    torch.use_deterministic_algorithms(True)
    os.makedirs(out, exist_ok=True)
    tok_dir = tempfile.mkdtemp(prefix="tiny-tokenizer-")  # copied into each model folder
    tok = build_tokenizer(tok_dir)
    cases = record_tokenizer_cases(tok, os.path.join(out, "tokenizer_cases.json"))
    print(f"tokenizer: {cases['vocab_size']} tokens, special ids {cases['special_ids']}")

    llama_cfg = LlamaConfig(**common_config(tok), tie_word_embeddings=False, attention_bias=False,
                            rms_norm_eps=1e-5, rope_theta=10000.0)
    llama = make_model(LlamaForCausalLM, llama_cfg, seed=1234)
    round_to(llama, torch.bfloat16)  # stored as BF16: the f32 values below are exact
    d = os.path.join(out, "tiny-llama")
    save_model(llama, d, tok_dir, torch.bfloat16)
    loss = write_golden(llama, tok, os.path.join(d, "golden.safetensors"),
                        ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight"])
    print(f"tiny-llama: loss {loss:.6f}")

    d = os.path.join(out, "tiny-llama-sharded")
    save_model(llama, d, tok_dir, torch.float16, max_shard_size="64KB")
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    print(f"tiny-llama-sharded: {len(shards)} shards")
    if len(shards) < 2 or not os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        raise SystemExit("the sharded variant did not shard")

    qwen_cfg = Qwen2Config(**common_config(tok), tie_word_embeddings=True, rms_norm_eps=1e-6,
                           rope_theta=1000000.0)
    qwen = make_model(Qwen2ForCausalLM, qwen_cfg, seed=5678)
    d = os.path.join(out, "tiny-qwen2")
    save_model(qwen, d, tok_dir, torch.float32)
    loss = write_golden(qwen, tok, os.path.join(d, "golden.safetensors"),
                        ["model.layers.1.self_attn.k_proj.weight",
                         "model.layers.1.self_attn.k_proj.bias"])
    print(f"tiny-qwen2: loss {loss:.6f}")

    record_param_shapes(os.path.join(out, "param_shapes.json"))

    # The committed folders must reload through transformers and reproduce the golden logits.
    for name in ["tiny-llama", "tiny-llama-sharded", "tiny-qwen2"]:
        gname = "tiny-llama" if name.startswith("tiny-llama") else name
        err = check_folder(os.path.join(out, name), os.path.join(out, gname, "golden.safetensors"))
        tol = 2e-2 if name.endswith("sharded") else 1e-4  # the sharded copy is F16-rounded
        print(f"reload {name}: max |logit diff| {err:.3g}")
        if not err < tol:
            raise SystemExit(f"{name}: reloaded model does not reproduce the golden logits")


def record_param_shapes(path):
    """Parameter names and shapes transformers gives a few more config variants (no weights):
    Llama with attention_bias (q/k/v AND o_proj biases) and tied embeddings, Llama with
    head_dim * heads != hidden_size, untied Qwen2 with 4 layers and MHA."""
    variants = {
        "llama_bias_tied": LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=1, attention_bias=True,
                                       tie_word_embeddings=True, max_position_embeddings=64),
        "llama_wide_heads": LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64),
        "qwen2_untied_mha": Qwen2Config(vocab_size=40, hidden_size=24, intermediate_size=40,
                                        num_hidden_layers=4, num_attention_heads=3,
                                        num_key_value_heads=3, tie_word_embeddings=False,
                                        max_position_embeddings=64),
    }
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
    out = {}
    for name, cfg in variants.items():
        model = cls[cfg.model_type](cfg)
        out[name] = {"config": json.loads(cfg.to_json_string()),
                     "params": {n: list(p.shape) for n, p in model.named_parameters()}}
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


def check_folder(folder, golden_path):
    """Loads `folder` with transformers, runs the golden batch in float64, returns the largest
    absolute logit difference (valid positions only) against the golden file."""
    g = load_file(golden_path)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                 dtype=torch.float64).eval()
    ids, mask = g["input_ids"], g["attention_mask"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    valid = mask.bool()
    return (logits[valid] - g["logits"][valid]).abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures"))
    ap.add_argument("--check-export", metavar="DIR",
                    help="load DIR with transformers and compare with --golden instead of building")
    ap.add_argument("--golden", help="golden.safetensors for --check-export")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.check_export:
        if not a.golden:
            ap.error("--check-export needs --golden")
        err = check_folder(a.check_export, a.golden)
        print(f"{a.check_export}: max |logit diff| vs {a.golden}: {err:.3g}")
        sys.exit(0 if err < a.tol else 1)
    main_build(os.path.abspath(a.out))


if __name__ == "__main__":
    main()
