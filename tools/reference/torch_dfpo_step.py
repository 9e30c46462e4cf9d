#!/usr/bin/env python3
"""Times, in eager PyTorch, the update phase of one DFPO (and one PPO) training step as dfpo's
benches/train_step.rs times it (criterion ids train_step_cuda/{dfpo,ppo}/update), for issue 4's
ratios: ours tokens/s / torch tokens/s for the DFPO step, and DFPO/PPO step time in PyTorch.

One update = the actor update then the critic update on one minibatch of B rows x S tokens
(the same order and the same optimizer settings as src/train/trainer.rs with the defaults):

  actor   Qwen2 decoder (bf16 weights) -> logits -> fp32 log-softmax -> log-prob of each next
          token and the entropy (dfpo's graph computes both; ent_coef = 0, so the entropy gets
          no gradient) -> clipped PPO loss (clip 0.2 / 0.2) with token-mean weights ->
          backward -> bf16 grads to fp32 master grads -> global norm clip 1.0 -> AdamW
          (lr 2e-4, betas 0.9/0.999, eps 1e-8, wd 0; fused=True where available) -> master
          weights copied back into the bf16 model.
  critic  the same trunk without the LM head (its own weights), then
          dfpo: the flow head in fp32 on the final hidden state (src/kernels/flow.rs):
                u = c W_cond + b_in per token; per sample [u + w_z z + w_t tau] -> GELU(tanh)
                -> LayerNorm, (Linear -> GELU -> LayerNorm) x (depth - 1), Linear -> 1.
                Three evaluations (readout v(eps, 0), anchor v(z_b, tau_b), DCFM v(z_d, tau_d)),
                batched into one call over the 3K samples of each token; the loss of
                src/train/heads.rs FlowCriticLoss:
                  sum_t tok_w [ w_unc (w_dcfm mean_k dmask (v_d - vel_d)^2
                                       + w_bcfm mean_k (v_b - vel_b)^2)
                                + w_gc mean_k (zhat - gc_target)^2 ]  (zhat = eps + v_read)
                  + sum_t tok_w [ (CVaR_a(zhat) - CVaR_a(G))^2 + (MeanHigh_b(zhat) - MeanHigh_b(G))^2
                                  + relu(VarLow(zhat) - VarLow(G)) + relu(VarHigh(G) - VarHigh(zhat)) ]
                with the tails from torch.sort (k_a = max(1, floor(a K)), population variances),
                K = 16 samples per token, alpha = beta = 0.1, all weights 1 but w_gc = 0.5.
          ppo:  a value head Linear(d -> 1) (bf16) and the clipped value loss
                sum_t tok_w 1/2 max((v - R)^2, (v_clip - R)^2), clip 0.2.
          Then the same master-weight AdamW as the actor (lr 1e-3).

Inputs are synthetic (random ids, old log-probs from one forward of the initial weights, whitened
random advantages, plausible flow targets): the preparation is not timed on either side, and no
value changes the work. Rows are full (no padding): prompt P = 64 tokens, the response mask covers
positions P - 1 .. S - 2, as in the Rust bench's synthetic batch.

Shapes: default (GPU) the Qwen2-0.5B shape (24 layers, d 896, I 4864, 14 q / 2 kv heads of 64,
V 151936, tied, q/k/v biases) in bf16, B = 8, S = 512. --tiny: the tiny arithmetic model's shape
(Llama: 2 layers, d 128, I 256, 2 q / 1 kv heads of 64, V 20, tied) in fp32 at B = 32, S = 15,
prompt 7 (the Rust CPU update minibatch's shape; its rows come from a real rollout, so its
responses are often shorter than these full rows), for a CPU check.

Timing: --warmup untimed updates, then --reps timed ones (CUDA events on the GPU, wall clock on
the CPU); the median is reported. Prints one JSON line per algo
  {"bench": "torch_dfpo_step", "algo": "dfpo", "tokens_per_s": ..., "ms": ..., ...}
and writes {"torch_dfpo_step": {...}} to --out for tools/reference/summarize.py.

usage: torch_dfpo_step.py [--device cuda|cpu] [--tiny] [--out torch_dfpo_step.json]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def qwen05b():
    return dict(vocab=151936, hidden=896, inter=4864, layers=24, heads=14, kv_heads=2,
                head_dim=64, eps=1e-6, theta=1e6, qkv_bias=True)


def tiny():
    return dict(vocab=20, hidden=128, inter=256, layers=2, heads=2, kv_heads=1, head_dim=64,
                eps=1e-5, theta=1e4, qkv_bias=False)


def init_decoder(cfg, device, dtype, gen):
    """Parameters by name (HF init: normal(0, 0.02) matrices, norm weights 1, biases 0)."""
    d, hd = cfg["hidden"], cfg["head_dim"]
    qd, kvd = cfg["heads"] * hd, cfg["kv_heads"] * hd

    def mat(*shape):  # drawn on the device: a 0.5B model's weights in seconds
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(dtype)

    def vec(n, v):
        return torch.full((n,), v, device=device, dtype=dtype)

    p = {"embed": mat(cfg["vocab"], d), "norm": vec(d, 1.0)}
    for i in range(cfg["layers"]):
        p[f"{i}.ln1"] = vec(d, 1.0)
        p[f"{i}.q"], p[f"{i}.k"], p[f"{i}.v"] = mat(qd, d), mat(kvd, d), mat(kvd, d)
        if cfg["qkv_bias"]:
            p[f"{i}.qb"], p[f"{i}.kb"], p[f"{i}.vb"] = vec(qd, 0.0), vec(kvd, 0.0), vec(kvd, 0.0)
        p[f"{i}.o"] = mat(d, qd)
        p[f"{i}.ln2"] = vec(d, 1.0)
        p[f"{i}.gate"], p[f"{i}.up"], p[f"{i}.down"] = (
            mat(cfg["inter"], d), mat(cfg["inter"], d), mat(d, cfg["inter"]))
    return p


def rms_norm(x, w, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w.float()).to(x.dtype)


def rope_tables(cfg, s, device, dtype):
    hd = cfg["head_dim"]
    inv = 1.0 / (cfg["theta"] ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    f = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def sdpa(q, k, v):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), is_causal=True)


def trunk(p, cfg, ids, rope):
    """The decoder up to the final RMSNorm: [B, S, d]."""
    b, s = ids.shape
    hd, nh, nkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
    cos, sin = rope
    x = F.embedding(ids, p["embed"])
    for i in range(cfg["layers"]):
        a = rms_norm(x, p[f"{i}.ln1"], cfg["eps"])
        q = F.linear(a, p[f"{i}.q"], p.get(f"{i}.qb")).view(b, s, nh, hd).transpose(1, 2)
        k = F.linear(a, p[f"{i}.k"], p.get(f"{i}.kb")).view(b, s, nkv, hd).transpose(1, 2)
        v = F.linear(a, p[f"{i}.v"], p.get(f"{i}.vb")).view(b, s, nkv, hd).transpose(1, 2)
        o = sdpa(rotate(q, cos, sin), rotate(k, cos, sin), v)
        x = x + F.linear(o.transpose(1, 2).reshape(b, s, nh * hd), p[f"{i}.o"])
        a = rms_norm(x, p[f"{i}.ln2"], cfg["eps"])
        m = F.silu(F.linear(a, p[f"{i}.gate"])) * F.linear(a, p[f"{i}.up"])
        x = x + F.linear(m, p[f"{i}.down"])
    return rms_norm(x, p["norm"], cfg["eps"])


class MasterAdamW:
    """fp32 master weights + AdamW for a dict of low-precision model tensors (the scheme of
    src/train/optim.rs: the optimizer owns fp32 weights, the model holds copies)."""

    def __init__(self, model, lr, max_grad_norm):
        self.model = list(model.values())
        for t in self.model:
            t.requires_grad_(True)
        self.master = [t.detach().float().clone().requires_grad_(True) for t in self.model]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.same = all(t.dtype == torch.float32 for t in self.model)
        if self.same:  # fp32 model (CPU check): the model tensors are the master weights
            self.master = self.model
        kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.fused = False
        if self.model[0].is_cuda:
            try:
                self.opt = torch.optim.AdamW(self.master, fused=True, **kw)
                self.fused = True
            except (RuntimeError, TypeError):
                self.opt = torch.optim.AdamW(self.master, foreach=True, **kw)
        else:
            self.opt = torch.optim.AdamW(self.master, **kw)
        self.max_grad_norm = max_grad_norm

    def zero_grad(self):
        for t in self.model:
            t.grad = None

    @torch.no_grad()
    def step(self):
        if not self.same:
            for m, t in zip(self.master, self.model):
                m.grad.copy_(t.grad)
        torch.nn.utils.clip_grad_norm_(self.master, self.max_grad_norm)
        self.opt.step()
        if not self.same:
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(self.model, self.master)
            else:
                for t, m in zip(self.model, self.master):
                    t.copy_(m)


def flow_head_init(d, width, depth, device, gen):
    """src/kernels/flow.rs init_params: U(+-1/sqrt(fan_in)), LN 1/0, biases 0, w_out x 0.1."""
    def u(*shape, bound):
        return ((torch.rand(*shape, generator=gen) * 2 - 1) * bound).to(device)

    first, hidden = (d + 2) ** -0.5, width ** -0.5
    p = {"w_cond": u(d, width, bound=first), "b_in": torch.zeros(width, device=device),
         "w_z": u(width, bound=first), "w_t": u(width, bound=first),
         "w_out": u(width, bound=0.1 * hidden), "b_out": torch.zeros(1, device=device)}
    for l in range(depth):
        p[f"gamma{l}"] = torch.ones(width, device=device)
        p[f"beta{l}"] = torch.zeros(width, device=device)
        if l > 0:
            p[f"W{l}"] = u(width, width, bound=hidden)
            p[f"b{l}"] = torch.zeros(width, device=device)
    return p


def flow_eval(p, depth, u, z, tau):
    """v(z, tau | u): u [n, W], z and tau [n, J] -> [n, J]."""
    w = u.shape[-1]
    h = u[:, None, :] + z[..., None] * p["w_z"] + tau[..., None] * p["w_t"]
    h = F.layer_norm(F.gelu(h, approximate="tanh"), (w,), p["gamma0"], p["beta0"], 1e-5)
    for l in range(1, depth):
        h = F.layer_norm(F.gelu(h @ p[f"W{l}"] + p[f"b{l}"], approximate="tanh"), (w,),
                         p[f"gamma{l}"], p[f"beta{l}"], 1e-5)
    return h @ p["w_out"] + p["b_out"]


def tail_moments(sorted_x, klo, khi):
    lo, hi = sorted_x[:, :klo], sorted_x[:, -khi:]
    return lo.mean(1), hi.mean(1), lo.var(1, unbiased=False), hi.var(1, unbiased=False)


def risk_loss(zhat, g, tok_w, alpha, beta):
    k = zhat.shape[1]
    klo = min(k, max(1, math.floor(alpha * k * (1 + 1e-6))))
    khi = min(k, max(1, math.floor(beta * k * (1 + 1e-6))))
    mp = tail_moments(torch.sort(zhat, 1).values, klo, khi)
    with torch.no_grad():
        mt = tail_moments(torch.sort(g, 1).values, klo, khi)
    row = ((mp[0] - mt[0]) ** 2 + (mp[1] - mt[1]) ** 2
           + F.relu(mp[2] - mt[2]) + F.relu(mt[3] - mp[3]))
    return (tok_w * row).sum()


def flow_critic_loss(v3, x, k, w_dcfm=1.0, w_bcfm=1.0, w_gc=0.5, alpha=0.1, beta=0.1):
    v_read, v_b, v_d = v3[:, :k], v3[:, k:2 * k], v3[:, 2 * k:]
    zhat = x["eps"] + v_read
    d = (x["dmask"][:, None] * (v_d - x["vel_d"]) ** 2).mean(1)
    b = ((v_b - x["vel_b"]) ** 2).mean(1)
    c = ((zhat - x["gc_target"]) ** 2).mean(1)
    tw = x["tok_w"]
    loss = (tw * (x["w_unc"] * (w_dcfm * d + w_bcfm * b) + w_gc * c)).sum()
    return loss + risk_loss(zhat, x["target"], tw, alpha, beta)


def actor_loss(logits, ids, x, clip_low=0.2, clip_high=0.2, ent_coef=0.0):
    logp = logits.float().log_softmax(-1)
    lp = torch.zeros_like(x["adv"])
    lp[:, :-1] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    if ent_coef == 0.0:
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
    else:
        ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(lp - x["old_lp"])
    s1 = -x["adv"] * ratio
    s2 = -x["adv"] * ratio.clamp(1 - clip_low, 1 + clip_high)
    w = x["tok_w_actor"]
    return (w * torch.maximum(s1, s2)).sum() - ent_coef * (w * ent).sum()


def value_loss(v, x, clip=0.2):
    vc = x["v_old"] + (v - x["v_old"]).clamp(-clip, clip)
    row = 0.5 * torch.maximum((v - x["ret"]) ** 2, (vc - x["ret"]) ** 2)
    return (x["tok_w"] * row).sum()


def make_inputs(cfg, b, s, prompt, k, device, gen):
    """Synthetic minibatch: ids, response mask and token weights, and the critic targets."""
    ids = torch.randint(0, cfg["vocab"], (b, s), generator=gen).to(device)
    mask = torch.zeros(b, s)
    mask[:, prompt - 1:s - 1] = 1.0
    tok_w = mask / mask.sum()
    adv = torch.randn(b, s, generator=gen) * mask
    adv = (adv - adv[mask > 0].mean()) / (adv[mask > 0].std() + 1e-8) * mask
    n = b * s
    eps = torch.tensor([math.sqrt(2) * torch.erfinv(torch.tensor(2 * (i + 0.5) / k - 1)).item()
                        for i in range(k)])
    eps = eps.repeat(n, 1)
    tau = torch.rand(n, k, generator=gen)
    ret = (torch.rand(n, 1, generator=gen) < 0.5).float() + 0.1 * torch.randn(n, k, generator=gen)
    z_prime = 0.5 + 0.3 * torch.randn(n, k, generator=gen)
    dmask = mask.clone()
    dmask[:, s - 2] = 0.0  # the last response token has no DCFM target
    x = {
        "ids": ids,
        "adv": adv, "tok_w_actor": tok_w, "tok_w": tok_w.reshape(n),
        "eps": eps, "target": ret, "gc_target": ret.mean(1, keepdim=True) + 0.2 * eps,
        "z": torch.cat([eps, tau * ret + (1 - tau) * eps, z_prime], 1),
        "tau": torch.cat([torch.zeros(n, k), tau, tau], 1),
        "vel_b": ret - eps, "vel_d": 0.1 * torch.randn(n, k, generator=gen),
        "w_unc": 0.5 + torch.rand(n, generator=gen), "dmask": dmask.reshape(n),
        "ret": ret.mean(1), "v_old": 0.5 + 0.1 * torch.randn(n, generator=gen),
    }
    return {key: v.to(device) for key, v in x.items()}


class Step:
    """The policy and one critic with their optimizers; `update()` is the timed work."""

    def __init__(self, algo, cfg, dtype, device, x, k, width, depth, gen):
        self.algo, self.cfg, self.x, self.k, self.depth = algo, cfg, x, k, depth
        s = x["ids"].shape[1]
        self.rope = rope_tables(cfg, s, device, dtype)
        dev_gen = torch.Generator(device=device).manual_seed(1)
        self.policy = init_decoder(cfg, device, dtype, dev_gen)
        self.critic = init_decoder(cfg, device, dtype, dev_gen)
        if algo == "dfpo":
            self.head = flow_head_init(cfg["hidden"], width, depth, device, gen)
        else:
            self.head = {"vw": torch.zeros(1, cfg["hidden"], device=device, dtype=dtype),
                         "vb": torch.zeros(1, device=device, dtype=dtype)}
        self.actor_opt = MasterAdamW(self.policy, 2e-4, 1.0)
        self.critic_opt = MasterAdamW({**self.critic, **self.head}, 1e-3, 1.0)
        with torch.no_grad():  # rollout-time log-probs of the initial weights
            logits = F.linear(trunk(self.policy, cfg, x["ids"], self.rope), self.policy["embed"])
            lp = logits.float().log_softmax(-1)[:, :-1].gather(-1, x["ids"][:, 1:, None])
            old = torch.zeros_like(x["adv"])
            old[:, :-1] = lp.squeeze(-1)
            x["old_lp"] = old

    def update(self):
        cfg, x = self.cfg, self.x
        self.actor_opt.zero_grad()
        logits = F.linear(trunk(self.policy, cfg, x["ids"], self.rope), self.policy["embed"])
        actor_loss(logits, x["ids"], x).backward()
        del logits
        self.actor_opt.step()
        self.critic_opt.zero_grad()
        h = trunk(self.critic, cfg, x["ids"], self.rope)
        h = h.reshape(-1, h.shape[-1])
        if self.algo == "dfpo":
            p = self.head
            u = h.float() @ p["w_cond"] + p["b_in"]
            v3 = flow_eval(p, self.depth, u, x["z"], x["tau"])
            loss = flow_critic_loss(v3, x, self.k)
        else:
            v = F.linear(h, self.head["vw"], self.head["vb"]).float().squeeze(-1)
            loss = value_loss(v, x)
        loss.backward()
        self.critic_opt.step()


def time_updates(step, device, warmup, reps):
    for _ in range(warmup):
        step.update()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step.update()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            step.update()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny model's shape in fp32 (CPU check)")
    ap.add_argument("--batch", type=int, help="rows B (default 8; --tiny 32)")
    ap.add_argument("--seq", type=int, help="tokens per row S (default 512; --tiny 15)")
    ap.add_argument("--prompt", type=int, help="prompt tokens per row (default 64; --tiny 7)")
    ap.add_argument("--k", type=int, default=16, help="value samples per token")
    ap.add_argument("--width", type=int, default=64, help="flow head width")
    ap.add_argument("--depth", type=int, default=2, help="flow head hidden layers")
    ap.add_argument("--dtype", help="model dtype (default bfloat16; --tiny float32)")
    ap.add_argument("--algos", default="dfpo,ppo")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default="torch_dfpo_step.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    cfg = tiny() if a.tiny else qwen05b()
    b = a.batch or (32 if a.tiny else 8)
    s = a.seq or (15 if a.tiny else 512)
    prompt = a.prompt or (7 if a.tiny else 64)
    if not 2 <= prompt < s:
        ap.error(f"--prompt {prompt} must be in 2 .. S - 1 = {s - 1}")
    dtype = getattr(torch, a.dtype or ("float32" if a.tiny else "bfloat16"))
    gen = torch.Generator().manual_seed(0)
    x = make_inputs(cfg, b, s, prompt, a.k, a.device, gen)
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
           "shape": "tiny" if a.tiny else "qwen2-0.5b", "B": b, "S": s, "prompt": prompt,
           "K": a.k, "width": a.width, "depth": a.depth, "threads": torch.get_num_threads()}
    for algo in [t.strip() for t in a.algos.split(",") if t.strip()]:
        if algo not in ("dfpo", "ppo"):
            ap.error(f"--algos: unknown algo {algo!r} (dfpo, ppo)")
        step = Step(algo, cfg, dtype, a.device, dict(x), a.k, a.width, a.depth, gen)
        t = time_updates(step, a.device, a.warmup, a.reps)
        r = {"ms": t * 1e3, "tokens_per_s": b * s / t, "fused_adamw": step.actor_opt.fused}
        res[algo] = r
        print(json.dumps({"bench": "torch_dfpo_step", "algo": algo, **r,
                          **{k: res[k] for k in ("device", "dtype", "shape", "B", "S", "K")}}),
              flush=True)
        del step
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if "dfpo" in res and "ppo" in res:
        res["dfpo_over_ppo"] = res["dfpo"]["ms"] / res["ppo"]["ms"]
        print(json.dumps({"bench": "torch_dfpo_step", "dfpo_over_ppo_time": res["dfpo_over_ppo"]}))
    with open(a.out, "w") as f:
        json.dump({"torch_dfpo_step": res}, f, indent=1)


if __name__ == "__main__":
    main()
