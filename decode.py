"""The static-cache and CUDA-graph decoder behind lvr.generate(cache="static" | "graph").

lvr.generate prefills the prompts as its dynamic decoder does; decode_static then copies the prompts' KV G
times into preallocated per-layer buffers (StaticKV) and runs one fixed-shape, host-sync-free step per token
(Decoder.step: banned tokens masked by a precomputed bias, sampling from pre-drawn uniforms, the latent state
machine in tensors, finished rows stepping on pad, `done` read every CHECK_EVERY steps; under blind=True each
row's image keys masked from its first `<|lvr_end|>` on, by a per-row flag kept in the step). cache="static" runs
that step eagerly (any device; tested against the dynamic decoder on the CPU), cache="graph" captures it once
as a CUDA graph and replays it, with the rollout weights as one bf16 copy per call (rollout_weights).
Under bench.py --compile (lvr._COMPILE_STEP) either one's step is torch.compile'd first (tested on the CPU).

    python bench.py --part rollout --profile      # ms per step, host syncs and % of the bandwidth floor per decoder
    bash .ci/gpu-rollout                          # the GPU table
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

import lvr
import parallel as P

CHECK_EVERY = 16  # the static and graph decoders look at `done` (a host sync) once every this many steps


class StaticKV:
    """A KV cache of preallocated per-layer buffers (N, kv heads, L, head dim): the decoder layers write
    their new key and value in place at column `at` (a 1-element device tensor), and attend over the whole
    buffer, the unwritten columns masked. Enough of transformers' Cache for the attention layers' `update`."""

    def __init__(self, keys: list, values: list, at: torch.Tensor):
        self.keys, self.values, self.at = keys, values, at

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.at, key_states)
        v.index_copy_(2, self.at, value_states)
        return k, v


class Decoder:
    """Fixed buffers for one decode shape and the one-token step over them (`step`), which runs eagerly
    (cache="static") or is captured once as a CUDA graph and replayed (cache="graph"): the same function.

    A step samples each row's next token from its last hidden state `h` (banned tokens masked by adding a
    precomputed bias; the uniforms and the noise drawn before the step into `u` and `noise`), advances the
    latent state machine (in tensors), records the step at row `t` of the output buffers, writes the next
    input into `x` (a token embedding, or at a latent slot the fed vector), its 3-D M-RoPE position into
    `pos`, marks KV column `at` in the (N, L) key mask `attn`, writes the forward's `mask` from it
    (lvr.step_mask: a row that has fed its `<|lvr_end|>`, `seen_end`, no longer sees its `image_keys`, which
    are all False unless the call is blind) and runs the language model's one-token forward over the
    StaticKV, which writes `h`. Finished rows keep stepping on pad, so no shape changes; nothing in the step
    reads a value back to the host. Blind or not is only what `load` puts in `image_keys`: one decoder (and
    one captured graph) serves both."""

    def __init__(self, model, spec: dict, N: int, L: int, T: int, kv_like: list, h_like, x_dtype):
        lm = model.model.language_model
        if getattr(lm, "has_sliding_layers", False):
            raise NotImplementedError("the static decoder has no sliding-window attention mask")
        impl = model.config.text_config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"the static decoder supports sdpa and eager attention, not {impl!r}")
        dev, D = h_like.device, h_like.shape[-1]
        self.model, self.spec, self.N, self.L, self.T, self.graph = model, spec, N, L, T, None
        self.keys = [torch.zeros(N, k.shape[1], L, k.shape[3], dtype=k.dtype, device=dev) for k, _ in kv_like]
        self.values = [torch.zeros(N, v.shape[1], L, v.shape[3], dtype=v.dtype, device=dev) for _, v in kv_like]
        self.at = torch.zeros(1, dtype=torch.long, device=dev)  # the KV column the step writes
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the step's index in this call
        self.kv = StaticKV(self.keys, self.values, self.at)
        self.attn = torch.zeros(N, L, dtype=torch.bool, device=dev)  # the keys a row may attend (padding, unwritten)
        self.image_keys = torch.zeros(N, L, dtype=torch.bool, device=dev)  # blind: the row's image columns
        self.seen_end = torch.zeros(N, dtype=torch.bool, device=dev)  # blind: the row has fed its <|lvr_end|>
        self.bool_mask = impl == "sdpa"  # the forward's mask. sdpa: True = attend; eager: an additive float mask
        self.mask = torch.zeros(N, 1, 1, L, dtype=torch.bool if self.bool_mask else x_dtype, device=dev)
        self.masks = {t: self.mask for t in set(model.config.text_config.layer_types)}
        self.x = torch.zeros(N, 1, D, dtype=x_dtype, device=dev)
        self.pos = torch.zeros(3, N, 1, dtype=torch.long, device=dev)
        self.h = torch.zeros(N, D, dtype=h_like.dtype, device=dev)
        self.first = torch.zeros_like(self.h)
        self.nxt = torch.zeros(N, dtype=torch.long, device=dev)
        self.force = torch.zeros(N, dtype=torch.long, device=dev)
        self.in_lat = torch.zeros(N, dtype=torch.bool, device=dev)
        self.left = torch.zeros(N, dtype=torch.long, device=dev)
        self.done = torch.zeros(N, dtype=torch.bool, device=dev)
        self.u = torch.zeros(N, device=dev)
        self.noise = torch.zeros_like(self.h)
        self.given = None if spec["given"] is None else torch.zeros(N, *spec["given"], dtype=h_like.dtype, device=dev)
        V = model.lm_head.out_features
        bias = torch.zeros(4, V, device=dev)  # row in_lat + 2 * (force < 0): out of / in a span, may / may not open
        bias[:, list(spec["banned"])] = float("-inf")
        bias[0::2, [spec["end"], spec["lat_end"]]] = float("-inf")  # outside a span
        bias[2:, spec["start"]] = float("-inf")  # force < 0: never opens a span
        self.bias = bias
        self.open_row = torch.full((V,), float("-inf"), device=dev).index_fill_(0, torch.tensor([spec["start"]], device=dev), 0.0)
        self.eos = torch.tensor(spec["eos"], dtype=torch.long, device=dev)
        self.out = {"tokens": torch.zeros(T, N, dtype=torch.long, device=dev),
                    "latents": torch.zeros(T, N, D, dtype=h_like.dtype, device=dev),
                    "latent_mask": torch.zeros(T, N, dtype=torch.bool, device=dev),
                    "real": torch.zeros(T, N, dtype=torch.bool, device=dev),
                    "forced": torch.zeros(T, N, dtype=torch.bool, device=dev)}
        self.step_fn = self.step
        if spec["compiled"]:  # traced at its first run (on CUDA: the graph's warm-up), under attention()
            self.step_fn = torch.compile(self.step, mode="max-autotune-no-cudagraphs")

    def key(self) -> tuple:
        return Decoder.key_of(self.spec, self.N, self.L, self.T, self.keys, self.values, self.h, self.x.dtype, self.graph is not None)

    @staticmethod
    def key_of(spec, N, L, T, keys, values, h, x_dtype, graph) -> tuple:
        """What a decoder's buffers and captured step depend on: a kept decoder is reused only for an equal key."""
        kv = tuple((tuple(k.shape[1::2]), k.dtype, tuple(v.shape[1::2]), v.dtype) for k, v in zip(keys, values))
        return (tuple(sorted(spec.items())), N, L, T, kv, tuple(h.shape[1:]), h.dtype, h.device, x_dtype, graph)

    def load(self, dyn, h, nxt, attn, image_keys, force, given, L0: int):
        """A call's starting state: the prompts' KV (P rows of a prefilled DynamicCache) copied G times into the
        buffers' first L0 columns (the rest zeroed), the prompt's attention mask, its image columns per row
        (`image_keys` (N, L0) bool under blind, else None: none hidden), each row's last hidden state and next
        position, and the step counters at 0 / column L0."""
        G = self.N // dyn.layers[0].keys.shape[0]
        for layer, k, v in zip(dyn.layers, self.keys, self.values):
            for buf, src in ((k, layer.keys), (v, layer.values)):
                buf[:, :, :L0].unflatten(0, (-1, G)).copy_(src[:, None])
                buf[:, :, L0:].zero_()
        self.attn.zero_()
        self.attn[:, :L0] = attn.bool()
        self.image_keys.zero_()
        if image_keys is not None:
            self.image_keys[:, :L0] = image_keys
        self.h.copy_(h)
        self.nxt.copy_(nxt)
        self.force.copy_(force)
        if self.given is not None:
            self.given.copy_(given)
        for buf in (self.first, self.in_lat, self.left, self.done, self.seen_end, self.t, *self.out.values()):
            buf.zero_()
        self.at.fill_(L0)

    def draw_inputs(self, generator, G: int):
        """The step's random numbers, drawn in the dynamic decoder's order (uniforms, then noise) into the
        fixed buffers the step reads, outside the step (and its graph)."""
        if self.spec["temperature"] > 0:
            self.u.copy_(lvr.draw(torch.rand, generator, self.N, G, device=self.u.device))
        if self.spec["mode"] in ("noise", "noise_norm"):
            self.noise.copy_(lvr.draw(torch.randn, generator, self.N, G, self.h.shape[1:], self.h.device))

    def step(self):
        """One decode step, all in place (see the class). The function a CUDA graph captures."""
        s, N, h, dev = self.spec, self.N, self.h, self.h.device
        K, in_lat, left, done, t = s["K"], self.in_lat, self.left, self.done, self.t
        with lvr._span("lvr.sample"):
            logits = self.model.lm_head(h).float() + self.bias.index_select(0, in_lat.long() + 2 * (self.force < 0).long())
            logits = torch.where(((t == 0) & (self.force > 0))[:, None], self.open_row, logits)
            nxt_tok = lvr.sample_token(logits, s["temperature"], s["top_p"], self.u)
        learned_exit = (nxt_tok == s["end"]) | (nxt_tok == s["lat_end"]) if s["latent_exit"] == "learned" else torch.zeros_like(done)
        exit_now = in_lat & ((left == 0) | learned_exit)
        feed = in_lat & ~exit_now & ~done
        token = torch.where(exit_now, torch.full_like(nxt_tok, s["end"]), torch.where(feed, torch.full_like(nxt_tok, s["lvr"]), nxt_tok))
        token = torch.where(done, torch.full_like(token, s["pad"]), token)
        slot = (K - left).clamp(0, max(K - 1, 0))
        vec = lvr.latent_vector(h, s["mode"], noise=self.noise)
        if s["mode"] == "repeat":
            self.first.copy_(torch.where((feed & (slot == 0))[:, None], h, self.first))
            vec = self.first
        if self.given is not None:  # slots past the k given ones feed the model's own
            k = self.given.shape[1]
            vec = torch.where((slot < k)[:, None], self.given[torch.arange(N, device=dev), slot.clamp(max=k - 1)], vec)
        entered = ~in_lat & ~done & (token == s["start"])
        for name, value in (("tokens", token), ("latents", torch.where(feed[:, None], vec, torch.zeros_like(vec))),
                            ("latent_mask", feed), ("real", ~done),
                            ("forced", exit_now | (entered & (self.force > 0) & (t == 0)))):
            self.out[name].index_copy_(0, t, value[None])
        left.copy_(torch.where(feed, left - 1, torch.where(entered, torch.full_like(left, K), left)))
        in_lat.copy_((in_lat & feed) | entered)
        done.copy_(done | (token[:, None] == self.eos).any(1))
        self.seen_end.copy_(self.seen_end | (token == s["end"]))  # the token fed now is a blind query from its span's end on
        self.x.copy_(torch.where(feed[:, None], vec.to(h.dtype), self.model.get_input_embeddings()(token))[:, None])
        self.pos.copy_((self.nxt + t).view(1, N, 1).expand(3, N, 1))
        self.attn.index_fill_(1, self.at, True)
        keys = lvr.step_mask(self.attn, self.image_keys, self.seen_end)
        self.mask.copy_((keys if self.bool_mask else torch.where(keys, 0.0, torch.finfo(self.mask.dtype).min))[:, None, None])
        with lvr._span("lvr.forward"):
            out = self.model.model.language_model(inputs_embeds=self.x, attention_mask=self.masks, position_ids=self.pos,
                                                  cache=self.kv, use_cache=True)
        self.h.copy_(out.last_hidden_state[:, -1])
        t.add_(1)
        self.at.add_(1)

    @contextlib.contextmanager
    def attention(self):
        """While a compiled step runs or is captured: its attention is gqa_decode_attention (transformers' sdpa
        path repeats the KV heads under dynamo). An uncompiled step: the model's own."""
        if not self.spec["compiled"]:
            yield
            return
        cfg = self.model.config.text_config
        old, cfg._attn_implementation = cfg._attn_implementation, GQA_DECODE
        try:
            yield
        finally:
            cfg._attn_implementation = old

    def capture(self):
        """Capture `step_fn` as a CUDA graph: two warm-up steps on a side stream, then the capture, each from a
        harmless state (every column attendable); `load` sets the real one afterwards."""
        def harmless():
            self.attn.fill_(True)
            for buf in (self.t, self.at, self.in_lat, self.left, self.done, self.seen_end):
                buf.zero_()
        side = torch.cuda.Stream(self.h.device)
        side.wait_stream(torch.cuda.current_stream(self.h.device))
        with self.attention():
            with torch.cuda.stream(side):
                for _ in range(2):
                    harmless()
                    self.step_fn()
            torch.cuda.current_stream(self.h.device).wait_stream(side)
            harmless()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step_fn()

    def run(self):
        if self.graph is not None:
            self.graph.replay()
            return
        with self.attention():
            self.step_fn()

    def result(self, steps: int) -> list:
        """(N, steps) copies of the output buffers (the buffers are reused by the next call)."""
        return [self.out[k][:steps].transpose(0, 1).contiguous() for k in ("tokens", "latents", "latent_mask", "real", "forced")]


GQA_DECODE = "lvr_gqa_decode"


def gqa_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one query token per row over grouped KV heads: the query heads sharing a KV head are
    laid along the query axis (N, kv heads, group, d), so SDPA reads each key and value once (no repeat)."""
    N, H, q, d = query.shape
    if q != 1:
        raise ValueError("gqa_decode_attention serves one-token decode steps only")
    out = F.scaled_dot_product_attention(query.reshape(N, key.shape[1], H // key.shape[1], d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(N, H, 1, d).transpose(1, 2).contiguous(), None


def _register_attention():
    from transformers import AttentionInterface
    AttentionInterface.register(GQA_DECODE, gqa_decode_attention)


_register_attention()


def release(model):
    """Drop the decoder a generate(keep=True) left on the model (its KV buffers, its CUDA graph)."""
    model.__dict__.pop("_lvr_decoder", None)
    model.__dict__.pop("_lvr_weights", None)


def decode_static(model, prompt, feats, pos, nxt, attn, image_keys, G, N, T, force, given, generator, spec, graph, keep,
                  all_ranks):
    """Prefill as the dynamic decoder does, then the Decoder's fixed-shape step T times at most, `done` read
    every CHECK_EVERY steps. `image_keys` (N, L0) bool: blind decoding (Decoder.load); None: not blind. Returns
    what _decode_dynamic does."""
    from transformers import DynamicCache
    dev = prompt["input_ids"].device
    x = lvr.embed(model, prompt["input_ids"], feats=feats)
    dyn = DynamicCache(config=model.config.text_config)
    h = lvr.hidden(model, x, prompt["attention_mask"], pos, dyn)[:, -1].repeat_interleave(G, 0)
    nxt = nxt.repeat_interleave(G, 0)
    L0 = prompt["input_ids"].shape[1]
    L = -(-(L0 + T) // 64) * 64  # KV columns: the prompt and every step, rounded up so that shapes recur across calls
    x_dtype = torch.promote_types(h.dtype, model.get_input_embeddings().weight.dtype)
    kv_like = [(lay.keys, lay.values) for lay in dyn.layers]
    key = Decoder.key_of(spec, N, L, T, [k for k, _ in kv_like], [v for _, v in kv_like], h, x_dtype, graph)
    dec = model.__dict__.get("_lvr_decoder")
    if dec is None or dec.key() != key or dec.params != _param_ptrs(model):
        release(model)
        dec = Decoder(model, spec, N, L, T, kv_like, h, x_dtype)
        dec.params = _param_ptrs(model)
        if graph:
            dec.capture()
    dec.load(dyn, h, nxt, attn, image_keys, force, given, L0)
    del dyn, kv_like
    lvr._sync(dev)
    t1 = time.perf_counter()
    for t in range(T):
        dec.draw_inputs(generator, G)
        dec.run()
        if t == T - 1:
            break
        if (t + 1) % CHECK_EVERY == 0:
            finished = bool(dec.done.all())
            if P.all_true(finished) if all_ranks else finished:
                break
    out = dec.result(t + 1)
    if keep:
        model.__dict__["_lvr_decoder"] = dec
    else:
        release(model)
    return (*out, t + 1, t1)


def _param_ptrs(model) -> tuple:
    """Where the decode weights live: a kept CUDA graph reads them there."""
    return tuple(p.data_ptr() for p in (*model.model.language_model.parameters(), *model.lm_head.parameters()))


@contextlib.contextmanager
def rollout_weights(model, dev, keep: bool = False):
    """Under CUDA autocast with fp32 weights: the language model and lm_head switched to one copy of their
    weights in the autocast dtype for the whole call (made once, not cast anew at every use; a CUDA graph
    points at it), autocast off inside; the vision tower keeps the caller's autocast. keep=True keeps the
    copy on the model, refreshed in place by the next call (a kept graph reads it). Elsewhere: nothing."""
    kind = torch.device(dev).type
    if kind != "cuda" or not torch.is_autocast_enabled(kind) or P.is_sharded(model):
        yield
        return
    dtype, old, new, saved = torch.get_autocast_dtype(kind), model.__dict__.pop("_lvr_weights", {}), {}, []
    for p in (*model.model.language_model.parameters(), *model.lm_head.parameters()):
        if id(p) not in new and p.dtype == torch.float32:
            w = old.get(id(p))
            new[id(p)] = w.copy_(p.data) if w is not None and w.shape == p.shape else p.data.to(dtype)
            saved.append((p, p.data))
            p.data = new[id(p)]
    try:
        with torch.autocast(kind, enabled=False):
            yield
    finally:
        for p, data in saved:
            p.data = data
        if keep:
            model.__dict__["_lvr_weights"] = new
