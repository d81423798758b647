"""bench.py's (b') part: the rollout's decode step profiled per decoder (lvr.generate's dynamic, static and
graph caches, and transformers' generate): ms per step, tokens/s, the step split into forward / sampling / the
rest, host syncs per step and achieved GB/s against the bandwidth floor; the dynamic loop's step from the
short bench's setting to the GRPO step's (gap); one full GRPO step per decoder and configuration (grpo).
Run through bench.py (`.ci/gpu-rollout` has the GPU commands):

    python bench.py --part rollout --profile --device cuda --model 3b
    python bench.py --part gap --device cuda
    python bench.py --part grpo --device cuda --shapes 3b
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import torch

import bench

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


QWEN_PIXELS = (4 * 28 * 28, 16384 * 28 * 28)  # Qwen2.5-VL's released min / max pixels (small-vl's cap 1024 image tokens)


def profile_model(name, device):
    """3b / 7b / tiny: a Qwen2.5-VL shape with random weights in the compute dtype (bf16 on CUDA) and the released
    model's pixel bounds; else a checkpoint (its own bounds: contexts past its max_pixels come out shorter)."""
    import model as M
    if name in bench.QWEN:
        model, tok = bench.qwen_model(name, device=device), bench.qwen_tok()
        model.to(torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        lo, hi = QWEN_PIXELS
        model.image_processor = M.image_processor(model.config.vision_config, min_pixels=lo, max_pixels=hi)
    else:
        model, tok = M.load_model(name, device=device)
    return model.to(device).eval(), tok


def decode_once(path, model, tok, prompt, G, T, device, sync_debug=False, temperature=1.0, top_p=1.0, gens=None) -> dict:
    """One decode of T tokens a row (EOS disabled, spans forbidden) by `path` (a cache of lvr.generate, or
    "hf": transformers' generate(num_return_sequences=G)): decode seconds and steps (prefill excluded),
    and with sync_debug the host syncs of the whole call (CUDA: torch.cuda.set_sync_debug_mode; CPU:
    HostSyncs), else the CUDA allocator's retries and cudaMalloc calls (bench.allocator_counts). gens: a
    function making the generators (default: one seeded generator)."""
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
            c0 = bench.allocator_counts(device)
            run()
            out["allocs"] = bench.allocator_counts(device, since=c0)
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


def _profiled(path, model, tok, prompt, G, T, device, **kw):
    """decode_once under torch.profiler: its result, and per name {label or kernel: [host ms, device ms, calls]}
    of lvr's labelled spans (their CPU-side events: host time and the time of the kernels under them) and of the
    device kernels (CUDA; the CPU: the ops, self time). For "hf" the model's forward is labelled."""
    import lvr
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = torch.device(device).type == "cuda"
    forward = model.forward
    if path == "hf":
        @functools.wraps(forward)  # generate checks its keywords against the forward's signature
        def labelled(*a, **k):
            with record_function("lvr.forward"):
                return forward(*a, **k)
        model.forward = labelled
    lvr._PROFILE = True
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            r = decode_once(path, model, tok, prompt, G, T, device, **kw)
    finally:
        lvr._PROFILE = False
        if path == "hf":
            del model.forward
    times = {}
    for e in prof.key_averages():  # one entry per name and device: a label has a CPU and a GPU-side one
        on_cpu = e.device_type == DeviceType.CPU
        kernel = not on_cpu if cuda else e.self_cpu_time_total > 0  # CUDA: the device's kernels; CPU: ops with own time
        if e.key.startswith("lvr."):
            if on_cpu:
                times[e.key] = [e.cpu_time_total / 1e3, (e.device_time_total if cuda else e.cpu_time_total) / 1e3, e.count]
        elif kernel:
            t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3
            old = times.get(e.key, [0.0, 0.0, 0])
            times[e.key] = [0.0, old[1] + t, old[2] + e.count]
    return r, times


def profile_split(path, model, tok, prompt, G, T, device, **kw) -> dict:
    """Per decode step, host (CPU) and device time in the model's forward and in sampling (lvr's labelled spans;
    for "hf" the model's forward, lm_head included), and the top device kernels (CPU: ops), from two runs under
    torch.profiler, of T and T // 2 new tokens: their difference, so that the prefill (the vision tower, the
    prompt's forward) and the set-up cancel. The graph path replays one graph: no split."""
    (r0, a), (r1, b) = (_profiled(path, model, tok, prompt, G, t, device, **kw) for t in (T // 2, T))
    steps = max(1, r1["steps"] - r0["steps"])
    per = {k: [(v - a.get(k, (0.0, 0.0, 0))[i]) / steps for i, v in enumerate(b[k])] for k in b}
    out = {"step_ms": (r1["decode_s"] - r0["decode_s"]) / steps * 1e3}  # under the profiler: the split's own total
    for label in ("lvr.forward", "lvr.sample"):
        out[label] = tuple(per.get(label, (0.0, 0.0))[:2])
    # ops of the decode steps: more calls in the longer run (a prefill-only op's calls cancel, its time is noise)
    kernels = sorted((k for k in per if not k.startswith("lvr.") and per[k][2] > 0 and per[k][1] > 0), key=lambda k: -per[k][1])
    out["top"] = [(k[:48], per[k][1], per[k][2]) for k in kernels[:6]]
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
          f"{f'{bw / 1e12:.2f} TB/s' if bw else 'unknown (no floor)'}" + (", the static and graph steps torch.compile'd" if compile_ else ""))
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
    bf16 weights (the README's measured GRPO cell), then fp32 master weights under autocast; last, at the last
    context in the GRPO cell's setting, one decode as long as the GRPO step's (512 new tokens on CUDA, 4 x
    new_tokens on the CPU): a cache grown over hundreds of steps. Each row also gives the CUDA allocator's
    retries and cudaMalloc calls in one run (bench.allocator_counts)."""
    import model as M
    model, tok = profile_model(model_name, device)
    kind = torch.device(device).type
    print(f"\n(gap) dynamic decoder per step, model {model_name}, {prompts} x G={G}, {new_tokens} new tokens, "
          f"{torch.cuda.get_device_name(device) if kind == 'cuda' else 'CPU'}")
    print("| context | setting | ms/step | forward host / dev ms | sample host / dev ms | host syncs/step | "
          "alloc retries / cudaMallocs a run |")
    print("|---|---|---|---|---|---|---|")
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
                    runs = [run(new_tokens) for _ in range(3)]
                    syncs = (run(new_tokens, sync_debug=True)["syncs"] - run(new_tokens // 2, sync_debug=True)["syncs"]) \
                        / (new_tokens - new_tokens // 2)
                    sp = profile_split("dynamic", model, tok, prompt, G, new_tokens, device, **kw)
            except torch.OutOfMemoryError:
                print(f"| {L0} | {name} | out of memory | | | | |", flush=True)
                continue
            finally:
                model.to(home)
            ms = statistics.median(r["decode_s"] / r["steps"] for r in runs) * 1e3
            f, s_ = sp["lvr.forward"], sp["lvr.sample"]
            print(f"| {L0} | {name} | {ms:.2f} | {f[0]:.2f} / {f[1]:.2f} | {s_[0]:.2f} / {s_[1]:.2f} | {syncs:.1f} | "
                  f"{allocs(runs[-1]['allocs'])} |", flush=True)
            print(f"  top {'kernels' if kind == 'cuda' else 'ops'} per step: " + "; ".join(f"{k} {t:.2f} ms x{c:.1f}" for k, t, c in sp["top"]))
    T = bench.FULL["new_tokens"] if kind == "cuda" else 4 * new_tokens
    with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16):
        r = decode_once("dynamic", model, tok, prompt, G, T, device, **rl)
    print(f"| {L0} | + {T} new tokens (the GRPO step's length), one run | {r['decode_s'] / r['steps'] * 1e3:.2f} | - | - | - | "
          f"{allocs(r['allocs'])} |", flush=True)


def allocs(counts) -> str:
    """bench.allocator_counts as a table cell."""
    return "-" if counts is None else f"{counts[0]} / {counts[1]}"


def grpo_table(device, shape="3b", caches=("graph", "dynamic"), configs=(("bf16", True, 4), ("fp32", True, 4)), dims=None):
    """One full GRPO step (bench.memory_cell: rollout, scoring, backward, AdamW; a fresh process each) per
    decoder and configuration (param dtype, --grad-ckpt, micro-batch): step and phase times, the rollout's decode
    loop apart (the rest of the rollout: encoding, vision tower, prefill), the allocator's retries and cudaMalloc
    calls in the rollout (CUDA), peak memory."""
    dims = dims or (bench.FULL if torch.device(device).type == "cuda" else dict(prompts=1, group=4, image_px=56, new_tokens=16))
    print(f"\n(grpo) one GRPO step, Qwen2.5-VL-{shape.upper()} shape, random weights, {dims['prompts']} x G={dims['group']}, "
          f"{(dims['image_px'] // 28) ** 2} image tokens, {dims['new_tokens']} new tokens (EOS off), bf16 autocast, {device}")
    print("| param dtype | grad-ckpt | micro-batch | decoder | step s | rollout s | of it decoding s | rollout ms / new token | "
          "decode ms / step | rollout alloc retries / cudaMallocs | scoring s | update s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for pd, ckpt, mb in configs:
        for cache in caches:
            r = bench.run_cell(shape=shape, layers=None if shape != "tiny" else 2, micro_batch=mb, grad_ckpt=ckpt, param_dtype=pd,
                         device=device, vision_depth=None if shape != "tiny" else 1, cache=cache, **dims)
            if r.get("oom"):
                print(f"| {pd} | {'yes' if ckpt else 'no'} | {mb} | {cache} | out of memory | | | | | | | | |", flush=True)
                continue
            peak = max(r["rollout"], r["scoring"], r["update"]) / bench.GB
            step = r["t_rollout"] + r["t_score"] + r["t_update"]
            print(f"| {pd} | {'yes' if ckpt else 'no'} | {mb} | {cache} | {step:.1f} | {r['t_rollout']:.1f} | {r['t_decode']:.1f} | "
                  f"{r['t_rollout'] / dims['new_tokens'] * 1e3:.1f} | {r['t_decode'] / r['decode_steps'] * 1e3:.1f} | "
                  f"{allocs(r['rollout_allocs'])} | {r['t_score']:.1f} | {r['t_update']:.1f} | {peak:.1f} |", flush=True)
