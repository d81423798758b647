"""Answer parsing, the accuracy / format / length rewards, and the attention reward on latent tokens.

Attention reward (silent-lvr's recipe; SPEC.md). For a rollout with a latent span, at decoder layer l
(default 0, the first), with A = softmax(q k^T / sqrt(d)) over all keys in fp32 (causal, padding
masked) and averaged over heads:

    r_attn = mean over query positions t  of  sum over latent keys j  of  A[t, j]

keys j: the latent slots of every span (strictly between <|lvr_start|> and <|lvr_end|>, markers
excluded); queries t: every real, non-latent completion position after
max(last <|lvr_end|>, first <|lvr_start|> + number of latent slots), to the end (answer and EOS
included), as silent-lvr's code places them; a rollout without <|lvr_start|> has none. Our mask is
causal (a query never sees later keys; their code may lack the mask on one path). Several layers: their
r_attn averaged. With two spans the sum runs over both spans' slots, so r_attn grows with the number of
spans (train_rl.py logs how often rollouts open more than one). Variant "relative":
r_attn divided by the same mass on the image tokens. A rollout without a span gets 0 (no_latent="zero",
the paper), or its group's mean r_attn over the rollouts that have one ("neutral": after the group
normalisation of GRPO it is pushed neither way). The reward is a constant (no gradient flows through it).

Fused: the chosen layers' post-RoPE q and k are captured from the scoring forward GRPO already runs (a
registered attention function that records them and calls SDPA); only the query rows are scored,
against all keys in chunks with a streaming logsumexp, so B x H x L x L is never formed. Naive oracle:
eager attention with output_attentions=True, used by the tests and bench.py.

Total reward: R = acc_w * accuracy + format_w * format - len_w * (tokens beyond the shortest correct
response seen so far for that question) + att_w * r_attn.

    python reward.py "<|lvr_start|>junk<|lvr_end|> left <answer>B</answer>"   # parse one response
"""
from __future__ import annotations

import contextlib
import math
import re
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import data
import lvr

SPAN_RE = re.compile(re.escape(data.LVR_START) + r".*?(?:" + re.escape(data.LVR_END) + r"|$)", re.S)
TAGGED_RE = re.compile(r"<answer>\s*\(?([A-Z])\)?\s*</answer>")
OPEN_TAG_RE = re.compile(r"<answer>\s*\(?([A-Z])\b")
BARE_RE = re.compile(r"(?:^|[\s:(])\(?([A-Z])\)?\.?\s*$")
END_TOKENS = re.compile("|".join(re.escape(t) for t in (data.IM_END, "<|endoftext|>")))


# ----------------------------------------------------------------------------------- parsing
def strip_latent_spans(text: str) -> str:
    """Drop everything from each <|lvr_start|> to its <|lvr_end|> (or to the end when unclosed)."""
    return SPAN_RE.sub(" ", text)


def parse_answer(text: str) -> str | None:
    """The answer letter of a response: the last <answer>X</answer>; failing that an unclosed
    <answer>X, or a lone letter ending the response. Text inside latent spans is ignored."""
    t = END_TOKENS.sub(" ", strip_latent_spans(text))
    for pattern in (TAGGED_RE, OPEN_TAG_RE):
        found = pattern.findall(t)
        if found:
            return found[-1]
    m = BARE_RE.search(t.strip())
    return m.group(1) if m else None


def has_format(text: str) -> bool:
    """Exactly one well-formed <answer>X</answer> outside latent spans, and spans closed."""
    closed = text.count(data.LVR_START) == text.count(data.LVR_END)
    return closed and len(TAGGED_RE.findall(strip_latent_spans(text))) == 1


class LengthPenalty:
    """Tokens beyond the shortest correct response seen so far for the same question (0 until one is)."""

    def __init__(self):
        self.best: dict[str, int] = {}

    def __call__(self, qids, lengths, correct) -> torch.Tensor:
        for q, n, ok in zip(qids, lengths, correct):
            if ok:
                self.best[q] = min(n, self.best.get(q, n))
        return torch.tensor([float(max(0, n - self.best[q])) if q in self.best else 0.0 for q, n in zip(qids, lengths)])


# ---------------------------------------------------------------------------- attention reward
CAPTURE = "lvr_capture"
_store: dict = {"layers": (), "qk": {}}


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    if getattr(module, "layer_idx", None) in _store["layers"]:
        _store["qk"][module.layer_idx] = (query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


@contextlib.contextmanager
def capture_qk(model, layers):
    """Within the block, forwards of the language model record {layer: (q, k)} (post-RoPE, q: B,H,L,d;
    k: B,Hkv,L,d); attention itself still runs through SDPA."""
    cfg = model.model.language_model.config
    old, _store["layers"], _store["qk"] = cfg._attn_implementation, tuple(layers), {}
    cfg._attn_implementation = CAPTURE
    try:
        yield _store["qk"]
    finally:
        cfg._attn_implementation, _store["layers"] = old, ()


@contextlib.contextmanager
def eager_attention(model):
    cfg = model.model.language_model.config
    old, cfg._attn_implementation = cfg._attn_implementation, "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = old


def span_masks(tokens, latent_mask, mask, lvr_start: int, lvr_end: int):
    """(keys, queries) over the completion (module docstring): the latent slots, and the real non-latent
    positions after max(last <|lvr_end|>, first <|lvr_start|> + number of latent slots)."""
    T = tokens.shape[1]
    pos = torch.arange(T, device=tokens.device)[None]
    first_start = torch.where(tokens == lvr_start, pos, T).amin(1)
    last_end = torch.where(tokens == lvr_end, pos, -1).amax(1)
    begin = torch.maximum(last_end, first_start + latent_mask.sum(1))
    return latent_mask, (pos > begin[:, None]) & mask & ~latent_mask


def attention_share(q, k, query_mask, key_mask, attention_mask, chunk: int = 256, hidden_keys=None,
                    blind_queries=None) -> torch.Tensor:
    """Per row, the mean over query positions of the head-averaged softmax mass on key_mask's keys.

    q (B,H,L,d), k (B,Hkv,L,d) post-RoPE; masks (B,L) bool over the full sequence. Streaming logsumexp
    over key chunks; memory O(B*H*Tq*chunk) with Tq the most query rows of any sample. `hidden_keys` and
    `blind_queries` (B,L) bool: the image-blind interface (lvr.blind_mask), those keys hidden from those queries."""
    B, H, L, d = q.shape
    Hkv = k.shape[1]
    nq = query_mask.sum(1)
    Tq = int(nq.max()) if B else 0
    if Tq == 0:
        return q.new_zeros(B, dtype=torch.float32)
    # query row positions, left-aligned; padded slots point at position 0 and are ignored
    order = torch.sort((~query_mask).long(), dim=1, stable=True).indices[:, :Tq]
    valid = torch.arange(Tq, device=q.device)[None] < nq[:, None]
    qs = q.gather(2, order[:, None, :, None].expand(B, H, Tq, d)).float().view(B, Hkv, H // Hkv, Tq, d) / math.sqrt(d)
    lse_all = q.new_full((B, Hkv, H // Hkv, Tq), float("-inf"), dtype=torch.float32)
    lse_key = lse_all.clone()
    for c0 in range(0, L, chunk):
        kc = k[:, :, c0:c0 + chunk].float()
        s = torch.einsum("bhgtd,bhcd->bhgtc", qs, kc)
        kpos = torch.arange(c0, c0 + kc.shape[2], device=q.device)
        ok = (kpos[None, None] <= order[:, :, None]) & attention_mask[:, None, c0:c0 + kc.shape[2]].bool()
        if hidden_keys is not None:
            ok = ok & ~(blind_queries.gather(1, order)[:, :, None] & hidden_keys[:, None, c0:c0 + kc.shape[2]])
        s = s.masked_fill(~ok[:, None, None], float("-inf"))
        lse_all = torch.logaddexp(lse_all, s.logsumexp(-1))
        on_key = ok & key_mask[:, None, c0:c0 + kc.shape[2]]
        lse_key = torch.logaddexp(lse_key, s.masked_fill(~on_key[:, None, None], float("-inf")).logsumexp(-1))
    share = torch.exp(lse_key - lse_all).mean(dim=(1, 2))  # (B, Tq), heads averaged
    return torch.where(valid, share, 0.0).sum(1) / nq.clamp(min=1)  # padded slots may be NaN (no keys)


_compiled = {}


def share_fn(device: torch.device):
    """attention_share, compiled with torch.compile on CUDA (eager on CPU, where compiling does not pay)."""
    if device.type != "cuda":
        return attention_share
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(attention_share, dynamic=True)
    return _compiled["fn"]


def attention_share_naive(attn: torch.Tensor, query_mask, key_mask) -> torch.Tensor:
    """The same from a full (B,H,L,L) attention matrix: the oracle."""
    mass = (attn.float() * key_mask[:, None, None, :]).sum(-1).mean(1)  # (B, L)
    return (mass * query_mask).sum(1) / query_mask.sum(1).clamp(min=1)


def attention_reward(qk: dict, prompt: dict, tokens, latent_mask, completion_mask, cfg,
                     variant: str = "share", blind: bool = False) -> torch.Tensor:
    """r_attn per rollout from captured {layer: (q, k)} of a scoring forward over prompt + completion;
    prompt: each rollout's prompt ids and mask (lvr.row_prompt); cfg: the model's config (token ids).
    `blind`: the forward ran under the image-blind mask, so the image keys are hidden from the post-span queries."""
    if variant not in ("share", "relative"):
        raise ValueError(f"unknown attention reward variant {variant!r}; expected 'share' or 'relative'")
    keys, queries = span_masks(tokens, latent_mask, completion_mask, cfg.lvr_start_id, cfg.lvr_end_id)
    pad = lambda m: torch.cat([torch.zeros_like(prompt["attention_mask"], dtype=torch.bool), m], 1)  # noqa: E731
    full_mask = torch.cat([prompt["attention_mask"], completion_mask.long()], 1)
    image = torch.cat([prompt["input_ids"], tokens], 1) == cfg.image_token_id
    out, share = [], share_fn(tokens.device)
    hide = dict(hidden_keys=image, blind_queries=pad(lvr.post_span(tokens, cfg.lvr_end_id))) if blind else {}
    for q, k in qk.values():
        r = share(q.detach(), k.detach(), pad(queries), pad(keys), full_mask, **hide)
        if variant == "relative":
            r = r / share(q.detach(), k.detach(), pad(queries), image, full_mask, **hide).clamp(min=1e-6)
        out.append(r)
    return torch.stack(out).mean(0) * keys.any(1)


def score_rollout(model, roll, layers, variant: str = "share", vision_grad: bool = False, blind: bool = False):
    """The scoring forward of a rollout (lvr.score_forward) and, fused into it, r_attn at `layers`:
    (hidden states predicting each completion position, r_attn per rollout; zeros without layers).
    `blind`: both under the image-blind mask (lvr.py)."""
    with capture_qk(model, layers) as qk:
        h = lvr.score_forward(model, roll, vision_grad, blind)
    if not layers:
        return h, torch.zeros(roll.tokens.shape[0], device=h.device)
    return h, attention_reward(qk, lvr.row_prompt(roll), roll.tokens, roll.latent_mask, roll.mask, model.config, variant,
                               blind)


def no_latent_fill(r_attn: torch.Tensor, opened: torch.Tensor, G: int, mode: str) -> torch.Tensor:
    """'zero': rollouts without a span keep 0; 'neutral': they get their group's mean over those with one."""
    if mode == "zero":
        return r_attn
    if mode != "neutral":
        raise ValueError(f"unknown no-latent mode {mode!r}; expected 'zero' or 'neutral'")
    r, o = r_attn.view(-1, G), opened.view(-1, G).float()
    mean = (r * o).sum(1, keepdim=True) / o.sum(1, keepdim=True).clamp(min=1)
    return torch.where(o.bool(), r, mean.expand_as(r)).reshape(-1)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(repr(arg), "->", parse_answer(arg), "format ok" if has_format(arg) else "bad format")
