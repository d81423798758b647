"""Answer parsing, rewards, and the fused attention reward against the eager output_attentions oracle."""
import pytest
import torch
import torch.nn.functional as F

import lvr
import model as M
import reward


@pytest.mark.parametrize("text, letter", [
    ("<|lvr_start|><|lvr|><|lvr_end|> red square <answer>B</answer><|im_end|>", "B"),
    ("<answer> C </answer>", "C"),
    ("<|lvr_start|> <answer>A</answer> junk <|lvr_end|> <answer>D</answer>", "D"),  # junk inside the span
    ("<|lvr_start|> <answer>A</answer> never closed", None),
    ("the answer is <answer>B", "B"),  # missing closing tag
    ("left\nB", "B"),  # no tags at all: a lone letter at the end
    ("(C)", "C"),
    ("I think it is left", None),
    ("", None),
])
def test_parse_answer(text, letter):
    assert reward.parse_answer(text) == letter


def test_format_reward():
    assert reward.has_format("<|lvr_start|>x<|lvr_end|> red <answer>B</answer>")
    assert not reward.has_format("<|lvr_start|>x red <answer>B</answer>")  # span never closed
    assert not reward.has_format("<answer>B</answer><answer>C</answer>")
    assert not reward.has_format("B")


def test_length_penalty_counts_from_the_shortest_correct_so_far():
    pen = reward.LengthPenalty()
    assert pen(["q1", "q1", "q2"], [10, 7, 5], [False, True, False]).tolist() == [3.0, 0.0, 0.0]
    assert pen(["q1", "q2"], [9, 8], [True, True]).tolist() == [2.0, 0.0]


def test_no_latent_rollouts_neutral_or_zero():
    r = torch.tensor([0.4, 0.0, 0.2, 0.0, 0.0, 0.0])
    opened = torch.tensor([True, False, True, False, False, False])
    assert reward.no_latent_fill(r, opened, 3, "zero").tolist() == r.tolist()
    assert torch.allclose(reward.no_latent_fill(r, opened, 3, "neutral"), torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="no-latent mode"):
        reward.no_latent_fill(r, opened, 3, "push")


def rollouts_with_spans(m, tok, samples):
    """Completions built by hand: spans of 3, 1 and 2 + 1 slots, one row without a span, padding after EOS."""
    ids = M.lvr_token_ids(m)
    S, L, E, eos, pad = ids["lvr_start_id"], ids["lvr_id"], ids["lvr_end_id"], tok.eos_token_id, tok.pad_token_id
    w = tok.convert_tokens_to_ids(["red", "left", "<answer>", "B", "</answer>"])
    rows = [[S, L, L, L, E, *w, eos],
            [S, L, E, w[0], w[2], w[3], w[4], eos, pad, pad, pad],
            [S, L, L, E, w[1], S, L, E, *w[2:], eos],
            [*w, eos, pad, pad, pad, pad, pad]]
    T = max(map(len, rows))
    tokens = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    latent = tokens == ids["lvr_id"]
    real = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]).bool()
    real &= (tokens != pad)
    latents = torch.randn(len(rows), T, m.config.text_config.hidden_size) * latent[..., None]
    prompt = M.encode(m, tok, samples[:4])  # prompts of different lengths: left padding
    return prompt, tokens, latents, latent, real


@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_fused_attention_reward_equals_naive(tiny, samples, layers):
    m, tok = tiny
    assert m.config.text_config.num_key_value_heads < m.config.text_config.num_attention_heads  # GQA
    prompt, tokens, latents, latent, real = rollouts_with_spans(m, tok, samples)
    assert (prompt["attention_mask"] == 0).any()
    end = M.lvr_token_ids(m)["lvr_end_id"]
    with torch.no_grad(), reward.capture_qk(m, layers) as qk:
        lvr.score_forward(m, lvr.rollout_of(m, prompt, tokens, latents, latent, real))
    ids = torch.cat([prompt["input_ids"], tokens], 1)
    fused = reward.attention_reward(qk, prompt, tokens, latent, real, m.config)

    full_mask = torch.cat([prompt["attention_mask"], real.long()], 1)
    L0 = prompt["input_ids"].shape[1]
    x = lvr.embed(m, ids, prompt["pixel_values"], prompt["image_grid_thw"], F.pad(latents, (0, 0, L0, 0)),
                  F.pad(latent, (L0, 0)))
    pos, _ = lvr.positions(m, ids, full_mask, prompt["image_grid_thw"])
    with torch.no_grad(), reward.eager_attention(m):
        out = m.model.language_model(inputs_embeds=x, attention_mask=full_mask, position_ids=pos, output_attentions=True)
    keys, queries = reward.span_masks(tokens, latent, real, m.config.lvr_start_id, end)
    pad = lambda t: torch.cat([torch.zeros_like(prompt["attention_mask"]).bool(), t], 1)  # noqa: E731
    naive = torch.stack([reward.attention_share_naive(out.attentions[l], pad(queries), pad(keys)) for l in layers]).mean(0)
    assert naive[3] == 0 and fused[3] == 0  # no span: no reward
    assert (naive[:3] > 0).all()
    assert (fused - naive).abs().max() < 1e-5
    # a tiny chunk streams the logsumexp over many pieces and must agree too
    q, k = qk[layers[0]]
    a = reward.attention_share(q, k, pad(queries), pad(keys), full_mask, chunk=7)
    b = reward.attention_share(q, k, pad(queries), pad(keys), full_mask, chunk=10_000)
    assert (a - b).abs().max() < 1e-6


def test_relative_variant_divides_by_image_mass(tiny, samples):
    m, tok = tiny
    prompt, tokens, latents, latent, real = rollouts_with_spans(m, tok, samples)
    end = M.lvr_token_ids(m)["lvr_end_id"]
    with torch.no_grad(), reward.capture_qk(m, [0]) as qk:
        lvr.score_forward(m, lvr.rollout_of(m, prompt, tokens, latents, latent, real))
    ids = torch.cat([prompt["input_ids"], tokens], 1)
    share = reward.attention_reward(qk, prompt, tokens, latent, real, m.config)
    rel = reward.attention_reward(qk, prompt, tokens, latent, real, m.config, "relative")
    keys, queries = reward.span_masks(tokens, latent, real, m.config.lvr_start_id, end)
    pad = lambda t: torch.cat([torch.zeros_like(prompt["attention_mask"]).bool(), t], 1)  # noqa: E731
    q, k = qk[0]
    full_mask = torch.cat([prompt["attention_mask"], real.long()], 1)
    image = reward.attention_share(q, k, pad(queries), ids == m.config.image_token_id, full_mask)
    assert torch.allclose(rel[:3], share[:3] / image[:3], rtol=1e-5) and rel[3] == 0
    with pytest.raises(ValueError, match="variant"):
        reward.attention_reward(qk, prompt, tokens, latent, real, m.config, "token")


def test_query_window_follows_the_last_span(tiny, samples):
    """Queries start after max(last <|lvr_end|>, first <|lvr_start|> + latent slots): a stray <|lvr_end|> before
    the span does not open the window early; with two spans it opens after the second. Scored against the
    eager attention oracle with the window written out by position."""
    m, tok = tiny
    ids = M.lvr_token_ids(m)
    S, L, E, eos = ids["lvr_start_id"], ids["lvr_id"], ids["lvr_end_id"], tok.eos_token_id
    w = tok.convert_tokens_to_ids("red")
    rows = [[w, E, w, S, L, L, L, E, w, w, w, eos],  # w E w S L L L E w w w EOS
            [S, L, L, E, w, S, L, E, w, w, eos, eos]]
    tokens = torch.tensor(rows)
    latent = tokens == L
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[1, -1] = False
    keys, queries = reward.span_masks(tokens, latent, real, S, E)
    assert queries[0].nonzero()[:, 0].tolist() == [8, 9, 10, 11]
    assert queries[1].nonzero()[:, 0].tolist() == [8, 9, 10]
    assert torch.equal(keys, latent)
    latents = torch.randn(2, 12, m.config.text_config.hidden_size) * latent[..., None]
    prompt = M.encode(m, tok, samples[:2])
    with torch.no_grad(), reward.capture_qk(m, [0]) as qk:
        lvr.score_forward(m, lvr.rollout_of(m, prompt, tokens, latents, latent, real))
    fused = reward.attention_reward(qk, prompt, tokens, latent, real, m.config)
    full_mask = torch.cat([prompt["attention_mask"], real.long()], 1)
    L0 = prompt["input_ids"].shape[1]
    x = lvr.embed(m, torch.cat([prompt["input_ids"], tokens], 1), prompt["pixel_values"], prompt["image_grid_thw"],
                  F.pad(latents, (0, 0, L0, 0)), F.pad(latent, (L0, 0)))
    pos, _ = lvr.positions(m, torch.cat([prompt["input_ids"], tokens], 1), full_mask, prompt["image_grid_thw"])
    with torch.no_grad(), reward.eager_attention(m):
        att = m.model.language_model(inputs_embeds=x, attention_mask=full_mask, position_ids=pos,
                                     output_attentions=True).attentions[0].mean(1)  # (B, L, L), heads averaged
    want = [att[0, L0 + 8:L0 + 12][:, L0 + torch.tensor([4, 5, 6])].sum(-1).mean(),
            att[1, L0 + 8:L0 + 11][:, L0 + torch.tensor([1, 2, 6])].sum(-1).mean()]
    assert torch.allclose(fused, torch.stack(want), atol=1e-5)
