"""Benchmarks that print figures: (a) the fused attention reward against the naive one, (b) rollout
throughput of lvr.generate against transformers' generate(num_return_sequences=G), (c) VLPO vs masked
latents, (d) the peak memory of a GRPO step at real scale, (e) fp32 vs bf16 weights at small learning rates.

(a) One attention layer at sequence lengths 256..2048, on small-vl's shape (4 heads, 2 KV heads, head dim
32, 8 rollouts) and on a Qwen2.5-VL-3B-like shape (16 heads, 2 KV heads, head dim 128, 4 rollouts), random
q/k. 8 latent keys, the last 32 positions as queries. naive = softmax(QK^T/sqrt(d)) over the whole
B x H x L x L matrix in fp32, as eager attention with output_attentions=True forms it for every layer;
fused = reward.attention_share. Each cell runs in a fresh process: time is the median of 3 runs after a
warm-up; peak memory is the growth of the process's peak RSS over the first call (CPU) or torch's peak
allocation above what was allocated before the call (CUDA).
(b) The same prompts and sampling settings, spans forbidden so both decode text only, both stopping at
EOS; tokens/s counts each reply's tokens up to its first EOS (included; ours: the rollout's mask), over
7 interleaved repeats, with the median, the range and the per-repeat ratio. Ours prefills each prompt
once for its G rollouts; generate repeats the prompt (image included) G times.

    python bench.py                  # both tables (CPU: a few minutes)
    python bench.py --part reward --lengths 256 1024
    python bench.py --compile        # CUDA: torch.compile the fused reward
    python bench.py --part vlpo      # (c) VLPO against masked latent slots, from the LVR SFT checkpoint
    python bench.py --part memory    # (d) peak memory of a GRPO step of Qwen2.5-VL-3B/7B (CPU: ~25 min on 2 busy cores)
    python bench.py --part dtype     # (e) what bf16 weights lose at lr 1e-6 (LVR SFT checkpoint; --model DIR)
    python bench.py --part rollout --profile   # (b') the decode step per decoder (bench_rollout.py; also --part gap, grpo)

(d) Qwen2.5-VL-3B / 7B shapes from their config.json, random weights, one train_rl.grpo_step at the defaults
with EOS suppressed (completions of exactly 512 tokens). CUDA: full depth, torch.cuda.max_memory_allocated.
CPU: 1 and 2 decoder layers at real widths, extrapolated (memory_table, estimate).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import data
import parallel as P
import rundir

SHAPES = {"small-vl": dict(B=8, H=4, Hkv=2, d=32), "qwen2.5-vl-3b": dict(B=4, H=16, Hkv=2, d=128)}


def naive_share(q, k, query_mask, key_mask):
    B, H, L, d = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1)
    s = (q.float() @ kk.float().transpose(-1, -2)) / d ** 0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    attn = torch.softmax(s, -1)
    import reward
    return reward.attention_share_naive(attn, query_mask, key_mask)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_process(flags: list[str], env: dict | None = None) -> dict:
    """Run `python bench.py FLAGS` (one benchmark cell) in a fresh process; its last stdout line, a JSON dict."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *flags], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"bench cell {' '.join(flags)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_cell(method: str, shape: str, L: int, device: str, compile_: bool) -> dict:
    """Runs in its own process (see main)."""
    import reward
    torch.manual_seed(0)
    s = SHAPES[shape]
    q = torch.randn(s["B"], s["H"], L, s["d"], device=device)
    k = torch.randn(s["B"], s["Hkv"], L, s["d"], device=device)
    key_mask = torch.zeros(s["B"], L, dtype=torch.bool, device=device)
    key_mask[:, L - 48:L - 40] = True
    query_mask = torch.zeros_like(key_mask)
    query_mask[:, L - 32:] = True
    attn_mask = torch.ones(s["B"], L, dtype=torch.long, device=device)
    fused = torch.compile(reward.attention_share) if compile_ else reward.attention_share
    fn = (lambda: naive_share(q, k, query_mask, key_mask)) if method == "naive" else \
        (lambda: fused(q, k, query_mask, key_mask, attn_mask))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base = rss_bytes()  # CPU: peak RSS growth of the first call (later calls may reuse freed pages)
    fn()  # warm-up (and compile)
    sync()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    return {"ms": 1000 * statistics.median(times), "peak_mb": max(0, peak - base) / 2 ** 20, "value": out.mean().item()}


def reward_table(lengths, device, compile_):
    print(f"\n(a) attention reward, one layer, {device}" + (" + torch.compile" if compile_ else ""))
    print("| shape | L | naive ms | fused ms | speed-up | naive peak MB | fused peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for L in lengths:
            cells = {}
            for method in ("naive", "fused"):
                cells[method] = fresh_process(["--cell", method, shape, str(L), "--device", device] + ["--compile"] * compile_)
            n, f = cells["naive"], cells["fused"]
            assert abs(n["value"] - f["value"]) < 1e-4, (shape, L, n["value"], f["value"])
            print(f"| {shape} | {L} | {n['ms']:.1f} | {f['ms']:.1f} | {n['ms'] / f['ms']:.1f}x | {n['peak_mb']:.1f} | "
                  f"{f['peak_mb']:.1f} | {n['peak_mb'] / max(f['peak_mb'], 0.1):.0f}x |", flush=True)


def tokens_until_eos(seqs: torch.Tensor, eos: list[int]) -> int:
    """Generated tokens per row up to and including the first EOS (all of the row without one), summed:
    a pad id sampled as text mid-reply still counts."""
    hit = torch.isin(seqs, torch.tensor(eos, device=seqs.device))
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, seqs.shape[1])
    return int(first.sum())


def rollout_table(device, model_dir, G=8, prompts=8, new_tokens=32, repeats=7):
    """model_dir: a checkpoint, or "3b" / "7b": a Qwen2.5-VL-shaped model with random weights (bf16 on CUDA)."""
    import lvr
    import model as M
    if model_dir in QWEN:
        model, tok = qwen_model(model_dir, device=device), qwen_tok()
        model.to(torch.bfloat16 if device == "cuda" else torch.float32)
        model.image_processor = M.image_processor(model.config.vision_config)
    else:
        model, tok = M.load_model(model_dir, device=device)
    model.to(device).eval()
    samples = data.make_split("test", prompts)
    prompt = {k: v.to(device) for k, v in M.encode(model, tok, samples).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start, eos = model.config.lvr_start_id, lvr.eos_ids(model, tok)

    def ours(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        r = lvr.generate(model, tok, prompt, G=G, max_new_tokens=new_tokens, temperature=1.0, generator=g,
                         force=-torch.ones(prompts * G, dtype=torch.long))
        return int(r.mask.sum())

    def theirs(seed):
        torch.manual_seed(seed)
        out = model.generate(**prompt, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                             num_return_sequences=G, suppress_tokens=[start], eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        return tokens_until_eos(out[:, prompt["input_ids"].shape[1]:], eos)

    print(f"\n(b) rollouts: {prompts} prompts x G={G}, up to {new_tokens} new tokens, {device}, "
          f"model {model_dir or 'small-vl (random init)'}; {repeats} interleaved repeats after a warm-up")
    runs = {"lvr.generate (one prefill per prompt)": ours, f"generate(num_return_sequences={G})": theirs}
    rates = {name: [] for name in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            fn(0)
        for seed in range(repeats):  # interleaved, so a slow spell of the machine hits both alike
            for name, fn in runs.items():
                sync()
                t0 = time.perf_counter()
                n = fn(seed)
                sync()
                rates[name].append(n / (time.perf_counter() - t0))
    print("| decoder | median tokens/s | min | max | spread (max-min)/median |")
    print("|---|---|---|---|---|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:.0f} | {min(r):.0f} | {max(r):.0f} | {(max(r) - min(r)) / med:.0%} |")
    ratios = [a / b for a, b in zip(*rates.values())]
    print(f"ratio per repeat: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}x-{max(ratios):.2f}x")


def grpo_steps(model_dir, argv, device, steps=1, bf16_start=False):
    """`steps` GRPO steps (train_rl.grpo_step with train_rl's options `argv`, data and seeds as in a run)
    from `model_dir`, vision tower frozen: (the trained parameters by name, their start values, the last
    log row). bf16_start: the weights first rounded to bf16, so fp32 and bf16 runs start alike."""
    import datafiles
    import model as M
    import reward
    import train_rl
    args = train_rl.parse_args(argv + ["--device", device])
    model, tok = M.load_model(model_dir, torch.float32, device)
    train_rl.default_micro_batch(args, model)
    if bf16_start:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    model.to(M.DTYPES[args.param_dtype]).requires_grad_(True)
    model.model.visual.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=args.lr, weight_decay=0.0)
    torch.manual_seed(0)
    stream, penalty = datafiles.Stream(args), reward.LengthPenalty()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        row = train_rl.grpo_step(args, model, tok, None, opt, [stream[(1 << 30) + step * args.prompts + i]
                                                                for i in range(args.prompts)], step, penalty)
    return named, start, row


def vlpo_table(device, model_dir, epochs=(1, 2, 4), steps=1):
    """What VLPO changes against masking the latent slots: the same GRPO step (same rollouts: the same
    start, seeds and data) with --latent-logp vlpo and mask. The last epoch's gradients compared by norm
    (dapo's normaliser counts the latent slots under vlpo only) and by direction (1 - cosine: what the
    Gaussian log-densities add), and the parameter updates (Adam divides the scale out)."""
    print(f"\n(c) VLPO vs masked latent slots: {steps} GRPO step(s) from {model_dir}, {device}, defaults otherwise")
    print("| PPO epochs | latent rate | grad norm vlpo / mask | 1 - cos(grad vlpo, grad mask) | update diff / update |")
    print("|---|---|---|---|---|")
    for e in epochs:
        out = {}
        for mode in ("vlpo", "mask"):
            named, start, row = grpo_steps(model_dir, ["--latent-logp", mode, "--ppo-epochs", str(e)], device, steps)
            out[mode] = (torch.cat([p.grad.flatten() for _, p in named]),
                         torch.cat([(p.detach() - start[n]).flatten() for n, p in named]), row["latent_rate"])
        (gv, uv, rate), (gm, um, _) = out["vlpo"], out["mask"]
        cos = torch.nn.functional.cosine_similarity(gv.double(), gm.double(), dim=0)
        print(f"| {e} | {rate:.2f} | {gv.norm() / gm.norm():.3f} | {1 - cos:.1e} | {(uv - um).norm() / um.norm():.1e} |",
              flush=True)


# ------------------------------------------------------------------------- (d) memory of a GRPO step
QWEN = {  # Qwen2.5-VL-{3B,7B}-Instruct config.json (text part; the vision tower is the same for both)
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,  # tests
                 intermediate_size=128, vocab_size=151936, tie_word_embeddings=True)}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
GB = 1e9


def qwen_tok():
    """The released Qwen tokenizer layout (real special ids, LVR tokens, chat template), as the tests build it."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from conftest import QWEN_TEMPLATE, qwen_tokenizer
    tok = qwen_tokenizer(lvr=True)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def default_model() -> str:
    """small-vl's LVR SFT checkpoint of the default task: the one trained here, else the shipped one."""
    here = os.path.join(rundir.RUNS, "small-vl-sft", rundir.CKPT)
    return here if os.path.isdir(here) else rundir.shipped_sft(data.DEFAULT_TASK)


def qwen_model(shape: str, layers: int | None = None, vision_depth: int | None = None, meta: bool = False, device="cpu"):
    """A Qwen2.5-VL model of this shape with random weights (`layers` / `vision_depth` decoder layers /
    vision blocks instead of the real ones) and the LVR token ids; meta: no storage (parameter counts)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    text = {**QWEN[shape], "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    if shape == "tiny":
        text["rope_parameters"]["mrope_section"] = [4, 6, 6]
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = {**VISION, "out_hidden_size": text["hidden_size"], "depth": vision_depth or VISION["depth"]}
    if shape == "tiny":
        vision.update(hidden_size=32, intermediate_size=64, num_heads=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=text["tie_word_embeddings"])
    for i, key in enumerate(("lvr_start_id", "lvr_id", "lvr_latent_end_id", "lvr_end_id")):
        setattr(cfg, key, 151665 + i)
    with torch.device("meta" if meta else device):
        return Qwen2_5_VLForConditionalGeneration(cfg)


def static_bytes(shape: str, param_dtype: str) -> dict:
    """Exact bytes of what lives through a step at full depth: weights (all), gradients and AdamW's two
    states (the trained text model; the vision tower is frozen), in the parameter dtype."""
    model = qwen_model(shape, meta=True)
    b = 4 if param_dtype == "fp32" else 2
    total = sum(p.numel() for p in model.parameters())
    trained = total - sum(p.numel() for p in model.model.visual.parameters())
    return {"params": total, "trained": trained, "weights": b * total, "grads": b * trained, "adam": 2 * b * trained}


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # the peak RSS starts again from the current RSS
            f.write("5")


def peak_bytes(device) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024


def allocator_counts(device, since: tuple | None = None) -> tuple[int, int] | None:
    """The CUDA caching allocator's (retries, cudaMalloc calls) so far, or since an earlier count. A retry frees
    every cached block (a device-wide sync) and allocates again: a cache that grows every step can force
    them. None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    s = torch.cuda.memory_stats(device)
    now = s.get("num_alloc_retries", 0), s.get("num_device_alloc", 0)
    return now if since is None else tuple(b - a for a, b in zip(since, now))


def memory_cell(shape, layers, vision_depth, prompts, group, image_px, new_tokens, micro_batch, grad_ckpt, param_dtype,
                device, freeze_embeddings=False, cache=None) -> dict:
    """Runs in its own process: one GRPO step (train_rl.grpo_step: rollout, scoring, backward, AdamW) of a
    random model at this shape, fp32 or bf16 weights, bf16 autocast, completions forced to `new_tokens`.
    The step starts in the steady state of training: AdamW's state alive, no gradients.
    Returns per phase (rollout, scoring, update) the peak above the memory held just before the step
    (CPU: peak RSS, reset per phase via /proc/self/clear_refs) or, on CUDA, the absolute peak allocated;
    on CUDA also the allocator's retries and cudaMalloc calls during the rollout (allocator_counts)."""
    import lvr
    import reward
    import train_rl
    import model as M
    args = train_rl.parse_args(["--model", "bench", "--prompts", str(prompts), "--group", str(group), "--lr", "1e-6",
                                "--max-new-tokens", str(new_tokens), "--micro-batch", str(micro_batch), "--dtype", "bf16",
                                "--param-dtype", param_dtype, "--device", device] + ["--grad-ckpt"] * grad_ckpt
                               + (["--cache", cache] if cache else []))
    torch.manual_seed(0)
    tok = qwen_tok()
    model = qwen_model(shape, layers, vision_depth, device=device).to(M.DTYPES[param_dtype])
    model.image_processor = M.image_processor(model.config.vision_config)
    model.requires_grad_(True)
    model.model.visual.requires_grad_(False)
    if freeze_embeddings:  # CPU, 7B: their gradients and AdamW state are counted analytically instead
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    if grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = P.make_optimizer(trained, args.lr)  # as the trainers make it (fused on CUDA)
    for p in trained:  # steady state: AdamW's state (the trainers free the gradients after each step)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    lvr.eos_ids = lambda model, tok: []  # no EOS: every completion runs to new_tokens (this process only)
    samples = data.make_split("test", prompts, size=image_px)
    peaks, base, counts = {}, 0 if device == "cuda" else rss_bytes(), {}

    def phase(name, fn):
        def run(*a, **k):
            reset_peak(device)
            c0 = allocator_counts(device)
            out = fn(*a, **k)
            peaks[name] = peak_bytes(device) - base
            counts[name] = allocator_counts(device, since=c0)
            reset_peak(device)
            return out
        return run
    train_rl.rollout, train_rl.score_all = phase("rollout", train_rl.rollout), phase("scoring", train_rl.score_all)
    score = train_rl.score

    def scored(*a, **k):  # what a micro-batch's forward keeps for its backward: the RSS it adds
        before = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
        out = score(*a, **k)
        if torch.is_grad_enabled():
            after = rss_bytes() if device == "cpu" else torch.cuda.memory_allocated()
            peaks["saved"] = max(peaks.get("saved", 0), after - before)
        return out
    train_rl.score = scored
    row = train_rl.grpo_step(args, model, tok, None, opt, samples, 0, reward.LengthPenalty())
    peaks["update"] = peak_bytes(device) - base
    prompt_len = M.encode(model, tok, samples[:1])["input_ids"].shape[1]
    return {**peaks, "base": base, "length": row["length"], "prompt_len": prompt_len, "rollout_allocs": counts["rollout"],
            **{k: row[k] for k in ("t_rollout", "t_decode", "decode_steps", "t_score", "t_update")}}


def run_cell(**kw) -> dict:
    """memory_cell in a fresh process; big allocations go back to the OS when freed, so RSS follows them."""
    return fresh_process(["--memory-cell", json.dumps(kw)], {"MALLOC_MMAP_THRESHOLD_": "65536"})


FULL = dict(prompts=8, group=8, image_px=896, new_tokens=512)  # the defaults: 8 x 8 rollouts, 1024 image tokens
CPU = dict(prompts=1, group=4, image_px=112, new_tokens=16, vision_depth=1)  # a CPU cell: 4 short rollouts, 16 image tokens
CPU_CONFIGS = {"3b": [(4, False, "fp32"), (4, True, "fp32"), (4, True, "bf16")],
               "7b": [(4, False, "fp32"), (4, True, "fp32"), (4, True, "bf16")]}  # (micro-batch, grad-ckpt, param dtype), at 1 and 2 layers


def verdict(gb: float) -> str:
    return "fits 80 GB" if gb <= 80 else "fits 141 GB" if gb <= 141 else f"needs {gb:.0f} GB"


def layer_params(shape) -> int:
    return sum(p.numel() for p in qwen_model(shape, layers=1, vision_depth=1, meta=True).model.language_model.layers[0].parameters())


def estimate(shape, micro_batch, c1, c2, layer_act=0.0) -> dict:
    """A full-depth step at the defaults from two CPU cells at 1 and 2 decoder layers (same settings).
    Exact: weights, gradients and AdamW state (gradients only from the update's backward on: the trainers
    free them after each step), the KV
    cache of the 64 rollouts (keys fp32 after RoPE when the residual stream is fp32, values bf16), autocast's
    bf16 copies of fp32 weights (cached for a whole rollout / scoring pass, kept by the graph until backward).
    Linear in depth: what a micro-batch's forward keeps for backward per token per layer (the 2-layer cell
    less the 1-layer one; --grad-ckpt: plus one layer's activations, `layer_act`, recomputed in backward).
    Linear in tokens: the cells' other growth in what backward keeps and the prefill's (rollout). The
    transients beyond (lm_head gradient, AdamW temporaries) are added as measured, the fp32 logits chunk
    grown with the micro-batch: an upper estimate, as the parts' peaks need not fall at one instant. On CUDA
    the trainers use fused AdamW, which makes no temporary of the trained weights' size."""
    c, fp32, frozen = QWEN[shape], c1["param_dtype"] == "fp32", c1.get("freeze_embeddings", False)
    D, V, H = c["num_hidden_layers"], c["vocab_size"], c["hidden_size"]
    s = static_bytes(shape, c1["param_dtype"])
    kv_b = H // c["num_attention_heads"] * c["num_key_value_heads"] * ((4 + 2) if fp32 else 4)  # per token per layer
    L0c, text = c1["prompt_len"], c1["prompt_len"] - (c1["image_px"] // 28) ** 2  # prompt text: this tokenizer's
    L0 = text + (FULL["image_px"] // 28) ** 2
    L, Lc = L0 + FULL["new_tokens"], L0c + c1["new_tokens"]
    copy, head = (2 * layer_params(shape), 2 * V * H) if fp32 else (0, 0)  # autocast's bf16 copies: a layer, lm_head
    head_c = 0 if frozen else head  # a frozen lm_head: cast anew at each use (not cached, not kept), no gradient made
    grad_head = V * H * (6 if fp32 else 2) if frozen else 0
    prompt_tokens = FULL["prompts"] * L0 / (c1["prompts"] * L0c)
    r_rest = c1["rollout"] - copy - head - c1["prompts"] * c1["group"] * Lc * kv_b
    rollout = D * copy + head + FULL["prompts"] * FULL["group"] * L * D * kv_b + max(0, r_rest) * prompt_tokens
    tokens = micro_batch * L / (c1["micro_batch"] * Lc)
    per_tok = max(0, c2["saved"] - c1["saved"] - copy) / (c1["micro_batch"] * Lc)
    s_rest = c1["saved"] - copy - head_c - per_tok * c1["micro_batch"] * Lc
    saved = D * (copy + per_tok * micro_batch * L) + head + max(0, s_rest) * tokens
    logits = 3 * 64 * V * 4 * (micro_batch - c1["micro_batch"])  # token_logps' fp32 chunk, its exp and its gradient
    one_layer = (layer_act or per_tok) * micro_batch * L  # at most one layer's activations at a time without grad
    scoring = D * copy + head + max(0, c1["scoring"] - copy - head + logits) + one_layer
    recompute = layer_act * micro_batch * L if c1["grad_ckpt"] else 0
    update = saved + max(0, c1["update"] - c1["saved"] + logits) + grad_head + recompute
    static = s["weights"] + s["adam"]  # + the gradients, alive from the update's backward to the step
    return {"peak": static + max(rollout, scoring, s["grads"] + update), "per_tok": per_tok,
            "update": static + s["grads"] + update}


def memory_table(device, shapes=("3b", "7b"), micro_batches=(1, 2, 4, 8, 16), configs=None, cache=None) -> list[tuple]:
    """(d) the peak memory of one GRPO step. CUDA: measured at full depth and the defaults, a fresh process
    per cell. CPU: measured at real widths with 1 and 2 decoder layers, 1 vision block and 4 short rollouts
    (table 1), then estimated at full scale (estimate; table 2); `cache`: a JSON file of measured cells, reused
    and extended. Returns table 2's rows."""
    print(f"\n(d) memory of one GRPO step (rollout + scoring + backward + AdamW) at P={FULL['prompts']} G={FULL['group']}, "
          f"{(FULL['image_px'] // 28) ** 2} image tokens, completions forced to {FULL['new_tokens']} tokens, bf16 autocast, {device}")
    rows, configs, est, acts = [], configs or CPU_CONFIGS, {}, {}
    if device == "cuda":
        for shape in shapes:
            for pd in ("fp32", "bf16"):
                for ckpt in (False, True):
                    for mb in micro_batches:
                        r = run_cell(shape=shape, layers=None, micro_batch=mb, grad_ckpt=ckpt, param_dtype=pd, device=device,
                                     vision_depth=None, **FULL)
                        gb = None if r.get("oom") else max(r["rollout"], r["scoring"], r["update"]) / GB
                        rows.append((shape, mb, ckpt, pd, gb, "measured, full depth" if gb else "out of memory"))
    else:
        print("\nmeasured on this CPU (real widths, 1 vision block; GB above what the step starts with, which holds "
              "the weights, the last step's gradients and AdamW's state; 7B: embeddings frozen to fit in RAM):")
        print("| model | layers | rollouts x tokens | micro-batch | grad-ckpt | param dtype | held before | rollout peak | "
              "scoring peak | update peak | kept for backward | per token per layer |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        cells = json.load(open(cache)) if cache and os.path.exists(cache) else {}
        for shape in shapes:
            for mb, ckpt, pd in configs[shape]:  # a config without --grad-ckpt first: its activations per layer
                kw = dict(shape=shape, micro_batch=mb, grad_ckpt=ckpt, param_dtype=pd, device=device,
                          freeze_embeddings=shape == "7b", **CPU)
                for d in (1, 2):
                    key = json.dumps({**kw, "layers": d}, sort_keys=True)
                    cells[key] = cells.get(key) or {**kw, "layers": d, **run_cell(layers=d, **kw)}
                    if cache:
                        json.dump(cells, open(cache, "w"), indent=1)
                c1, c2 = (cells[json.dumps({**kw, "layers": d}, sort_keys=True)] for d in (1, 2))
                per_tok = estimate(shape, mb, c1, c2)["per_tok"]
                if not ckpt:
                    acts[shape] = per_tok
                for d, r in ((1, c1), (2, c2)):
                    print(f"| {shape} | {d} | {r['group']} x {r['prompt_len']}+{r['new_tokens']} | {mb} | {'yes' if ckpt else 'no'} | "
                          f"{pd} | {r['base'] / GB:.2f} | {r['rollout'] / GB:.2f} | {r['scoring'] / GB:.2f} | {r['update'] / GB:.2f} | "
                          f"{r['saved'] / GB:.3f} | {per_tok / 1024:.0f} KiB |", flush=True)
                for m in micro_batches:  # from the cells of the nearest measured micro-batch
                    key, near = (shape, m, ckpt, pd), abs(m - mb)
                    if key not in est or near < est[key][0]:
                        est[key] = (near, estimate(shape, m, c1, c2, acts.get(shape, 0.0))["peak"] / GB, f"extrapolated (cells: 1-2 layers, micro-batch {mb})")
        rows = [(*k, gb, how) for k, (_, gb, how) in est.items()]
    print("\n| model | micro-batch | grad-ckpt | param dtype | peak GB | how | one GPU |")
    print("|---|---|---|---|---|---|---|")
    for shape, mb, ckpt, pd, gb, how in sorted(rows, key=lambda r: (r[0], r[3], r[2], r[1])):
        print(f"| Qwen2.5-VL-{shape.upper()} | {mb} | {'yes' if ckpt else 'no'} | {pd} | {'-' if gb is None else f'{gb:.1f}'} | "
              f"{how} | {verdict(gb) if gb is not None else 'needs more than this GPU'} |")
    per_rank_table(rows)
    return rows


def per_rank_table(rows, shape="7b", mb=4):
    """Per rank under torchrun (train_rl.py --zero / --fsdp, N ranks): the one-GPU peak of `shape` (fp32 master
    weights, --grad-ckpt, micro-batch `mb`) less the static state each rank no longer holds. An upper
    estimate: each rank's share of the rollouts (and their KV cache) is not taken off."""
    one = next((gb for r_shape, r_mb, ckpt, pd, gb, _ in rows if (r_shape, r_mb, ckpt, pd) == (shape, mb, True, "fp32")), None)
    if one is None:
        return
    s = static_bytes(shape, "fp32")
    print(f"\nper rank, Qwen2.5-VL-{shape.upper()}, fp32 master weights, --grad-ckpt, micro-batch {mb} (from the row above):")
    print("| ranks | --zero (AdamW state sharded) | --fsdp (weights, gradients, AdamW state sharded) |")
    print("|---|---|---|")
    for n in (2, 4):
        zero = one - s["adam"] * (1 - 1 / n) / GB
        fsdp = one - (s["weights"] + s["grads"] + s["adam"]) * (1 - 1 / n) / GB
        print(f"| {n} | {zero:.1f} GB ({verdict(zero)}) | {fsdp:.1f} GB ({verdict(fsdp)}) |")


def dtype_table(device, model_dir, lrs=(1e-6, 5e-5)):
    """(e) What bf16 weights lose: one GRPO step (train_rl.grpo_step, bf16 autocast) from `model_dir`, whose
    weights are first rounded to bf16 so that both runs start from the same values and compute the same
    forward: --param-dtype fp32 (fp32 master weights and AdamW state) against bf16 (weights, gradients and
    AdamW state in bf16). Share of the trained weights that changed; update norm relative to fp32's."""
    print(f"\n(e) fp32 master weights vs bf16 weights: one GRPO step from {model_dir}, bf16 autocast, {device}")
    print("| lr | param dtype | weights changed | update norm / fp32's | (update - fp32's) norm / fp32's |")
    print("|---|---|---|---|---|")
    for lr in lrs:
        out = {}
        for pd in ("fp32", "bf16"):
            named, start, _ = grpo_steps(model_dir, ["--lr", str(lr), "--warmup", "1", "--param-dtype", pd, "--dtype", "bf16"],
                                         device, bf16_start=True)
            out[pd] = torch.cat([(p.detach().float() - start[n].float()).flatten() for n, p in named])
            changed = sum(int((p.detach() != start[n]).sum()) for n, p in named) / sum(p.numel() for _, p in named)
            ref = out["fp32"].norm()
            print(f"| {lr:g} | {pd} | {changed:.2%} | {out[pd].norm() / ref:.3f} | {(out[pd] - out['fp32']).norm() / ref:.3f} |", flush=True)
    w = 0.02
    spacing = 2.0 ** (math.floor(math.log2(w)) - 7)  # bf16 keeps 8 significant bits
    print(f"analytic, |w| = {w}: bf16 spacing {spacing:.3g} (fp32: {2.0 ** (math.floor(math.log2(w)) - 23):.3g}); "
          f"AdamW's first steps move a weight by about lr: 1e-6 is {1e-6 / spacing:.4f} of the spacing, "
          f"so round-to-nearest drops every step below half of it ({spacing / 2:.3g}), i.e. lr < {spacing / 2:.3g}")


def grpo_config(s: str) -> tuple[str, bool, int]:
    """argparse type of --configs: PARAM_DTYPE,ckpt|no,MICRO_BATCH (bf16,ckpt,4) as (dtype, grad-ckpt, micro-batch)."""
    d, c, m = (s.split(",") + ["", "", ""])[:3]
    if s.count(",") != 2 or d not in ("bf16", "fp32") or c not in ("ckpt", "no") or not m.isdigit() or int(m) < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not PARAM_DTYPE,ckpt|no,MICRO_BATCH (bf16 or fp32, e.g. fp32,ckpt,4)")
    return d, c == "ckpt", int(m)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "reward", "rollout", "vlpo", "memory", "dtype", "gap", "grpo"],
                   help="which table (vlpo: what VLPO changes against masked latents; needs --model or an SFT run; gap: "
                        "the dynamic decoder's step from the short bench's setting to the GRPO step's; grpo: one GRPO step "
                        "per decoder and configuration)")
    p.add_argument("--profile", action="store_true", help="--part rollout: the decode step profiled per decoder (b')")
    p.add_argument("--caches", nargs="+", default=["dynamic", "static", "graph", "hf"],
                   choices=["dynamic", "static", "graph", "hf"], help="--profile / grpo: decoders (hf: transformers' generate)")
    p.add_argument("--contexts", type=rundir.at_least(1), nargs="+", default=[1100, 1600], help="--profile / gap: prompt lengths (about)")
    p.add_argument("--batches", type=rundir.at_least(1), nargs="+", default=[64, 128], help="--profile / gap (the first): rollouts decoded together")
    p.add_argument("--new-tokens", type=rundir.at_least(2), default=32, help="--profile / gap: decode steps measured")
    p.add_argument("--repeats", type=rundir.at_least(1), default=3, help="--profile: timed runs per cell (median)")
    p.add_argument("--no-split", action="store_true", help="--profile: no torch.profiler run (time and syncs only)")
    p.add_argument("--configs", nargs="+", type=grpo_config, default=[("bf16", True, 4), ("fp32", True, 4)],
                   help="--part grpo: PARAM_DTYPE,ckpt|no,MICRO_BATCH per configuration (default bf16,ckpt,4 fp32,ckpt,4)")
    p.add_argument("--lengths", type=rundir.at_least(1), nargs="+", default=[256, 512, 1024, 2048], help="sequence lengths for (a)")
    p.add_argument("--model", help="checkpoint for rollout / vlpo / dtype (default: runs/small-vl-sft/checkpoint, else the "
                                   "shipped checkpoints/small-vl-hard-sft); rollout also takes 3b or 7b (random Qwen2.5-VL weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the fused reward (CUDA); with --profile: the "
                                                           "static and graph decoders' step")
    p.add_argument("--cell", nargs=3, metavar=("METHOD", "SHAPE", "L"), help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="+", default=["3b", "7b"], choices=["3b", "7b", "tiny"],
                   help="--part memory / grpo (the first): model shapes")
    p.add_argument("--micro-batches", type=rundir.at_least(1), nargs="+", default=[1, 2, 4, 8, 16], help="--part memory: micro-batch sizes")
    p.add_argument("--cells", help="--part memory on CPU: a JSON file keeping the measured cells, reused when present")
    p.add_argument("--memory-cell", help=argparse.SUPPRESS)
    a = p.parse_args()
    import bench_rollout  # (b'), gap and grpo: the decode step profiled
    if a.memory_cell:
        try:
            print(json.dumps(memory_cell(**json.loads(a.memory_cell))))
        except torch.OutOfMemoryError:
            print(json.dumps({"oom": True}))
        return
    if a.cell:
        print(json.dumps(one_cell(a.cell[0], a.cell[1], int(a.cell[2]), a.device, a.compile)))
        return
    if a.part in ("all", "reward"):
        reward_table(a.lengths, a.device, a.compile)
    if a.part == "rollout" and a.profile:
        bench_rollout.rollout_profile(a.device, a.model or default_model(), a.caches, a.contexts, a.batches, a.new_tokens,
                        repeats=a.repeats, split=not a.no_split, compile_=a.compile)
    elif a.part in ("all", "rollout"):
        rollout_table(a.device, a.model or default_model())
    if a.part == "gap":
        bench_rollout.gap_table(a.device, a.model or "3b", a.contexts, prompts=max(1, a.batches[0] // 8), new_tokens=a.new_tokens)
    if a.part == "grpo":
        bench_rollout.grpo_table(a.device, a.shapes[0], [c for c in a.caches if c != "hf"], a.configs)
    if a.part == "memory":
        memory_table(a.device, a.shapes, a.micro_batches, cache=a.cells)
    if a.part == "dtype":
        dtype_table(a.device, a.model or default_model())
    if a.part == "vlpo":
        vlpo_table(a.device, a.model or default_model())


if __name__ == "__main__":
    main()
