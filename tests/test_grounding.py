"""Visual grounding (eval.py): of the attention the answer tokens pay to the image, the share inside the
question's boxes, against a hand-written computation from eager attention weights (output_attentions=True of
a plain full forward); the box -> visual token mapping on a hand-made box; bands, records and summaries."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev
import lvr
import model as M
import reward
import summary
from test_reward import rollouts_with_spans


@pytest.fixture(scope="module")
def sharp():
    """A tiny small-vl whose attention is peaked (query and key weights scaled up), so that the share in the
    boxes is far from what an even spread over the image gives (the random tiny model's is nearly even)."""
    m, tok = M.build_small_vl(seed=1, text_hidden=64, text_layers=2, vision_hidden=32, vision_depth=1)
    with torch.no_grad():
        for layer in m.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(10.0)
                proj.bias.mul_(10.0)
    return m, tok


def hand_grounding(m, prompt, tokens, latents, latent, real, cells):
    """(rows, layers) from the eager attention weights of a full forward, answer positions and box keys
    written out by position: the reply after its last <|lvr_end|> (all of it without one), no slot, no marker."""
    ids = M.lvr_token_ids(m)
    L0 = prompt["input_ids"].shape[1]
    full_ids = torch.cat([prompt["input_ids"], tokens], 1)
    full_mask = torch.cat([prompt["attention_mask"], real.long()], 1)
    x = lvr.embed(m, full_ids, prompt["pixel_values"], prompt["image_grid_thw"], F.pad(latents, (0, 0, L0, 0)),
                  F.pad(latent, (L0, 0)))
    pos, _ = lvr.positions(m, full_ids, full_mask, prompt["image_grid_thw"])
    with torch.no_grad(), reward.eager_attention(m):
        att = m.model.language_model(inputs_embeds=x, attention_mask=full_mask, position_ids=pos,
                                     output_attentions=True).attentions
    out = torch.zeros(len(tokens), len(att))
    for b in range(len(tokens)):
        toks = tokens[b].tolist()
        ends = [t for t, v in enumerate(toks) if v == ids["lvr_end_id"]]
        first = ends[-1] + 1 if ends else 0
        answer = [L0 + t for t in range(first, len(toks)) if real[b, t]
                  and toks[t] not in (ids["lvr_start_id"], ids["lvr_end_id"], ids["lvr_id"])]
        image = [p for p in range(L0) if full_ids[b, p] == m.config.image_token_id]
        box = [image[c] for c in cells[b]]
        for layer, a in enumerate(att):
            heads = a[b].mean(0)  # (L, L), heads averaged
            out[b, layer] = heads[answer][:, box].sum(-1).mean() / heads[answer][:, image].sum(-1).mean()
    return out


def test_box_cells_and_their_tokens_on_a_hand_made_box(tiny, samples):
    """A 64 x 128 image is a 4 x 8 grid of merged tokens (rows x columns): the boxes' cells by hand, the
    stage-1 targets' cells the same, and their positions among each prompt's image tokens (left padding differs)."""
    m, tok = tiny
    boxes = [[0.30, 0.55, 0.52, 1.0], [0.5, 0.5, 0.6, 0.7], [0.0, 0.0, 0.1, 0.2]]  # the second inside the first
    wide = dataclasses.replace(samples[0], image=np.zeros((64, 128, 3), np.uint8), bboxes=boxes)
    assert M.merged_grid(wide.load_image().shape, m) == (4, 8)
    want = [0, 2 * 8 + 2, 2 * 8 + 3, 2 * 8 + 4, 3 * 8 + 2, 3 * 8 + 3, 3 * 8 + 4]  # rows 2-3 x columns 2-4, and (0, 0)
    assert lvr.box_cells(m, wide) == want
    assert sorted(i for g in lvr.slot_groups(boxes, 4, 8, "bbox") for i in g) == want
    other = dataclasses.replace(samples[3], image=np.zeros((64, 128, 3), np.uint8), bboxes=[[0.9, 0.0, 1.0, 0.2]])
    assert lvr.box_cells(m, other) == [7]  # the top-right cell
    prompt = M.encode(m, tok, [wide, other])
    keys = lvr.box_keys(prompt["input_ids"], m.config.image_token_id, [want, [7]])
    for row, cells in enumerate([want, [7]]):
        first = int((prompt["input_ids"][row] == m.config.image_token_id).nonzero()[0, 0])
        assert (prompt["input_ids"][row, first:first + 32] == m.config.image_token_id).all()
        assert keys[row].nonzero()[:, 0].tolist() == [first + c for c in cells]
    assert prompt["attention_mask"][:, 0].tolist() != [1, 1]  # the two prompts are padded differently


def test_answer_tokens_by_position(tiny):
    """After the last <|lvr_end|>; all the text without one; a span cut open at the end: its marker and slots
    are not answer tokens, the text before it is; padding never."""
    m, tok = tiny
    ids = M.lvr_token_ids(m)
    S, L, E, eos, pad = ids["lvr_start_id"], ids["lvr_id"], ids["lvr_end_id"], tok.eos_token_id, tok.pad_token_id
    w = tok.convert_tokens_to_ids("red")
    rows = [[S, L, L, E, w, w, eos, pad, pad], [w, w, eos, pad, pad, pad, pad, pad, pad],
            [S, L, E, w, S, L, L, pad, pad], [w, S, L, L, pad, pad, pad, pad, pad], [S, L, E, w, S, L, E, w, eos]]
    tokens = torch.tensor(rows)
    got = reward.answer_mask(tokens, tokens == L, tokens != pad, m.config)
    assert [r.nonzero()[:, 0].tolist() for r in got] == [[4, 5, 6], [0, 1, 2], [3], [0], [7, 8]]


def test_grounding_equals_eager_attention_by_hand(sharp, samples):
    """Hand-made replies: one span, one short span, two spans, none (all its text is the answer); left-padded
    prompts; every layer. The fused share from the scoring forward equals the eager oracle; r_attn unchanged."""
    m, tok = sharp
    prompt, tokens, latents, latent, real = rollouts_with_spans(m, tok, samples)
    roll = lvr.rollout_of(m, prompt, tokens, latents, latent, real)
    cells = [lvr.box_cells(m, s) for s in samples[:4]]
    with torch.no_grad():
        _, r_attn, got = reward.score_rollout(m, roll, [0], cells=cells)
        _, r_alone = reward.score_rollout(m, roll, [0])
    want = hand_grounding(m, prompt, tokens, latents, latent, real, cells)
    assert got.shape == (4, m.config.text_config.num_hidden_layers)
    assert (got - want).abs().max() < 1e-5
    assert (want - torch.tensor([len(c) / 36 for c in cells])[:, None]).abs().min() > 1e-3  # far from an even spread (100 x the tolerance)
    assert torch.equal(r_attn, r_alone)


def test_blind_grounding_is_undefined_after_a_span(sharp, samples):
    """Under the blind interface the answer after a span sees no image token: NaN (a record's None); the
    reply without a span sees the image and keeps its value."""
    m, tok = sharp
    prompt, tokens, latents, latent, real = rollouts_with_spans(m, tok, samples)
    roll = lvr.rollout_of(m, prompt, tokens, latents, latent, real)
    cells = [lvr.box_cells(m, s) for s in samples[:4]]
    with torch.no_grad():
        plain = reward.score_rollout(m, roll, [0], cells=cells)[2]
        blind = reward.score_rollout(m, roll, [0], blind=True, cells=cells)[2]
    assert torch.isnan(blind[:3]).all()
    assert (blind[3] - plain[3]).abs().max() < 1e-5
    ids = prompt["input_ids"]
    assert ev.grounding_record(blind[0], cells[0], ids[0], m.config.image_token_id) is None


def test_layer_bands_and_records():
    assert ev.layer_bands(4) == {"early": [0], "middle": [1, 2], "late": [3]}  # small-vl
    assert ev.layer_bands(2) == {"early": [0], "late": [1]}
    assert ev.layer_bands(1) == {"early": [0], "late": [0]}
    assert [len(v) for v in ev.layer_bands(28).values()] == [9, 10, 9]
    ids = torch.tensor([5, 9, 9, 9, 9, 7])  # four image tokens (id 9)
    rec = ev.grounding_record(torch.tensor([0.1, 0.2, 0.4, 0.9]), [1], ids, 9)
    assert rec == pytest.approx({"early": 0.1, "middle": 0.3, "late": 0.9, "all": 0.4, "uniform": 0.25})


def test_evaluate_records_grounding_and_summarize_averages_it(sharp):
    """evaluate: a value per question with boxes, None without (a benchmark's), None after a blind span;
    summarize: the mean of each band over the records that have one, and how many."""
    m, tok = sharp
    qs = [data.make_sample(0, "test", i) for i in range(4)]
    qs[1] = dataclasses.replace(qs[1], bboxes=[])
    kw = dict(max_new_tokens=10, latent_steps=2, progress=False)
    recs = ev.evaluate(m, tok, qs, route="all", **kw)
    assert [r["grounding"] is None for r in recs] == [False, True, False, False]
    assert set(recs[0]["grounding"]) == {"early", "late", "all", "uniform"}
    assert recs[0]["grounding"]["uniform"] == len(lvr.box_cells(m, qs[0])) / 36
    assert all(r["grounding"] is None for r in ev.evaluate(m, tok, qs, mode="blind", route="all", **kw))
    never = ev.evaluate(m, tok, qs, route="none", **kw)
    blind_never = ev.evaluate(m, tok, qs, mode="blind", route="none", **kw)  # no span: nothing is hidden
    values = lambda rs: [v for r in rs for v in (r["grounding"] or {}).values()]  # noqa: E731
    assert len(values(never)) == 12 and values(blind_never) == pytest.approx(values(never), abs=1e-5)
    s = summary.summarize(recs)
    have = [r["grounding"] for r in recs if r["grounding"]]
    assert s["overall"]["grounding"] == pytest.approx({**{k: np.mean([g[k] for g in have]) for k in have[0]}, "n": 3})
    t = recs[0]["qtype"]
    assert s["per_type"][t]["grounding"]["all"] == pytest.approx(np.mean([g["grounding"]["all"] for g in recs
                                                                          if g["qtype"] == t and g["grounding"]]))
    assert summary.summarize([recs[1]])["overall"]["grounding"] is None
    assert f"| {s['overall']['grounding']['all']:.3f} |" in summary.table({"normal": s})
