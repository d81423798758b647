"""ReaLVR's evidence loss (reward.py) against a hand-written computation on a tiny batch: prototypes from the
boxes' visual tokens, margins from a plain transformers forward, slot weights from eager attention weights of
teacher-forced gold and wrong answers; and train_rl.py runs it (and --strict) end to end."""
import json

import pytest
import torch
import torch.nn.functional as F

import data
import lvr
import model as M
import reward
import train_rl

LAM, MARGIN, ETA = 0.2, 0.5, 0.3


def hand_state(m, prompt_row, tokens, latents, lmask, mask, pix, grid, eager=False):
    """A plain transformers forward over one prompt row + completion, latents put in by hand."""
    ids = torch.cat([prompt_row["input_ids"], tokens])[None]
    am = torch.cat([prompt_row["attention_mask"], mask.long()])[None]
    emb = m.get_input_embeddings()(ids).clone()
    L0 = prompt_row["input_ids"].shape[0]
    emb[0, L0:][lmask] = latents[lmask]
    kw = dict(input_ids=ids, inputs_embeds=emb, attention_mask=am, pixel_values=pix, image_grid_thw=grid,
              mm_token_type_ids=(ids == m.config.image_token_id).int())
    if eager:
        with reward.eager_attention(m):
            return m.model(**kw, output_attentions=True), L0
    return m.model(**kw), L0


def test_evidence_loss_equals_a_hand_written_computation(tiny, samples):
    m, tok = tiny
    qs = samples[:2]  # a position and a count question, both with boxes
    prompt = M.encode(m, tok, qs)
    roll = lvr.generate(m, tok, prompt, G=2, max_new_tokens=10, latent_steps=3, force=torch.ones(4, dtype=torch.long),
                        temperature=1.0, generator=torch.Generator().manual_seed(1))
    correct = [True, False, False, False]  # by hand: group 0 has one wrong reply, group 1 two
    end = m.config.lvr_end_id
    assert (roll.tokens == end).any(1).all()

    ev = reward.evidence_setup(m, tok, roll, qs, correct, 2, [0], ETA)
    h = lvr.score_forward(m, roll)
    g = reward.evidence_margin(h, ev["slots"], roll.prow, ev["protos"], ev["has_box"])
    row_w = ev["take"].float() * LAM / ev["take"].sum()
    got = reward.evidence_loss(g, ev["w"], row_w, MARGIN)

    # ---- by hand
    feats = lvr.image_features(m, prompt["pixel_values"], prompt["image_grid_thw"])
    protos = []
    for q, s in enumerate(qs):
        cells = sorted({c for b in s.bboxes for c in lvr.region_tokens(b, 6, 6)})
        protos.append(feats[[36 * q + c for c in cells]].mean(0))
    pixq = prompt["pixel_values"].split(len(prompt["pixel_values"]) // 2)
    total = 0.0
    for i in range(4):
        q = i // 2
        row = {k: prompt[k][q] for k in ("input_ids", "attention_mask")}
        pix, grid = pixq[q], prompt["image_grid_thw"][q:q + 1]
        e = int((roll.tokens[i] == end).nonzero()[0, 0])
        slots = [p for p in range(e) if roll.latent_mask[i, p]]
        out, L0 = hand_state(m, row, roll.tokens[i], roll.latents[i], roll.latent_mask[i], roll.mask[i], pix, grid)
        z = [out.last_hidden_state[0, L0 + p - 1] for p in slots]  # the state that produces slot p

        def attention(answer_ids):
            toks = torch.cat([roll.tokens[i, :e + 1], torch.tensor(answer_ids)])
            lat = F.pad(roll.latents[i, :e + 1], (0, 0, 0, len(answer_ids)))
            lm = F.pad(roll.latent_mask[i, :e + 1], (0, len(answer_ids)))
            o, L0_ = hand_state(m, row, toks, lat, lm, torch.ones(len(toks), dtype=torch.bool), pix, grid, eager=True)
            a = o.attentions[0][0].mean(0)  # layer 0, heads averaged: (L, L)
            qpos = range(L0_ + e + 1, L0_ + len(toks))
            return [float(torch.stack([a[r, L0_ + p] for r in qpos]).mean().detach()) for p in slots]

        gold = tok(data.chat_response(qs[q].answer, qs[q].reason), add_special_tokens=False)["input_ids"]
        r_pos = attention(gold)
        wrong = []
        for j in (2 * q, 2 * q + 1):
            if not correct[j]:
                e_j = int((roll.tokens[j] == end).nonzero()[0, 0])
                tail = [int(t) for p, t in enumerate(roll.tokens[j]) if p > e_j and roll.mask[j, p] and t != end]
                if tail and tail not in wrong:
                    wrong.append(tail)
        r_neg = [sum(col) / len(wrong) for col in zip(*[attention(w) for w in wrong])] if wrong else [0.0] * len(slots)
        K = len(slots)
        for t in range(K):
            cpos = F.cosine_similarity(z[t], protos[q], dim=0)
            cneg = F.cosine_similarity(z[t], protos[1 - q], dim=0)
            g_t = cpos - cneg
            w_t = ETA / K + (1 - ETA) * max(0.0, r_pos[t] - r_neg[t])
            total = total + LAM / 4 * w_t * torch.clamp(MARGIN - g_t, min=0)
    assert ev["take"].all() and ev["slots"].sum() == sum(int(roll.latent_mask[i, :int((roll.tokens[i] == end).nonzero()[0, 0])].sum()) for i in range(4))
    assert float(got.detach()) > 0 and abs(float(got.detach()) - float(total.detach())) < 1e-5
    assert ev["w"][ev["slots"]].min() >= ETA / 3 - 1e-6 and (ev["r_pos"] - ev["r_neg"]).abs().max() > 0
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.language_model.parameters())
    m.zero_grad(set_to_none=True)


def test_margin_without_negatives_and_rows_without_boxes(tiny, samples):
    z = torch.randn(2, 3, 8)
    protos = torch.randn(2, 8)
    slots = torch.tensor([[False, True, True], [True, True, False]])
    g = reward.evidence_margin(z, slots, torch.tensor([0, 1]), protos, torch.tensor([True, False]))
    # row 0's only other question has no boxes: the margin is cos(z, p+) alone; row 1 is measured against p0
    assert torch.allclose(g[0, 1:], F.cosine_similarity(z[0, 1:], protos[0][None], dim=-1))
    want = F.cosine_similarity(z[1, :2], protos[1][None], dim=-1) - F.cosine_similarity(z[1, :2], protos[0][None], dim=-1)
    assert torch.allclose(g[1, :2], want) and g[~slots].abs().sum() == 0
    w = reward.evidence_slot_weights(torch.tensor([[0.0, 0.5, 0.1]]), torch.tensor([[0.0, 0.2, 0.3]]), slots[:1], 0.3)
    assert torch.allclose(w, torch.tensor([[0.0, 0.15 + 0.7 * 0.3, 0.15]]))


@pytest.mark.parametrize("extra", [["--evidence-weight", "0.2"], ["--evidence-weight", "0.2", "--strict"], ["--strict"]])
def test_train_rl_with_evidence_and_strict_end_to_end(tiny_ckpt, tmp_path, monkeypatch, extra):
    seen = []
    real = lvr.generate
    monkeypatch.setattr(lvr, "generate", lambda *a, **k: seen.append(k.get("blind")) or real(*a, **k))
    out = tmp_path / "rl"
    train_rl.main(["--model", tiny_ckpt, "--out", str(out), "--steps", "2", "--prompts", "2", "--group", "2",
                   "--max-new-tokens", "10", "--latent-steps", "2", "--save-every", "2", "--n-eval", "4"] + extra)
    rows = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in rows if "val_acc" in r] == [0, 2]  # the validation curve: decoded blind under --strict too
    rows = [r for r in rows if "val_acc" not in r]
    assert len(rows) == 2 and all(r["skipped"] is False for r in rows)
    assert set(seen) == {"--strict" in extra}
    if "--evidence-weight" in extra:
        assert all("evidence" in r and r["evidence"] >= 0 for r in rows)
    assert (out / "checkpoint" / "config.json").exists()


def test_rl_out_names_and_strict_relative_refused():
    assert train_rl.parse_args(["--evidence-weight", "0.2", "--att-weight", "0"]).out.endswith("small-vl-rl-ev")
    assert train_rl.parse_args(["--strict"]).out.endswith("small-vl-rl-att-strict")
    assert train_rl.parse_args([]).out.endswith("small-vl-rl-att")
    with pytest.raises(SystemExit):
        train_rl.parse_args(["--strict", "--att-variant", "relative"])
