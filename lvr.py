"""The LVR latent-token patch: latent decoding, the scoring forward, interventions and the stage-1 loss.

Works on any Qwen2-VL-family model from model.py (small-vl or a real Qwen2.5-VL / LVR checkpoint).

Latent decoding. A sample that emits `<|lvr_start|>` enters latent mode: for the next K steps its
input embedding is its own last hidden state (after the final norm) instead of a token embedding;
then `<|lvr_end|>` is fed (forced) and text generation resumes. Optionally (`latent_exit="learned"`)
a span also ends early when the token the model would emit at a latent step is `<|lvr_end|>` or
`<|lvr_latent_end|>`. Every sample of the batch has its own mode; one KV cache serves all; the
prompt and image are prefilled once and the cache repeated for the G samples of a GRPO group.
The sequence records `<|lvr|>` at latent positions; `latents` holds exactly the vectors fed there.
Outside a span the structural tokens (`structural_ids`: image and vision tokens, `<|lvr|>`,
`<|lvr_latent_end|>`, `<|lvr_end|>`) are never sampled; `forced` marks the tokens the decoder put in.

Decoders (`cache=`). "dynamic": transformers' DynamicCache and a Python loop that reads values back to the
host several times a step (the reference). "static": the prompt's KV copied G times into preallocated
per-layer buffers, written in place at a position counter; one fixed-shape step (decode.Decoder.step: banned tokens
masked by a precomputed bias, sampling from uniforms drawn before the step, the latent state machine in
tensors, finished rows stepping on pad) that reads nothing back; `done` looked at every 16 steps. "graph":
that same step captured once as a CUDA graph and replayed (CUDA only; the default there). All three give
the same rollouts (tests/test_decode.py).

Interventions (inference-time ablations, `mode=`):
  normal      the hidden state is fed back, as trained.
  drop        zero latent steps: `<|lvr_start|>` is still emitted and `<|lvr_end|>` follows at once,
              so no latent embedding ever enters the context (the paper's "removal").
  noise       every fed-back latent is replaced by a standard normal vector (the paper's noise).
  noise_norm  every fed-back latent is replaced by Gaussian noise rescaled to the norm of the hidden
              state it replaces (same norm, random direction).
  zero        every latent is a zero vector.
  repeat      the span's first latent (the model's own) is fed again at every later slot.
  given=      vectors supplied by the caller (eval.py: another question's latents, or the stage-1
              targets of this question: the oracle). Fewer than K given vectors: the slots past them feed the
              model's own hidden state (eval.py's donor swap of the first k slots).

Image-blind answers (`blind=True`, CVRR's strict interface). Every query position from a row's first
`<|lvr_end|>` on is masked from the image's visual tokens; prompt text and latents stay visible. The
`<|lvr_end|>` position itself is blind because its state predicts the first answer token, so no token
after the span is predicted from a state that read the image directly. The one-token decode step of every
decoder (dynamic, static, graph) needs only a per-row key mask (`step_mask`: the static step keeps the
prompt's image columns and a per-row "seen `<|lvr_end|>`" flag in its buffers); a full forward over
prompt + completion (the no-cache oracle, the scoring forward, the stage-1 loss) a 4-D one (`blind_mask`).

Stage-1 loss (teacher forcing). The response holds `<|lvr_start|> <|lvr|>*S <|lvr_end|> answer`.
The inputs at the S slots are ground-truth visual tokens of the question's bounding boxes; the hidden
state one position before each slot is regressed onto that slot's visual token:
    loss = CE(text tokens of the response, no CE on <|lvr|> labels) + lam * MSE(h_before_slot, v_slot)
Slot targets: `pooled` (default) averages each box's merged visual tokens onto a fixed share of K
slots, so SFT trains exactly the K steps inference runs; `bbox` uses every merged token inside the
boxes (LVR's reference behaviour: S varies per sample and differs from inference's K).

    python lvr.py --model DIR --n 4      # decode a few test questions with a trained checkpoint
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import decode
import model as M
import parallel as P

MODES = ("normal", "drop", "noise", "noise_norm", "zero", "repeat")


# --------------------------------------------------------------------------------- forward pass
def image_features(model, pixel_values, image_grid_thw) -> torch.Tensor:
    """Merged visual tokens of all images, concatenated in batch order."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    return torch.cat(out.pooler_output, dim=0)


def embed(model, input_ids, pixel_values=None, image_grid_thw=None, latents=None, latent_mask=None, feats=None):
    """Token embeddings; merged visual tokens at image placeholders; given vectors at latent positions."""
    x = model.get_input_embeddings()(input_ids)
    if pixel_values is not None or feats is not None:
        feats = image_features(model, pixel_values, image_grid_thw) if feats is None else feats
        x = x.masked_scatter((input_ids == model.config.image_token_id)[..., None], feats.to(x.dtype))
    if latent_mask is not None and latent_mask.any():
        x = torch.where(latent_mask[..., None], latents.to(x.dtype), x)
    return x


def positions(model, input_ids, attention_mask, image_grid_thw):
    """3-D M-RoPE position ids (3, B, L) and, per sample, the next free position (B,)."""
    mm = (input_ids == model.config.image_token_id).int()
    pos, _ = model.model.get_rope_index(input_ids, mm, image_grid_thw, attention_mask=attention_mask)
    nxt = (pos.amax(dim=(0, 2)) + 1).to(input_ids.device)
    return pos.to(input_ids.device), nxt


def hidden(model, embeds, attention_mask, position_ids, cache=None):
    """Post-norm last hidden states of the language model (and the cache when one is passed). A 4-D boolean
    attention mask (blind_mask) is used as it is (made additive for eager attention)."""
    if attention_mask.dim() == 4 and model.model.language_model.config._attn_implementation == "eager":
        attention_mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
            ~attention_mask, torch.finfo(embeds.dtype).min)
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                     cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


# ------------------------------------------------------------------------------ image-blind masks
def post_span(tokens, lvr_end: int) -> torch.Tensor:
    """(N, T) bool: the positions from each row's first <|lvr_end|> on (the blind queries; module docstring)."""
    return (tokens == lvr_end).cumsum(1) > 0


def step_mask(attention_mask, image_keys, blind_rows) -> torch.Tensor:
    """The one-token decode step's (N, L) key mask: rows whose query is past their span (blind_rows, (N,))
    stop seeing the image keys (image_keys, (N, L) bool)."""
    return attention_mask * (~(image_keys & blind_rows[:, None])).to(attention_mask.dtype)


def blind_mask(attention_mask, image_keys, blind_queries) -> torch.Tensor:
    """(B, 1, L, L) bool (True: may attend) for a full forward: causal, padding keys masked, and the image
    keys hidden from the blind query positions (all three (B, L)). A row left with no key (a left-padding
    query) keeps its own position, so that no state becomes NaN."""
    L = attention_mask.shape[1]
    i = torch.arange(L, device=attention_mask.device)
    ok = (i[None, :] <= i[:, None])[None] & attention_mask.bool()[:, None, :]
    ok = ok & ~(blind_queries.bool()[:, :, None] & image_keys.bool()[:, None, :])
    ok = ok | (torch.eye(L, dtype=torch.bool, device=ok.device)[None] & ~ok.any(-1, keepdim=True))
    return ok[:, None]


def score_mask(model, ids, mask, completion, blind: bool):
    """The attention mask of a full forward over prompt + completion: the 2-D padding mask, or with `blind`
    the 4-D blind mask (the completion's positions from its first <|lvr_end|> on do not see the image)."""
    if not blind:
        return mask
    L0 = ids.shape[1] - completion.shape[1]
    blind_q = F.pad(post_span(completion, M.lvr_token_ids(model)["lvr_end_id"]), (L0, 0))
    return blind_mask(mask, ids == model.config.image_token_id, blind_q)


def score_forward(model, roll, vision_grad: bool = False, blind: bool = False) -> torch.Tensor:
    """One full forward over prompt + completion of every rollout, with the recorded latents put back as
    constants and the image and attention mask always passed.

    Returns (N, T, D): at completion position t, the post-norm hidden state one position earlier, the
    state whose logits predict token t and which, at a latent slot, was fed back as latent t. The visual
    tokens are the rollout's own (computed once per prompt while decoding); `vision_grad` runs the vision
    tower again, once per prompt, so that gradients reach it. `blind`: the image-blind interface (the
    positions from each rollout's first <|lvr_end|> on do not see the image)."""
    rp = row_prompt(roll)
    feats = roll.feats
    if vision_grad:
        feats = split_features(model, image_features(model, roll.prompt["pixel_values"], roll.prompt["image_grid_thw"]),
                               roll.prompt["image_grid_thw"], roll.images)
    ids = torch.cat([rp["input_ids"], roll.tokens], 1)
    mask = torch.cat([rp["attention_mask"], roll.mask.long()], 1)
    L0 = rp["input_ids"].shape[1]
    x = embed(model, ids, latents=F.pad(roll.latents, (0, 0, L0, 0)).detach(), latent_mask=F.pad(roll.latent_mask, (L0, 0)),
              feats=torch.cat([feats[p] for p in roll.prow.tolist()]))
    pos, _ = positions(model, ids, mask, rp["image_grid_thw"])
    return hidden(model, x, score_mask(model, ids, mask, roll.tokens, blind), pos)[:, L0 - 1:-1]


def structural_ids(model) -> list[int]:
    """Tokens never sampled as text: image/video placeholders, vision markers and the LVR tokens other than
    <|lvr_start|> (a span's slots and its closing <|lvr_end|> are always fed or forced by the decoder)."""
    cfg, ids = model.config, M.lvr_token_ids(model)
    return [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
            ids["lvr_id"], ids["lvr_latent_end_id"], ids["lvr_end_id"]]


# ---------------------------------------------------------------------------------------- decode
@dataclass
class Rollout:
    prompt: dict              # the encoded prompts, one row per question, images included
    images: list              # number of images of each prompt row
    prow: torch.Tensor        # (N,) cpu: the prompt row of each rollout (generate: rollout i*G+g -> prompt i)
    feats: list               # per prompt row: its images' merged visual tokens, as the decoder saw them
    tokens: torch.Tensor      # (N, T) ids; <|lvr|> at latent positions; pad after the end
    latents: torch.Tensor     # (N, T, D) the vectors fed at latent positions, zeros elsewhere
    latent_mask: torch.Tensor  # (N, T) bool
    mask: torch.Tensor        # (N, T) bool: real completion positions (EOS included)
    forced: torch.Tensor      # (N, T) bool: tokens the decoder put there, not sampled (<|lvr_end|>, forced opens)
    lvr_start: int            # the <|lvr_start|> id

    @property
    def opened(self) -> torch.Tensor:
        """(N,) bool: the sample opened at least one latent span."""
        return (self.tokens == self.lvr_start).any(1)

    def select(self, rows) -> "Rollout":
        """The rollouts `rows` (a slice or a list of indices), with only the prompts they come from."""
        idx = torch.arange(len(self.prow))[rows]
        used, prow = self.prow[idx].unique(return_inverse=True)
        used = used.tolist()
        dev = self.tokens.device
        return Rollout(select_prompt(self.prompt, used, self.images), [self.images[i] for i in used], prow,
                       [self.feats[i] for i in used], *(t[idx.to(dev)] for t in (self.tokens, self.latents,
                       self.latent_mask, self.mask, self.forced)), self.lvr_start)


def select_prompt(prompt: dict, rows: list[int], images: list[int], pixels: bool = True) -> dict:
    """Prompt rows `rows` (repeats allowed), each with its images (`images`: images per prompt row)."""
    grids = prompt["image_grid_thw"].split(images)
    out = {k: prompt[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["image_grid_thw"] = torch.cat([grids[r] for r in rows])
    if pixels:
        pix = prompt["pixel_values"].split([int(g.prod(-1).sum()) for g in grids])
        out["pixel_values"] = torch.cat([pix[r] for r in rows])
    return out


def row_prompt(roll: Rollout) -> dict:
    """Each rollout's prompt (ids, mask, grids; no pixels), row for row."""
    return select_prompt(roll.prompt, roll.prow.tolist(), roll.images, pixels=False)


def split_features(model, feats: torch.Tensor, grid_thw: torch.Tensor, images: list[int]) -> list[torch.Tensor]:
    """Concatenated merged visual tokens -> one tensor per prompt row (all of its images)."""
    per_image = (grid_thw.prod(-1) // model.config.vision_config.spatial_merge_size ** 2).tolist()
    counts = [sum(x) for x in (per_image[sum(images[:i]):sum(images[:i + 1])] for i in range(len(images)))]
    return list(feats.split(counts))


def cat_rollouts(rolls: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of several decode batches as one: prompts left-padded to one length, completions
    right-padded (positions follow the attention mask, so padding changes no position)."""
    if len(rolls) == 1:
        return rolls[0]
    L0, T = (max(r.prompt["input_ids"].shape[1] for r in rolls), max(r.tokens.shape[1] for r in rolls))
    left = lambda x, v: F.pad(x, (L0 - x.shape[1], 0), value=v)  # noqa: E731
    right = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
    prompt = {"input_ids": torch.cat([left(r.prompt["input_ids"], pad_id) for r in rolls]),
              **{k: torch.cat([left(r.prompt[k], 0) for r in rolls]) for k in ("attention_mask", "mm_token_type_ids")},
              **{k: torch.cat([r.prompt[k] for r in rolls]) for k in ("pixel_values", "image_grid_thw")}}
    offsets = [sum(len(r.images) for r in rolls[:i]) for i in range(len(rolls))]
    return Rollout(prompt, [n for r in rolls for n in r.images], torch.cat([r.prow + o for r, o in zip(rolls, offsets)]),
                   [f for r in rolls for f in r.feats], torch.cat([right(r.tokens, pad_id) for r in rolls]),
                   torch.cat([F.pad(r.latents, (0, 0, 0, T - r.latents.shape[1])) for r in rolls]),
                   *(torch.cat([right(getattr(r, k), False) for r in rolls]) for k in ("latent_mask", "mask", "forced")),
                   rolls[0].lvr_start)


def rollout_of(model, prompt: dict, tokens, latents, latent_mask, mask, G: int = 1, feats=None, forced=None) -> Rollout:
    """A Rollout from given completions (G per prompt row); the visual tokens computed when not given."""
    images = (prompt["input_ids"] == model.config.vision_start_token_id).sum(1).tolist()
    if feats is None:
        with torch.no_grad():
            feats = image_features(model, prompt["pixel_values"], prompt["image_grid_thw"])
    prow = torch.arange(len(images)).repeat_interleave(G)
    forced = torch.zeros_like(mask) if forced is None else forced
    return Rollout(prompt, images, prow, split_features(model, feats, prompt["image_grid_thw"], images), tokens,
                   latents, latent_mask, mask, forced, M.lvr_token_ids(model)["lvr_start_id"])


def sample_token(logits, temperature, top_p, u):
    """Temperature / nucleus sampling by inverse CDF: row i takes the first token whose cumulative
    probability passes u[i] (uniform in [0, 1)) times the row's kept mass, so a row's token depends only on
    its own logits and its own draw, never on the rest of the batch."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:], right=True)[:, 0]
    return pick.clamp(max=logits.shape[-1] - 1)


def draw(fn, generator, N: int, G: int, shape=(), device="cpu") -> torch.Tensor:
    """(N, *shape) random numbers (fn: torch.rand or torch.randn): from one generator for the whole batch,
    or, given a list with one generator per prompt row, G rows from each prompt's own generator, so that
    a group's rollouts do not depend on which prompts share its batch, rank or decode call."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([fn((G, *shape), generator=g, device=device) for g in generator])
    return fn((N, *shape), generator=generator, device=device)


def eos_ids(model, tok) -> list[int]:
    ids = {tok.convert_tokens_to_ids(data.IM_END)}
    eos = model.config.text_config.eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None and i >= 0)


CACHES = ("dynamic", "static", "graph")


def default_cache(device, sharded: bool = False) -> str:
    """The decoder `generate` uses when none is named: "graph" on CUDA (but "dynamic" for an FSDP-sharded
    model, whose every forward is a collective), "dynamic" elsewhere (on 2 CPU cores the static decoder's
    rollout of small-vl's default GRPO step took 0.18 s against the dynamic one's 0.11 s: the same rollouts)."""
    return "graph" if torch.device(device).type == "cuda" and not sharded else "dynamic"


_PROFILE = False  # bench.py --profile: label the phases of a decode step for torch.profiler
_COMPILE_STEP = False  # bench.py --profile --compile: torch.compile the static and graph decoders' step


def _span(name: str):
    return torch.profiler.record_function(name) if _PROFILE else contextlib.nullcontext()


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def generate(model, tok, prompt: dict, G: int = 1, max_new_tokens: int = 24, latent_steps: int = 8,
             mode: str = "normal", temperature: float = 0.0, top_p: float = 1.0, force=None,
             latent_exit: str = "fixed", generator=None, use_cache: bool = True, given=None,
             all_ranks: bool = False, cache: str | None = None, keep: bool = False, stats: dict | None = None,
             blind: bool = False) -> Rollout:
    """Batched latent decoding. `force` (N,) int per sample: 1 opens a span first, -1 never opens one.
    `given` (N, k, D): the vectors fed at a span's first k slots in place of the model's own (eval's oracle,
    shuffled and donor arms); slots past k feed the model's own. `blind`: the image-blind interface (module
    docstring). `generator`: one torch.Generator, or a list with one per prompt row (see `draw`).

    cache: "dynamic" (transformers' DynamicCache, a Python loop with host syncs; the reference), "static"
    (preallocated per-layer KV buffers written in place, a fixed-shape step without host syncs: see
    decode.py), "graph" (that same step captured once as a CUDA graph and replayed; CUDA only); None: the
    default_cache of the prompt's device. The three give the same rollouts, blind or not (tested on the CPU for
    static).
    keep=True keeps the static buffers (and the graph) on the model for the next call of the same shape.
    use_cache=False recomputes the whole sequence at every step (the test oracle for the cache).
    all_ranks=True (FSDP: every forward is a collective) keeps this rank stepping, feeding pad tokens,
    until the rows of every rank are done; trailing all-pad columns are dropped, so the result is the same.
    stats: a dict filled with prefill_s, decode_s (CUDA: synchronised) and steps (decode steps run)."""
    if mode not in MODES:
        raise ValueError(f"unknown latent mode {mode!r}; expected one of {MODES}")
    if latent_exit not in ("fixed", "learned"):
        raise ValueError(f"unknown latent_exit {latent_exit!r}; expected 'fixed' or 'learned'")
    dev = prompt["input_ids"].device
    auto = cache is None
    cache = default_cache(dev, P.is_sharded(model)) if auto else cache
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; expected one of {CACHES}")
    if cache == "graph" and dev.type != "cuda":
        raise ValueError(f"cache='graph' needs a CUDA device, the prompt is on {dev.type}: use cache='static' or 'dynamic'")
    if cache == "graph" and P.is_sharded(model):
        raise ValueError("cache='graph' cannot run an FSDP-sharded model (its forwards are collectives): use 'dynamic' or 'static'")
    if not use_cache:
        cache = "dynamic"
    ids = M.lvr_token_ids(model)
    start, lvr, lat_end, end = ids["lvr_start_id"], ids["lvr_id"], ids["lvr_latent_end_id"], ids["lvr_end_id"]
    K = 0 if mode == "drop" else latent_steps
    in_span_banned = [b for b in structural_ids(model) if b not in (end, lat_end)]
    eos = torch.tensor(eos_ids(model, tok))
    images_per_row = (prompt["input_ids"] == model.config.vision_start_token_id).sum(1).tolist()
    prow = torch.arange(len(images_per_row)).repeat_interleave(G)
    full = select_prompt(prompt, prow.tolist(), images_per_row, pixels=False)
    N = len(prow)
    force = torch.zeros(N, dtype=torch.long, device=dev) if force is None else force.to(dev)
    t0 = time.perf_counter()

    # prefill once per prompt, then repeat the cache G times
    pos, nxt = positions(model, prompt["input_ids"], prompt["attention_mask"], prompt["image_grid_thw"])
    feats = image_features(model, prompt["pixel_values"], prompt["image_grid_thw"])
    if cache != "dynamic":
        spec = dict(mode=mode, K=K, temperature=float(temperature), top_p=float(top_p), latent_exit=latent_exit,
                    start=start, lvr=lvr, lat_end=lat_end, end=end, pad=tok.pad_token_id,
                    eos=tuple(eos.long().tolist()), banned=tuple(in_span_banned),
                    given=None if given is None else tuple(given.shape[1:]), compiled=_COMPILE_STEP)
        try:
            with decode.rollout_weights(model, dev, keep):
                toks, vecs, lmask, real, forced, steps, t1 = decode.decode_static(
                    model, prompt, feats, pos, nxt, full["attention_mask"],
                    full["input_ids"] == model.config.image_token_id if blind else None, G, N, max_new_tokens, force,
                    given, generator, spec, cache == "graph", keep, all_ranks)
        except Exception as e:  # noqa: BLE001 - the default graph path falls back, an explicit request raises
            if not (auto and cache == "graph"):
                raise
            decode.release(model)
            warnings.warn(f"lvr.generate: the CUDA-graph decoder failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "decoding with cache='dynamic'")
            return generate(model, tok, prompt, G, max_new_tokens, latent_steps, mode, temperature, top_p, force,
                            latent_exit, generator, use_cache, given, all_ranks, "dynamic", keep, stats, blind)
    else:
        toks, vecs, lmask, real, forced, steps, t1 = _decode_dynamic(
            model, tok, prompt, full, feats, pos, nxt, G, N, max_new_tokens, force, given, generator, use_cache,
            all_ranks, images_per_row, prow, mode, K, temperature, top_p, latent_exit, in_span_banned, eos,
            (start, lvr, lat_end, end), blind)
    if stats is not None:
        _sync(dev)
        stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, steps=steps, cache=cache)
    T = int(real.any(0).nonzero().max()) + 1 if N else toks.shape[1]  # drop all-pad columns
    return rollout_of(model, prompt, toks[:, :T], vecs[:, :T], lmask[:, :T], real[:, :T], G, feats, forced[:, :T])


def _decode_dynamic(model, tok, prompt, full, feats, pos, nxt, G, N, max_new_tokens, force, given, generator, use_cache,
                    all_ranks, images_per_row, prow, mode, K, temperature, top_p, latent_exit, in_span_banned, eos, special, blind=False):
    """The reference decoder: transformers' DynamicCache (grown by concatenation every step), host-side
    boolean indexing of the logits and a `done` check every step. (N, T) tensors of the rollout, the
    number of steps run, and the time the prefill ended."""
    start, lvr, lat_end, end = special
    dev = prompt["input_ids"].device
    x = embed(model, prompt["input_ids"], feats=feats)
    cache = None
    if use_cache:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config.text_config)
    h = hidden(model, x, prompt["attention_mask"], pos, cache)[:, -1]
    if G > 1:
        h, nxt = h.repeat_interleave(G, 0), nxt.repeat_interleave(G, 0)
        if cache is not None:
            cache.batch_repeat_interleave(G)
    row_feats = None if use_cache else torch.cat([split_features(model, feats, prompt["image_grid_thw"],
                                                                 images_per_row)[p] for p in prow.tolist()])
    attn = full["attention_mask"]
    image_keys = full["input_ids"] == model.config.image_token_id  # grows with the completion (never image)
    seen_end = torch.zeros(N, dtype=torch.bool, device=dev)
    _sync(dev)
    t1 = time.perf_counter()

    toks, vecs, lmask, real, forced = [], [], [], [], []
    in_lat = torch.zeros(N, dtype=torch.bool, device=dev)
    left = torch.zeros(N, dtype=torch.long, device=dev)
    done = torch.zeros(N, dtype=torch.bool, device=dev)
    first = torch.zeros_like(h)
    for t in range(max_new_tokens):
        with _span("lvr.sample"):
            logits = model.lm_head(h).float()
            logits[:, in_span_banned] = float("-inf")
            for b in (end, lat_end):  # only in a span, where sampling them is a learned exit
                logits[~in_lat, b] = float("-inf")
            if t == 0:
                logits[force > 0] = float("-inf")
                logits[force > 0, start] = 0.0
            logits[force < 0, start] = float("-inf")
            u = draw(torch.rand, generator, N, G, device=dev) if temperature > 0 else None
            nxt_tok = sample_token(logits, temperature, top_p, u)
        learned_exit = (nxt_tok == end) | (nxt_tok == lat_end) if latent_exit == "learned" else torch.zeros_like(done)
        exit_now = in_lat & ((left == 0) | learned_exit)
        feed = in_lat & ~exit_now & ~done
        token = torch.where(exit_now, torch.full_like(nxt_tok, end), torch.where(feed, torch.full_like(nxt_tok, lvr), nxt_tok))
        token = torch.where(done, torch.full_like(token, tok.pad_token_id), token)
        slot = (K - left).clamp(0, max(K - 1, 0))  # the span's slot each row feeds now, when it feeds
        vec = latent_vector(h, mode, generator, G)
        if mode == "repeat":  # the span's first latent, fed again at every later slot
            first = torch.where((feed & (slot == 0))[:, None], h, first)
            vec = first
        if given is not None:
            own = given[torch.arange(N, device=dev), slot.clamp(max=given.shape[1] - 1)].to(h.dtype)
            vec = torch.where((slot < given.shape[1])[:, None], own, vec)
        entered = ~in_lat & ~done & (token == start)
        in_lat = (in_lat & feed) | entered
        left = torch.where(feed, left - 1, torch.where(entered, torch.full_like(left, K), left))
        toks.append(token)
        vecs.append(torch.where(feed[:, None], vec, torch.zeros_like(vec)))
        lmask.append(feed)
        real.append(~done)
        forced.append(exit_now | (entered & (force > 0) & (t == 0)))
        done = done | torch.isin(token, eos.to(dev))
        seen_end = seen_end | (token == end)  # the token fed now is a blind query from its span's end on
        finished = bool(done.all())
        if (P.all_true(finished) if all_ranks else finished) or t == max_new_tokens - 1:
            break
        step_x = torch.where(feed[:, None], vec.to(h.dtype), model.get_input_embeddings()(token))
        attn = torch.cat([attn, torch.ones(N, 1, dtype=attn.dtype, device=dev)], 1)
        image_keys = F.pad(image_keys, (0, 1))
        with _span("lvr.forward"):
            if use_cache:
                step = step_mask(attn, image_keys, seen_end) if blind else attn
                h = hidden(model, step_x[:, None], step, (nxt + t).view(1, N, 1).expand(3, N, 1), cache)[:, -1]
            else:
                h = recompute(model, full, row_feats, toks, vecs, lmask, attn, blind)
    return (*(torch.stack(x, 1) for x in (toks, vecs, lmask, real, forced)), len(toks), t1)


def recompute(model, full, feats, toks, vecs, lmask, attn, blind: bool = False):
    """The no-cache oracle: the whole sequence through the model again (with `blind`, under the 4-D blind
    mask); the last position's hidden state."""
    L0 = full["input_ids"].shape[1]
    ids = torch.cat([full["input_ids"], torch.stack(toks, 1)], 1)
    x = embed(model, ids, latents=F.pad(torch.stack(vecs, 1), (0, 0, L0, 0)),
              latent_mask=F.pad(torch.stack(lmask, 1), (L0, 0)), feats=feats)
    pos, _ = positions(model, ids, attn, full["image_grid_thw"])
    return hidden(model, x, score_mask(model, ids, attn, torch.stack(toks, 1), blind), pos)[:, -1]


def latent_vector(h, mode, generator=None, G: int = 1, noise=None):
    """The vector fed at a latent step: the hidden state itself, or noise in its place (`noise`: drawn
    already, as draw(torch.randn, generator, N, G, h.shape[1:]) would)."""
    if mode in ("normal", "drop", "repeat"):
        return h
    if mode == "zero":
        return torch.zeros_like(h)
    noise = draw(torch.randn, generator, h.shape[0], G, h.shape[1:], h.device).to(h.dtype) if noise is None else noise
    if mode == "noise":
        return noise
    return noise * (h.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------ stage-1 targets
def region_tokens(box, gh: int, gw: int) -> list[int]:
    """Raster indices of the merged-token cells (gh x gw grid) that overlap a normalised xyxy box."""
    x0, y0, x1, y1 = box
    c0, c1 = min(gw - 1, int(math.floor(x0 * gw))), max(int(math.floor(x0 * gw)), math.ceil(x1 * gw) - 1)
    r0, r1 = min(gh - 1, int(math.floor(y0 * gh))), max(int(math.floor(y0 * gh)), math.ceil(y1 * gh) - 1)
    return [r * gw + c for r in range(r0, min(r1, gh - 1) + 1) for c in range(c0, min(c1, gw - 1) + 1)]


def box_cells(model, sample) -> list[int]:
    """Raster indices of the merged visual tokens of a sample's first image whose cells overlap any of its
    boxes (region_tokens on the image's merged grid): the cells of its stage-1 targets."""
    grid = M.merged_grid(sample.load_image().shape, model)
    return sorted({c for b in sample.bboxes for c in region_tokens(b, *grid)})


def box_keys(input_ids, image_id: int, cells: list[list[int]]) -> torch.Tensor:
    """(B, L) bool: the positions of each row's image tokens whose raster index (the k-th image token of the
    row is merged visual token k of its first image) is in cells[row]."""
    out = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for i, c in enumerate(cells):
        out[i, (input_ids[i] == image_id).nonzero()[c, 0]] = True
    return out


def chunks(n: int, k: int) -> list[tuple[int, int]]:
    """Adaptive-average-pool windows that map n items onto k slots."""
    return [(math.floor(i * n / k), math.ceil((i + 1) * n / k)) for i in range(k)]


def slot_groups(bboxes, gh: int, gw: int, targets: str = "pooled", K: int = 8) -> list[list[int]]:
    """For each latent slot, the merged-token indices whose mean is its target."""
    regions = [region_tokens(b, gh, gw) for b in bboxes]
    if targets == "bbox":
        seen = sorted({i for r in regions for i in r})
        return [[i] for i in seen]
    if targets != "pooled":
        raise ValueError(f"unknown latent target {targets!r}; expected 'pooled' or 'bbox'")
    if len(regions) > K:
        regions = [sorted({i for r in regions for i in r})]
    shares = [K // len(regions) + (j < K % len(regions)) for j in range(len(regions))]
    return [r[a:b] for r, k in zip(regions, shares) for a, b in chunks(len(r), k)]


def oracle_latents(model, prompt: dict, samples, K: int = 8) -> torch.Tensor:
    """(rows, K, D): for each question, the pooled stage-1 targets of its boxes (its slots' visual tokens),
    to feed in place of generated latents: the oracle arm, an upper bound on what latents can carry."""
    if any(not s.bboxes for s in samples):
        raise ValueError("oracle latents need every question's bounding boxes (the synthetic data has them)")
    images = (prompt["input_ids"] == model.config.vision_start_token_id).sum(1).tolist()
    with torch.no_grad():
        feats = split_features(model, image_features(model, prompt["pixel_values"], prompt["image_grid_thw"]),
                               prompt["image_grid_thw"], images)
    out = []
    for s, f in zip(samples, feats):
        groups = slot_groups(s.bboxes, *M.merged_grid(s.load_image().shape, model), "pooled", K)
        out.append(torch.stack([f[g].mean(0) for g in groups]))
    return torch.stack(out)


def sft_batch(model, tok, samples, latent: list[bool], K: int | list[int] = 8,
              targets: str = "pooled") -> tuple[dict, torch.Tensor]:
    """Teacher-forcing batch: replies with a latent span where `latent[i]` (of K slots, or K[i] per sample),
    and the (S, n_image_tokens) matrix whose rows average the merged visual tokens that are each slot's target."""
    m = model.config.vision_config.spatial_merge_size
    Ks = K if isinstance(K, list) else [K] * len(samples)
    groups = [slot_groups(s.bboxes, *M.merged_grid(s.load_image().shape, model), targets, k) if use and s.bboxes else []
              for s, use, k in zip(samples, latent, Ks)]  # a sample without boxes (RL-style rows) gets no span
    batch = M.encode(model, tok, samples, [data.chat_response(s.answer, s.reason, len(g), s.response)
                                           for s, g in zip(samples, groups)])
    sizes = (batch["image_grid_thw"].prod(-1) // m ** 2).tolist()
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    W = torch.zeros(sum(map(len, groups)), sum(sizes))
    rows = [(offsets[i], idx) for i, g in enumerate(groups) for idx in g]
    for r, (off, idx) in enumerate(rows):
        W[r, [off + j for j in idx]] = 1.0 / len(idx)
    return batch, W


def sft_loss(model, batch: dict, slot_weights: torch.Tensor, lam: float = 0.1, blind: bool = False) -> dict:
    """CE on response text (no CE on <|lvr|> labels) + lam * MSE(hidden before each slot, its target).
    `blind` (train_sft.py --strict): under the image-blind mask, the reply from its span's <|lvr_end|> on
    does not see the image (a reply without a span sees it throughout).

    batch: encode() output with `labels`. slot_weights (S, n_image_tokens) maps the batch's merged
    visual tokens to the targets of its S `<|lvr|>` slots, in reading order (see sft_batch)."""
    ids = batch["input_ids"]
    feats = image_features(model, batch["pixel_values"], batch["image_grid_thw"])
    slot = ids == model.config.lvr_id
    latents = feats.new_zeros(*ids.shape, feats.shape[-1])
    targets = (slot_weights.to(feats.dtype) @ feats).detach()
    latents[slot] = targets  # row-major: the order of slot_weights' rows
    x = embed(model, ids, latents=latents, latent_mask=slot, feats=feats)
    pos, _ = positions(model, ids, batch["attention_mask"], batch["image_grid_thw"])
    h = hidden(model, x, score_mask(model, ids, batch["attention_mask"], ids, blind), pos)
    labels = batch["labels"][:, 1:].masked_fill(slot[:, 1:], -100)
    scored = labels != -100  # logits only where a text label is (not over the prompt and image)
    ce = F.cross_entropy(model.lm_head(h[:, :-1][scored]).float(), labels[scored]) if scored.any() else h.new_zeros(())
    before = torch.nonzero(slot[:, 1:], as_tuple=True)  # position p predicts slot p+1
    mse = F.mse_loss(h[:, :-1][before].float(), targets.float()) if slot.any() else h.new_zeros(())
    return {"loss": ce + lam * mse, "ce": ce, "mse": mse, "feats": feats,  # counts: what ce and mse average over
            "n_ce": int(scored.sum()), "n_mse": int(before[0].numel())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (train_sft.py / train_rl.py output)")
    p.add_argument("--n", type=int, default=4, help="number of test questions to decode")
    p.add_argument("--mode", default="normal", choices=MODES, help="latent intervention")
    M.add_device_args(p)
    a = p.parse_args()
    try:
        model, tok = M.load_model(a.model, M.DTYPES[M.resolve_dtype(a)], a.device)
    except M.ModelLoadError as e:
        raise SystemExit(f"error: {e}")
    samples = data.make_split("test", a.n)
    roll = generate(model, tok, {k: v.to(a.device) for k, v in M.encode(model, tok, samples).items()}, mode=a.mode)
    for s, t in zip(samples, roll.tokens):
        print(f"[{s.qtype}] answer {s.answer}: {tok.decode(t, skip_special_tokens=False)}")


if __name__ == "__main__":
    main()
