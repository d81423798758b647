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

(d) Qwen2.5-VL-3B / 7B shapes from their config.json, random weights, one train_rl.grpo_step at the defaults
with EOS suppressed (completions of exactly 512 tokens). CUDA: full depth, torch.cuda.max_memory_allocated.
CPU: 1 and 2 decoder layers at real widths, extrapolated (memory_table, estimate).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import parallel as P

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
    import data
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
    import data
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
    stream, penalty = data.Stream(args), reward.LengthPenalty()
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


# ------------------------------------------------------------------- (b') the decode step, profiled
class HostSyncs:
    """Counts, in the ops run under it (any device), the ones that read a value back to the host and so
    stall the host on CUDA until the GPU catches up: .item() / bool() / nonzero / boolean-mask indexing and
    the like. On CUDA `torch.cuda.set_sync_debug_mode` sees the real ones; this also works on the CPU."""
    SYNC = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "nonzero_static", "masked_select", "equal",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "tolist"}
    INDEX = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                boolean = name in outer.INDEX and any(t is not None and t.dtype in (torch.bool, torch.uint8)
                                                      for t in args[1])
                repeats = name == "repeat_interleave" and len(args) > 1 and torch.is_tensor(args[1]) \
                    and (kwargs or {}).get("output_size") is None
                if name in outer.SYNC or boolean or repeats:
                    outer.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = [], Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def count(self) -> int:
        return len(self.ops)


BANDWIDTH = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12),
             ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12), ("L40S", 0.864e12))  # bytes/s, the makers' figures


def bandwidth(device) -> float | None:
    """The card's memory bandwidth (bytes/s) by its name; None on the CPU or an unknown card."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH if key in name), None)


def floor_bytes(model, N: int, context: float) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step must read at least: the language model and lm_head once, and
    keys and values of every layer for N rows at this context length, in the weights' dtype."""
    seen, w = set(), 0
    for p in (*model.model.language_model.parameters(), *model.lm_head.parameters()):
        if id(p) not in seen:
            seen.add(id(p))
            w += p.numel() * p.element_size()
    c = model.config.text_config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elt = next(model.model.language_model.parameters()).element_size()
    return w, int(2 * c.num_hidden_layers * N * c.num_key_value_heads * hd * context * elt)


def context_samples(model, tok, n: int, context: int):
    """n test questions whose images make the prompt about `context` tokens long (square images)."""
    import data
    import model as M
    vcfg = model.config.vision_config
    factor = vcfg.patch_size * vcfg.spatial_merge_size
    small = data.make_split("test", n, size=2 * factor)
    text = M.encode(model, tok, small)["input_ids"].shape[1] - 4  # a 2 x 2 grid of merged tokens
    side = max(2, round(math.sqrt(max(4, context - text))))
    return data.make_split("test", n, size=side * factor)


def profile_model(name, device):
    """3b / 7b / tiny: a Qwen2.5-VL shape with random weights in the compute dtype (bf16 on CUDA); else a checkpoint."""
    import model as M
    if name in QWEN:
        model, tok = qwen_model(name, device=device), qwen_tok()
        model.to(torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        model.image_processor = M.image_processor(model.config.vision_config)
    else:
        model, tok = M.load_model(name, device=device)
    return model.to(device).eval(), tok


def decode_once(path, model, tok, prompt, G, T, device, sync_debug=False, temperature=1.0, top_p=1.0, gens=None) -> dict:
    """One decode of T tokens a row (EOS disabled, spans forbidden) by `path` (a cache of lvr.generate, or
    "hf": transformers' generate(num_return_sequences=G)): decode seconds and steps (prefill excluded),
    and with sync_debug the host syncs of the whole call (CUDA: torch.cuda.set_sync_debug_mode; CPU:
    HostSyncs). gens: a function making the generators (default: one seeded generator)."""
    import warnings
    import lvr
    from transformers import LogitsProcessor, LogitsProcessorList
    out, N = {}, prompt["input_ids"].shape[0] * G

    class Clock(LogitsProcessor):  # called once per step, the first time right after the prefill
        calls, t_first = 0, None

        def __call__(self, input_ids, scores):
            if Clock.calls == 0:
                _sync(device)
                Clock.t_first = time.perf_counter()
            Clock.calls += 1
            return scores

    def run():
        if path == "hf":
            torch.manual_seed(0)
            model.generate(**prompt, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=T,
                           min_new_tokens=T, num_return_sequences=G, suppress_tokens=[model.config.lvr_start_id],
                           pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([Clock()]))
            _sync(device)
            out.update(decode_s=time.perf_counter() - Clock.t_first, steps=Clock.calls - 1)
        else:
            stats = {}
            gen = gens() if gens else torch.Generator(device=device).manual_seed(0)
            lvr.generate(model, tok, prompt, G=G, max_new_tokens=T, temperature=temperature, top_p=top_p, generator=gen,
                         force=-torch.ones(N, dtype=torch.long), cache=path, keep=True, stats=stats)
            out.update(decode_s=stats["decode_s"], steps=stats["steps"] - (path == "dynamic"))  # steps with a forward
    eos, lvr.eos_ids = lvr.eos_ids, (lambda model, tok: [])
    try:
        if not sync_debug:
            run()
        elif torch.device(device).type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            with HostSyncs() as hs:
                run()
            out["syncs"] = hs.count
    finally:
        lvr.eos_ids = eos
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def capture_ms(model, tok, prompt, G, T, device) -> float:
    """Milliseconds a graph decode spends building its buffers and capturing (a fresh call less a kept one)."""
    import decode
    runs = []
    decode.release(model)
    for _ in range(2):  # decode_once keeps the decoder: the second call reuses the first one's capture
        _sync(device)
        t0 = time.perf_counter()
        decode_once("graph", model, tok, prompt, G, T, device)
        runs.append(time.perf_counter() - t0)
    decode.release(model)
    return (runs[0] - runs[1]) * 1e3


def profile_split(path, model, tok, prompt, G, T, device, **kw) -> dict:
    """Per decode step, host (CPU) and device time in the model's forward and in sampling, from one run
    under torch.profiler (lvr's labelled spans; for "hf" the model's forward, lm_head included); the top
    device kernels. The graph path replays one graph: no split."""
    import lvr
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    forward = model.forward
    if path == "hf":
        @functools.wraps(forward)  # generate checks its keywords against the forward's signature
        def labelled(*a, **k):
            with record_function("lvr.forward"):
                return forward(*a, **k)
        model.forward = labelled
    lvr._PROFILE = True
    try:
        with profile(activities=acts) as prof:
            r = decode_once(path, model, tok, prompt, G, T, device, **kw)
    finally:
        lvr._PROFILE = False
        if path == "hf":
            del model.forward
    steps = max(1, r["steps"])
    ev = {e.key: e for e in prof.key_averages()}
    out = {"step_ms": r["decode_s"] / steps * 1e3}  # under the profiler: the split's own total
    dev = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    for label in ("lvr.forward", "lvr.sample"):
        e = ev.get(label)
        out[label] = (e.cpu_time_total / 1e3 / steps, dev(e) / 1e3 / steps) if e else (0.0, 0.0)
    kernels = sorted((e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0
                      and not e.key.startswith("lvr.")), key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))
    out["top"] = [(e.key[:48], (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps, e.count / steps)
                  for e in kernels[:6]]  # prefill included, spread over the steps
    return out


def rollout_profile(device, model_name, caches=("dynamic", "static", "graph", "hf"), contexts=(1100, 1600),
                    batches=(64, 128), new_tokens=32, G=8, repeats=3, split=True, compile_=False):
    """(b') Per decode step: ms and tokens/s (median of `repeats`, prefill excluded), host and device ms in
    the model's forward and in sampling (the rest: bookkeeping), host syncs per step (two lengths'
    difference), and on CUDA the achieved share of the bandwidth floor (weights + KV bytes / the card's
    bandwidth), for each decoder and transformers' generate, at each context and batch."""
    import decode
    import lvr
    import model as M
    cuda = torch.device(device).type == "cuda"
    model, tok = profile_model(model_name, device)
    bw = bandwidth(device)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n(b') decode step profile: model {model_name}, {card}, torch {torch.__version__}, G={G}, {new_tokens} new tokens "
          f"(EOS off, spans forbidden, temperature 1), median of {repeats}; bandwidth "
          f"{f'{bw / 1e12:.2f} TB/s' if bw else 'unknown (no floor)'}" + (", graph step torch.compile'd" if compile_ else ""))
    if compile_:
        lvr._COMPILE_STEP = True
    rows = []
    for ctx in contexts:
        for B in batches:
            P_ = max(1, B // G)
            prompt = {k: v.to(device) for k, v in M.encode(model, tok, context_samples(model, tok, P_, ctx)).items()}
            L0, N = prompt["input_ids"].shape[1], P_ * G
            w, kv = floor_bytes(model, N, L0 + new_tokens / 2)
            floor_ms = (w + kv) / bw * 1e3 if bw else None
            print(f"\ncontext {L0} (+{new_tokens}), batch {N}: floor {(w + kv) / 1e9:.2f} GB a step (weights {w / 1e9:.2f}, KV "
                  f"{kv / 1e9:.2f})" + (f" = {floor_ms:.2f} ms" if floor_ms else ""), flush=True)
            print("| decoder | ms/step | tokens/s | forward host / dev ms | sample host / dev ms | other host ms (under the profiler) | "
                  "host syncs/step | GB/s | % of floor |")
            print("|---|---|---|---|---|---|---|---|---|")
            detail = not rows  # the split and the host syncs at the first cell only (each is one more decode or two)
            for path in caches:
                if path == "graph" and not cuda:
                    continue
                try:
                    with torch.no_grad():
                        if path != "hf":  # warm-up (capture, kernels); hf: the decoders before it warmed the GPU
                            decode_once(path, model, tok, prompt, G, new_tokens, device)
                        runs = [decode_once(path, model, tok, prompt, G, new_tokens, device)
                                for _ in range(1 if path == "hf" else repeats)]
                        ms = statistics.median(r["decode_s"] / max(1, r["steps"]) for r in runs) * 1e3
                        syncs = sp = None
                        if detail:
                            short = decode_once(path, model, tok, prompt, G, new_tokens // 2, device, sync_debug=True)
                            long = decode_once(path, model, tok, prompt, G, new_tokens, device, sync_debug=True)
                            syncs = (long["syncs"] - short["syncs"]) / max(1, long["steps"] - short["steps"])
                            sp = profile_split(path, model, tok, prompt, G, new_tokens, device) if split and path != "graph" else None
                except torch.OutOfMemoryError:
                    print(f"| {path} | out of memory | | | | | | | |", flush=True)
                    decode.release(model)
                    torch.cuda.empty_cache()
                    continue
                decode.release(model)
                fwd, smp = (sp["lvr.forward"], sp["lvr.sample"]) if sp else ((None, None), (None, None))
                fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
                other = sp["step_ms"] - fwd[0] - smp[0] if sp else None
                gbs = (w + kv) / (ms / 1e3) / 1e9
                rows.append(dict(context=L0, batch=N, path=path, ms=ms, tokens_s=N / ms * 1e3, syncs=syncs, split=sp))
                if path == "graph" and cuda and detail:
                    print(f"  (graph: {capture_ms(model, tok, prompt, G, new_tokens, device):.0f} ms to build and capture)")
                print(f"| {path} | {ms:.2f} | {N / ms * 1e3:.0f} | {fmt(fwd[0])} / {fmt(fwd[1])} | {fmt(smp[0])} / {fmt(smp[1])} | "
                      f"{fmt(other)} | {fmt(syncs)} | {gbs:.0f} | {f'{floor_ms / ms:.0%}' if floor_ms else '-'} |", flush=True)
            for r in rows[-len(caches):]:
                if r["split"] and r["context"] == L0 and r["batch"] == N:
                    print(f"  top {'kernels' if cuda else 'ops'} per step, {r['path']}: " + "; ".join(
                        f"{k} {t:.2f} ms x{c:.1f}" for k, t, c in r["split"]["top"]))
    lvr._COMPILE_STEP = False
    return rows


def gap_table(device, model_name="3b", contexts=(200, 1100, 1600), G=8, prompts=8, new_tokens=32):
    """Where the rollout inside a GRPO step loses against the short bench, one change at a time, on the dynamic
    decoder: the bench's setting (bf16 weights, temperature 1, top-p 1, one generator) at each context, then
    the GRPO step's sampling (temperature 0.5, top-p 0.99, a generator per question), then bf16 autocast over
    bf16 weights (the README's measured GRPO cell), then fp32 master weights under autocast."""
    import model as M
    model, tok = profile_model(model_name, device)
    kind = torch.device(device).type
    print(f"\n(gap) dynamic decoder per step, model {model_name}, {prompts} x G={G}, {new_tokens} new tokens, "
          f"{torch.cuda.get_device_name(device) if kind == 'cuda' else 'CPU'}")
    print("| context | setting | ms/step | forward host / dev ms | sample host / dev ms | host syncs/step |")
    print("|---|---|---|---|---|---|")
    rl = dict(temperature=0.5, top_p=0.99, gens=lambda: [torch.Generator(device=device).manual_seed(i) for i in range(prompts)])
    settings = [("bench (bf16 weights, T 1, top-p 1)", {}, False, None), ("+ T 0.5, top-p 0.99, generator per question", rl, False, None),
                ("+ bf16 autocast (README's GRPO cell)", rl, True, None), ("+ fp32 master weights", rl, True, torch.float32)]
    for ctx in contexts:
        prompt = {k: v.to(device) for k, v in M.encode(model, tok, context_samples(model, tok, prompts, ctx)).items()}
        L0 = prompt["input_ids"].shape[1]
        for name, kw, autocast, weights in settings:
            home = next(model.parameters()).dtype
            if weights is not None:
                model.to(weights)
            run = lambda T, **o: decode_once("dynamic", model, tok, prompt, G, T, device, **kw, **o)  # noqa: E731
            try:
                with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast):
                    run(new_tokens)
                    ms = statistics.median(r["decode_s"] / r["steps"] for r in [run(new_tokens) for _ in range(3)]) * 1e3
                    syncs = (run(new_tokens, sync_debug=True)["syncs"] - run(new_tokens // 2, sync_debug=True)["syncs"]) \
                        / (new_tokens - new_tokens // 2)
                    sp = profile_split("dynamic", model, tok, prompt, G, new_tokens, device, **kw)
            except torch.OutOfMemoryError:
                print(f"| {L0} | {name} | out of memory | | | |", flush=True)
                continue
            finally:
                model.to(home)
            f, s_ = sp["lvr.forward"], sp["lvr.sample"]
            print(f"| {L0} | {name} | {ms:.2f} | {f[0]:.2f} / {f[1]:.2f} | {s_[0]:.2f} / {s_[1]:.2f} | {syncs:.1f} |", flush=True)
            print(f"  top {'kernels' if kind == 'cuda' else 'ops'} per step: " + "; ".join(f"{k} {t:.2f} ms x{c:.1f}" for k, t, c in sp["top"]))


def grpo_table(device, shape="3b", caches=("graph", "dynamic"), configs=(("bf16", True, 4), ("fp32", True, 4)), dims=None):
    """One full GRPO step (bench.memory_cell: rollout, scoring, backward, AdamW; a fresh process each) per
    decoder and configuration (param dtype, --grad-ckpt, micro-batch): step and phase times, peak memory."""
    dims = dims or (FULL if torch.device(device).type == "cuda" else dict(prompts=1, group=4, image_px=56, new_tokens=16))
    print(f"\n(grpo) one GRPO step, Qwen2.5-VL-{shape.upper()} shape, random weights, {dims['prompts']} x G={dims['group']}, "
          f"{(dims['image_px'] // 28) ** 2} image tokens, {dims['new_tokens']} new tokens (EOS off), bf16 autocast, {device}")
    print("| param dtype | grad-ckpt | micro-batch | decoder | step s | rollout s | rollout ms / new token | scoring s | update s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pd, ckpt, mb in configs:
        for cache in caches:
            r = run_cell(shape=shape, layers=None if shape != "tiny" else 2, micro_batch=mb, grad_ckpt=ckpt, param_dtype=pd,
                         device=device, vision_depth=None if shape != "tiny" else 1, cache=cache, **dims)
            if r.get("oom"):
                print(f"| {pd} | {'yes' if ckpt else 'no'} | {mb} | {cache} | out of memory | | | | | |", flush=True)
                continue
            peak = max(r["rollout"], r["scoring"], r["update"]) / GB
            step = r["t_rollout"] + r["t_score"] + r["t_update"]
            print(f"| {pd} | {'yes' if ckpt else 'no'} | {mb} | {cache} | {step:.1f} | {r['t_rollout']:.1f} | "
                  f"{r['t_rollout'] / dims['new_tokens'] * 1e3:.1f} | {r['t_score']:.1f} | {r['t_update']:.1f} | {peak:.1f} |", flush=True)


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
    """small-vl's LVR SFT checkpoint: the one trained here, else the shipped one."""
    here = os.path.join("runs", "small-vl-sft", "checkpoint")
    return here if os.path.isdir(here) else os.path.join("checkpoints", "small-vl-sft")


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


def memory_cell(shape, layers, vision_depth, prompts, group, image_px, new_tokens, micro_batch, grad_ckpt, param_dtype,
                device, freeze_embeddings=False, cache=None) -> dict:
    """Runs in its own process: one GRPO step (train_rl.grpo_step: rollout, scoring, backward, AdamW) of a
    random model at this shape, fp32 or bf16 weights, bf16 autocast, completions forced to `new_tokens`.
    The step starts in the steady state of training: AdamW's state alive, no gradients.
    Returns per phase (rollout, scoring, update) the peak above the memory held just before the step
    (CPU: peak RSS, reset per phase via /proc/self/clear_refs) or, on CUDA, the absolute peak allocated."""
    import data
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
    peaks, base = {}, 0 if device == "cuda" else rss_bytes()

    def phase(name, fn):
        def run(*a, **k):
            reset_peak(device)
            out = fn(*a, **k)
            peaks[name] = peak_bytes(device) - base
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
    return {**peaks, "base": base, "length": row["length"], "prompt_len": prompt_len,
            **{k: row[k] for k in ("t_rollout", "t_score", "t_update")}}


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "reward", "rollout", "vlpo", "memory", "dtype", "gap", "grpo"],
                   help="which table (vlpo: what VLPO changes against masked latents; needs --model or an SFT run; gap: "
                        "the dynamic decoder's step from the short bench's setting to the GRPO step's; grpo: one GRPO step "
                        "per decoder and configuration)")
    p.add_argument("--profile", action="store_true", help="--part rollout: the decode step profiled per decoder (b')")
    p.add_argument("--caches", nargs="+", default=["dynamic", "static", "graph", "hf"],
                   choices=["dynamic", "static", "graph", "hf"], help="--profile / grpo: decoders (hf: transformers' generate)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1100, 1600], help="--profile / gap: prompt lengths (about)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128], help="--profile / gap (the first): rollouts decoded together")
    p.add_argument("--new-tokens", type=int, default=32, help="--profile / gap: decode steps measured")
    p.add_argument("--repeats", type=int, default=3, help="--profile: timed runs per cell (median)")
    p.add_argument("--no-split", action="store_true", help="--profile: no torch.profiler run (time and syncs only)")
    p.add_argument("--configs", nargs="+", default=["bf16,ckpt,4", "fp32,ckpt,4"],
                   help="--part grpo: PARAM_DTYPE,ckpt|no,MICRO_BATCH per configuration")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048], help="sequence lengths for (a)")
    p.add_argument("--model", help="checkpoint for rollout / vlpo / dtype (default: runs/small-vl-sft/checkpoint, else the "
                                   "shipped checkpoints/small-vl-sft); rollout also takes 3b or 7b (random Qwen2.5-VL weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the fused reward (CUDA); with --profile: the "
                                                           "graph decoder's step")
    p.add_argument("--cell", nargs=3, metavar=("METHOD", "SHAPE", "L"), help=argparse.SUPPRESS)
    p.add_argument("--shapes", nargs="+", default=["3b", "7b"], choices=["3b", "7b", "tiny"],
                   help="--part memory / grpo (the first): model shapes")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="--part memory: micro-batch sizes")
    p.add_argument("--cells", help="--part memory on CPU: a JSON file keeping the measured cells, reused when present")
    p.add_argument("--memory-cell", help=argparse.SUPPRESS)
    a = p.parse_args()
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
        rollout_profile(a.device, a.model or default_model(), a.caches, a.contexts, a.batches, a.new_tokens,
                        repeats=a.repeats, split=not a.no_split, compile_=a.compile)
    elif a.part in ("all", "rollout"):
        rollout_table(a.device, a.model or default_model())
    if a.part == "gap":
        gap_table(a.device, a.model or "3b", a.contexts, prompts=max(1, a.batches[0] // 8), new_tokens=a.new_tokens)
    if a.part == "grpo":
        configs = [(d, c == "ckpt", int(m)) for d, c, m in (x.split(",") for x in a.configs)]
        grpo_table(a.device, a.shapes[0], [c for c in a.caches if c != "hf"], configs)
    if a.part == "memory":
        memory_table(a.device, a.shapes, a.micro_batches, cache=a.cells)
    if a.part == "dtype":
        dtype_table(a.device, a.model or default_model())
    if a.part == "vlpo":
        vlpo_table(a.device, a.model or default_model())


if __name__ == "__main__":
    main()
