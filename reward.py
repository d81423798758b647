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
import torch.nn.functional as F
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


def sequence_masks(prompt: dict, tokens, completion_mask, cfg, blind: bool):
    """Over prompt + completion: (pad: a completion-length (N, T) mask to full length, the attention mask,
    the image keys, attention_share's keywords of the image-blind interface ({} without `blind`))."""
    pad = lambda m: F.pad(m, (prompt["input_ids"].shape[1], 0))  # noqa: E731
    full_mask = torch.cat([prompt["attention_mask"], completion_mask.long()], 1)
    image = torch.cat([prompt["input_ids"], tokens], 1) == cfg.image_token_id
    hide = dict(hidden_keys=image, blind_queries=pad(lvr.post_span(tokens, cfg.lvr_end_id))) if blind else {}
    return pad, full_mask, image, hide


def attention_reward(qk: dict, prompt: dict, tokens, latent_mask, completion_mask, cfg,
                     variant: str = "share", blind: bool = False) -> torch.Tensor:
    """r_attn per rollout from captured {layer: (q, k)} of a scoring forward over prompt + completion;
    prompt: each rollout's prompt ids and mask (lvr.row_prompt); cfg: the model's config (token ids).
    `blind`: the forward ran under the image-blind mask, so the image keys are hidden from the post-span queries."""
    if variant not in ("share", "relative"):
        raise ValueError(f"unknown attention reward variant {variant!r}; expected 'share' or 'relative'")
    keys, queries = span_masks(tokens, latent_mask, completion_mask, cfg.lvr_start_id, cfg.lvr_end_id)
    pad, full_mask, image, hide = sequence_masks(prompt, tokens, completion_mask, cfg, blind)
    out, share = [], share_fn(tokens.device)
    for q, k in qk.values():
        r = share(q.detach(), k.detach(), pad(queries), pad(keys), full_mask, **hide)
        if variant == "relative":
            r = r / share(q.detach(), k.detach(), pad(queries), image, full_mask, **hide).clamp(min=1e-6)
        out.append(r)
    return torch.stack(out).mean(0) * keys.any(1)


def answer_mask(tokens, latent_mask, mask, cfg) -> torch.Tensor:
    """(N, T) bool: each reply's answer tokens: its real tokens after its last <|lvr_end|> (all of them when
    it has none: no span, or one left open), latent slots and <|lvr_start|> / <|lvr_end|> excluded; EOS included."""
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
    last_end = torch.where(tokens == cfg.lvr_end_id, pos, -1).amax(1)
    markers = (tokens == cfg.lvr_start_id) | (tokens == cfg.lvr_end_id)
    return (pos > last_end[:, None]) & mask & ~latent_mask & ~markers


def grounding(qk: dict, prompt: dict, tokens, latent_mask, completion_mask, cfg, box, blind: bool = False) -> torch.Tensor:
    """(N, layers) per rollout and captured layer (in layer order): of the attention its answer tokens
    (answer_mask) pay to the prompt's image tokens, the share on `box`'s ((N, L0) bool over the prompt: the
    visual tokens inside the question's boxes, lvr.box_keys), heads and answer tokens averaged:
    mean mass on the box keys / mean mass on all image keys. NaN where the answer tokens pay the image
    nothing: no answer token, or under `blind` after a span (the blind interface hides the image from them)."""
    queries = answer_mask(tokens, latent_mask, completion_mask, cfg)
    pad, full_mask, image, hide = sequence_masks(prompt, tokens, completion_mask, cfg, blind)
    out = []
    for layer in sorted(qk):
        q, k = (x.detach() for x in qk[layer])
        on_box = attention_share(q, k, pad(queries), F.pad(box, (0, tokens.shape[1])), full_mask, **hide)
        on_image = attention_share(q, k, pad(queries), image, full_mask, **hide)
        out.append(torch.where(on_image > 0, on_box / on_image, float("nan")))
    return torch.stack(out, 1)


def score_rollout(model, roll, layers, variant: str = "share", vision_grad: bool = False, blind: bool = False,
                  cells: list[list[int]] | None = None):
    """The scoring forward of a rollout (lvr.score_forward) and, fused into it, r_attn at `layers`:
    (hidden states predicting each completion position, r_attn per rollout; zeros without layers).
    `blind`: both under the image-blind mask (lvr.py). With `cells` (per prompt row of roll.prompt, the
    raster indices of its boxes' visual tokens, lvr.box_cells) every decoder layer is captured and the
    grounding per layer ((N, layers), grounding()) comes third, from the same forward."""
    every = range(model.config.text_config.num_hidden_layers) if cells is not None else layers
    with capture_qk(model, sorted(set(layers) | set(every))) as qk:
        h = lvr.score_forward(model, roll, vision_grad, blind)
    rp = lvr.row_prompt(roll)
    r = attention_reward({l: qk[l] for l in layers}, rp, roll.tokens, roll.latent_mask, roll.mask, model.config, variant,
                         blind) if layers else torch.zeros(roll.tokens.shape[0], device=h.device)
    if cells is None:
        return h, r
    box = lvr.box_keys(roll.prompt["input_ids"], model.config.image_token_id, cells)[roll.prow.to(h.device)]
    return h, r, grounding(qk, rp, roll.tokens, roll.latent_mask, roll.mask, model.config, box, blind)


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


# ------------------------------------------------------------------------ evidence loss (ReaLVR)
# Implemented from the paper's description only (arXiv 2609.34563; its code is under a non-commercial
# licence and was not read). For a rollout with a latent span, over the slots t of its first span:
#     g_t = cos(z_t, p+) - max_j cos(z_t, p-_j)
#     w_t = eta / K + (1 - eta) [r+_t - r-_t]_+              (detached)
#     loss = lambda_ev * sum_t w_t [m - g_t]_+               (averaged over the rollouts it applies to)
# z_t: the latent regenerated with gradient: the policy's state that produces slot t in the scoring forward
# (the recorded earlier latents as inputs, as every scorer here takes them); on-policy it equals the
# recorded latent. p+: the mean of the question's merged visual tokens inside its boxes; p-: the same
# prototypes of the other questions of the step (none: the margin is cos(z_t, p+) alone). r+_t: the
# answer-to-latent attention on slot t (layers `att_layers`, heads averaged, mean over the answer tokens)
# with the gold answer teacher-forced after the span; r-_t: the same with each of the group's wrong replies
# (what followed their span, or the whole reply without one; deduplicated) after this span, averaged; 0
# without one. K: the span's slots. Questions without boxes (RL rows of real data) take no part.
def box_prototypes(model, feats: list, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) p+ of each prompt row (the mean of its first image's merged visual tokens inside the question's
    boxes, detached) and (P,) bool: the question has boxes."""
    protos, has = [], []
    for f, s in zip(feats, samples):
        if s.bboxes:
            protos.append(f[lvr.box_cells(model, s)].float().mean(0))
        else:
            protos.append(f.new_zeros(f.shape[-1], dtype=torch.float32))
        has.append(bool(s.bboxes))
    return torch.stack(protos).detach(), torch.tensor(has, device=protos[0].device)


def first_span(tokens, latent_mask, lvr_end: int) -> torch.Tensor:
    """(N, T) bool: the latent slots of each row's first span (before its first <|lvr_end|>)."""
    return latent_mask & ~lvr.post_span(tokens, lvr_end)


def evidence_margin(z, slots, prow, protos, has_box) -> torch.Tensor:
    """(N, T) g_t = cos(z_t, p+) - max over the other questions' p- of cos(z_t, p-) at `slots` (0 elsewhere).
    z (N, T, D); prow (N,) each row's prompt row; protos (P, D); has_box (P,)."""
    zn = F.normalize(z.float(), dim=-1)
    pn = F.normalize(protos.float(), dim=-1)
    cos = zn @ pn.T  # (N, T, P)
    pos = cos.gather(-1, prow[:, None, None].expand(-1, cos.shape[1], 1))[..., 0]
    other = has_box[None, :] & (torch.arange(len(protos), device=z.device)[None, :] != prow[:, None])  # (N, P)
    neg = cos.masked_fill(~other[:, None, :], float("-inf")).amax(-1)
    neg = torch.where(other.any(1)[:, None], neg, torch.zeros_like(neg))
    return torch.where(slots, pos - neg, torch.zeros_like(pos))


def evidence_slot_weights(r_pos, r_neg, slots, eta: float) -> torch.Tensor:
    """(N, T) w_t = eta / K + (1 - eta) [r+_t - r-_t]_+ at the span's K slots, 0 elsewhere."""
    K = slots.sum(1, keepdim=True).clamp(min=1)
    return torch.where(slots, eta / K + (1 - eta) * (r_pos - r_neg).clamp(min=0), torch.zeros_like(r_pos))


def evidence_loss(g, w, row_weight, margin: float) -> torch.Tensor:
    """sum over rows of row_weight * sum_t w_t [m - g_t]_+ (w is 0 off the slots; row_weight: lambda_ev / the
    number of rollouts the loss applies to in the whole batch, 0 for the others, so micro-batches add up)."""
    return (row_weight[:, None] * w * (margin - g).clamp(min=0)).sum()


def _answers_after(roll, slots, answers: list[list[int]], rows: list[int], lvr_end: int, pad_id: int):
    """Teacher-forced rollouts: row rows[i]'s completion up to its first <|lvr_end|> (its first span), then
    answers[i]; and the (n, T) masks of the answer positions and of the span's slots."""
    prefix = [int(lvr.post_span(roll.tokens[r:r + 1], lvr_end)[0].float().argmax()) + 1 for r in rows]
    T = max(p + len(a) for p, a in zip(prefix, answers))
    dev, D = roll.tokens.device, roll.latents.shape[-1]
    tokens = torch.full((len(rows), T), pad_id, dtype=roll.tokens.dtype, device=dev)
    latents = roll.latents.new_zeros(len(rows), T, D)
    lmask = torch.zeros(len(rows), T, dtype=torch.bool, device=dev)
    mask, answer = lmask.clone(), lmask.clone()
    for i, (r, p, a) in enumerate(zip(rows, prefix, answers)):
        tokens[i, :p], latents[i, :p], lmask[i, :p] = roll.tokens[r, :p], roll.latents[r, :p], slots[r, :p]
        tokens[i, p:p + len(a)] = torch.tensor(a, dtype=tokens.dtype, device=dev)
        mask[i, :p + len(a)], answer[i, p:p + len(a)] = True, True
    sub = roll.select(rows)
    return lvr.Rollout(sub.prompt, sub.images, sub.prow, sub.feats, tokens, latents, lmask, mask,
                       torch.zeros_like(mask), roll.lvr_start), answer, lmask


@torch.no_grad()
def slot_attention(model, roll, answer_mask, slot_mask, layers, blind: bool = False, chunk: int = 64) -> torch.Tensor:
    """(N, T) per slot of slot_mask: the mean over answer_mask's positions of the head-averaged attention on
    that slot (averaged over `layers`), from the scoring forward of `roll`; `chunk` rows at a time."""
    out = torch.zeros(slot_mask.shape, dtype=torch.float32, device=slot_mask.device)
    for c0 in range(0, slot_mask.shape[0], chunk):
        sub = roll.select(slice(c0, c0 + chunk))
        with capture_qk(model, layers) as qk:
            lvr.score_forward(model, sub, blind=blind)
        rp = lvr.row_prompt(sub)
        L0 = rp["input_ids"].shape[1]
        full = torch.cat([rp["attention_mask"], sub.mask.long()], 1)
        pad = lambda m: F.pad(m, (L0, 0))  # noqa: E731
        hide = dict(hidden_keys=torch.cat([rp["input_ids"], sub.tokens], 1) == model.config.image_token_id,
                    blind_queries=pad(lvr.post_span(sub.tokens, model.config.lvr_end_id))) if blind else {}
        sm, am = slot_mask[c0:c0 + chunk], answer_mask[c0:c0 + chunk]
        for t in range(sm.shape[1]):
            if not sm[:, t].any():
                continue
            key = torch.zeros_like(sm)
            key[:, t] = sm[:, t]
            share = torch.stack([attention_share(q.detach(), k.detach(), pad(am), pad(key), full, **hide)
                                 for q, k in qk.values()]).mean(0)
            out[c0:c0 + chunk, t] = torch.where(sm[:, t], share, 0.0)
    return out


@torch.no_grad()
def evidence_setup(model, tok, roll, samples, correct, G: int, layers, eta: float, blind: bool = False,
                   chunk: int = 64) -> dict:
    """What the evidence loss needs of a step's rollouts, before the update: p+ per prompt row, which rows
    take part (a span and boxes), the slots of their first span and the detached slot weights w."""
    cfg = model.config
    protos, has_box = box_prototypes(model, roll.feats, samples)
    slots = first_span(roll.tokens, roll.latent_mask, cfg.lvr_end_id)
    prow = roll.prow.to(roll.tokens.device)
    closed = (roll.tokens == cfg.lvr_end_id).any(1)
    rows = [i for i in range(len(prow)) if bool(slots[i].any()) and bool(closed[i]) and bool(has_box[prow[i]])]
    r_pos = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)
    r_neg = torch.zeros_like(r_pos)
    if rows:
        after = lvr.post_span(roll.tokens, cfg.lvr_end_id) & roll.mask
        tail = lambda i: roll.tokens[i][(after[i] if roll.opened[i] else roll.mask[i]) & ~(roll.tokens[i] == cfg.lvr_end_id)]  # noqa: E731
        wrong = {}
        for i in range(len(prow)):
            if not correct[i] and len(tail(i)):
                wrong.setdefault(int(prow[i]), {})[tuple(tail(i).tolist())] = None
        gold = {}
        for q, s in enumerate(samples):
            reply = data.chat_response(s.answer, s.reason, 0, s.response)
            gold[q] = tok(reply, add_special_tokens=False)["input_ids"]
        seqs, owner = [], []
        for i in rows:
            seqs.append(gold[int(prow[i])])
            owner.append((i, True))
            for w in wrong.get(int(prow[i]), {}):
                seqs.append(list(w))
                owner.append((i, False))
        tf, answer, smask = _answers_after(roll, slots, seqs, [i for i, _ in owner], cfg.lvr_end_id, tok.pad_token_id)
        att = slot_attention(model, tf, answer, smask, layers, blind, chunk)
        counts = torch.zeros(len(prow), device=slots.device)
        for j, (i, is_gold) in enumerate(owner):
            T = min(att.shape[1], r_pos.shape[1])
            if is_gold:
                r_pos[i, :T] = att[j, :T]
            else:
                r_neg[i, :T] += att[j, :T]
                counts[i] += 1
        r_neg = r_neg / counts.clamp(min=1)[:, None]
    take = torch.zeros(len(prow), dtype=torch.bool, device=slots.device)
    take[rows] = True
    slots = slots & take[:, None]
    return {"protos": protos, "has_box": has_box, "slots": slots, "take": take,
            "w": evidence_slot_weights(r_pos, r_neg, slots, eta), "r_pos": r_pos, "r_neg": r_neg}
