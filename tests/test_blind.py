"""The image-blind interface (CVRR's strict one): the mask hides exactly the image keys from exactly the
queries from a span's <|lvr_end|> on, checked against eager attention weights of a full forward; the decode
loop's blind path against a no-cache full recompute; the scoring forward and the fused attention share."""
import pytest
import torch
import torch.nn.functional as F

import lvr
import model as M
import reward

FORCE = torch.tensor([1, 0, 1, -1, 1])


def decode(m, tok, samples, **kw):
    kw = {"max_new_tokens": 12, "latent_steps": 3, "force": FORCE, **kw}
    return lvr.generate(m, tok, M.encode(m, tok, samples), **kw)


def expected_blind(ids, L0, end_id, image_id):
    """By hand: (query, key) pairs to hide: query at or after the row's first <|lvr_end|>, key an image token."""
    B, L = ids.shape
    hide = torch.zeros(B, L, L, dtype=torch.bool)
    for b in range(B):
        ends = [p for p in range(L0, L) if ids[b, p] == end_id]
        for qp in range(ends[0] if ends else L, L):
            for kp in range(L):
                hide[b, qp, kp] = bool(ids[b, kp] == image_id)
    return hide


def full_inputs(m, roll):
    rp = lvr.row_prompt(roll)
    L0 = rp["input_ids"].shape[1]
    ids = torch.cat([rp["input_ids"], roll.tokens], 1)
    mask = torch.cat([rp["attention_mask"], roll.mask.long()], 1)
    x = lvr.embed(m, ids, latents=F.pad(roll.latents, (0, 0, L0, 0)), latent_mask=F.pad(roll.latent_mask, (L0, 0)),
                  feats=torch.cat([roll.feats[p] for p in roll.prow.tolist()]))
    pos, _ = lvr.positions(m, ids, mask, rp["image_grid_thw"])
    return ids, mask, x, pos, L0


def test_blind_mask_hides_exactly_the_image_from_the_post_span_queries(tiny, samples):
    """Eager attention weights of a full forward under the 4-D mask: zero exactly where a post-span query
    meets an image key, positive on every other causal, real (query, key) pair; without the mask those
    pairs carry weight (the test is not vacuous)."""
    m, tok = tiny
    roll = decode(m, tok, samples, blind=True)
    ids, mask, x, pos, L0 = full_inputs(m, roll)
    cfg = m.config
    hide = expected_blind(ids, L0, cfg.lvr_end_id, cfg.image_token_id)
    assert hide.any() and hide.sum() < (ids == cfg.image_token_id).sum() * ids.shape[1]
    blind4 = lvr.score_mask(m, ids, mask, roll.tokens, blind=True)
    L = ids.shape[1]
    real = mask.bool()
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))[None] & real[:, None, :] & real[:, :, None]
    with reward.eager_attention(m), torch.no_grad():
        for am, masked in ((blind4, hide), (mask, torch.zeros_like(hide))):
            if am.dim() == 4:  # the eager path of lvr.hidden: additive
                am = torch.zeros(am.shape).masked_fill(~am, torch.finfo(torch.float32).min)
            out = m.model.language_model(inputs_embeds=x, attention_mask=am, position_ids=pos, output_attentions=True)
            for att in out.attentions:  # every layer, every head
                w = att.amax(1)  # (B, L, L): the largest weight over heads
                assert (w[allowed & masked] == 0).all()
                assert (w[allowed & ~masked] > 0).all()
                if not masked.any():
                    assert (w[allowed & hide] > 0).all()  # unmasked, the same pairs do see the image
    # the scoring forward (SDPA, boolean 4-D mask) gives the eager forward's states
    with torch.no_grad():
        h = lvr.score_forward(m, roll, blind=True)
        am = torch.zeros(blind4.shape).masked_fill(~blind4, torch.finfo(torch.float32).min)
        with reward.eager_attention(m):
            eager = m.model.language_model(inputs_embeds=x, attention_mask=am, position_ids=pos).last_hidden_state
    real_c = roll.mask
    assert (h[real_c] - eager[:, L0 - 1:-1][real_c]).abs().max() < 1e-4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_blind_decode_equals_full_recompute(tiny, samples, temperature):
    """The one-token steps' per-row key mask gives what a no-cache recompute under the 4-D mask gives; the
    scoring forward reproduces the fed latents and the greedy tokens; blind decoding is not normal decoding."""
    m, tok = tiny
    kw = dict(G=2, force=FORCE.repeat_interleave(2), temperature=temperature, top_p=0.9, blind=True)
    cached, full = (decode(m, tok, samples, generator=torch.Generator().manual_seed(3), use_cache=c, **kw)
                    for c in (True, False))
    assert cached.latent_mask.any() and (cached.tokens == m.config.lvr_end_id).any()
    assert torch.equal(cached.tokens, full.tokens) and torch.equal(cached.latent_mask, full.latent_mask)
    assert (cached.latents - full.latents).abs().max() < 1e-5
    h = lvr.score_forward(m, cached, blind=True)
    assert (h[cached.latent_mask] - cached.latents[cached.latent_mask]).abs().max() < 1e-5
    normal = decode(m, tok, samples, G=2, force=FORCE.repeat_interleave(2), temperature=temperature, top_p=0.9,
                    generator=torch.Generator().manual_seed(3))
    h_normal = lvr.score_forward(m, cached)
    post = lvr.post_span(cached.tokens, m.config.lvr_end_id) & cached.mask
    assert (h - h_normal)[post].abs().max() > 1e-4  # the blind states differ after the span ...
    pre = ~lvr.post_span(cached.tokens, m.config.lvr_end_id) & cached.mask
    assert (h - h_normal)[pre].abs().max() < 1e-5  # ... and nowhere before it
    if temperature == 0:
        logits = m.lm_head(h).float()
        logits[..., lvr.structural_ids(m)] = float("-inf")
        free = cached.mask & ~cached.forced & ~cached.latent_mask
        assert torch.equal(logits.argmax(-1)[free], cached.tokens[free])
    assert normal.tokens.shape[0] == cached.tokens.shape[0]


def test_step_mask_is_the_last_row_of_the_blind_mask():
    """The decode step's per-row key mask equals the last query row of the 4-D mask (for a real, later query)."""
    torch.manual_seed(0)
    attn = torch.ones(3, 7, dtype=torch.long)
    attn[0, :2] = 0
    image = torch.zeros(3, 7, dtype=torch.bool)
    image[:, 2:4] = True
    blind_rows = torch.tensor([True, False, True])
    blind_q = torch.zeros(3, 7, dtype=torch.bool)
    blind_q[:, -1] = blind_rows
    four = lvr.blind_mask(attn, image, blind_q)[:, 0, -1]
    assert torch.equal(lvr.step_mask(attn, image, blind_rows), four.long())


def test_fused_attention_share_respects_the_blind_mask(tiny, samples):
    """r_attn (and the relative variant's image mass) under the blind mask, fused, equals the naive share from
    eager attention weights of the same masked forward."""
    m, tok = tiny
    roll = decode(m, tok, samples, blind=True, force=torch.ones(5, dtype=torch.long))
    with torch.no_grad():
        _, fused = reward.score_rollout(m, roll, [0, 1], blind=True)
        ids, mask, x, pos, L0 = full_inputs(m, roll)
        b4 = lvr.score_mask(m, ids, mask, roll.tokens, blind=True)
        am = torch.zeros(b4.shape).masked_fill(~b4, torch.finfo(torch.float32).min)
        with reward.eager_attention(m):
            att = m.model.language_model(inputs_embeds=x, attention_mask=am, position_ids=pos, output_attentions=True).attentions
    keys, queries = reward.span_masks(roll.tokens, roll.latent_mask, roll.mask, m.config.lvr_start_id, m.config.lvr_end_id)
    pad = lambda t: F.pad(t, (L0, 0))  # noqa: E731
    naive = torch.stack([reward.attention_share_naive(att[layer], pad(queries), pad(keys)) for layer in (0, 1)]).mean(0)
    assert fused.min() > 0 and (fused - naive).abs().max() < 1e-5
