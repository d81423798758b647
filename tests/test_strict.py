"""--strict stage 1 (train_sft.py): the stage-1 loss under the image-blind mask, end to end on tiny settings."""
import json
import os

import torch

import lvr
import model as M
import reward
import train_sft

TINY_SFT = ["--batch-size", "4", "--n-val", "8", "--eval-every", "0", "--lr", "1e-3"]


def test_blind_sft_loss_differs_only_where_a_span_is(tiny, samples):
    m, tok = tiny
    chunk = samples[:3]
    with torch.no_grad():
        for wants, differs in (([False] * 3, False), ([True, False, True], True)):
            batch, W = lvr.sft_batch(m, tok, chunk, wants, 3)
            a, b = lvr.sft_loss(m, batch, W, 0.5), lvr.sft_loss(m, batch, W, 0.5, blind=True)
            assert abs(float(a["mse"] - b["mse"])) < 1e-6  # the slots' targets are predicted before the span ends
            assert (abs(float(a["ce"] - b["ce"])) > 1e-6) == differs


def test_strict_point_loss_skips_the_blind_words(tiny, samples):
    m, tok = tiny
    batch, _ = lvr.sft_batch(m, tok, samples[:4], [True] * 4, 3)
    with reward.capture_qk(m, [0]) as qk, torch.no_grad():
        lvr.sft_loss(m, batch, torch.zeros(12, batch["mm_token_type_ids"].sum()), 0.0)
    blind = lvr.post_span(batch["input_ids"], m.config.lvr_end_id)
    _, n_all = train_sft.point_loss(m, tok, qk, batch, samples[:4], with_count=True)
    _, n_strict = train_sft.point_loss(m, tok, qk, batch, samples[:4], with_count=True, blind=blind)
    assert n_all > 0 and n_strict == 0  # every naming word of these replies follows their span


def test_strict_sft_end_to_end(tmp_path, monkeypatch):
    seen = []
    real = lvr.sft_loss
    monkeypatch.setattr(lvr, "sft_loss", lambda *a, **k: seen.append(k.get("blind", False)) or real(*a, **k))
    base, out = str(tmp_path / "base"), str(tmp_path / "sft")
    train_sft.main(["--base-steps", "2", "--steps", "2", "--save-every", "2", "--base", base, "--out", out, "--strict"]
                   + TINY_SFT)
    assert seen == [False, False, True, True]  # stage 0 (no spans) as ever; stage 1 under the blind mask
    rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["stage"] for r in rows] == [1, 1] and all(r["mse"] > 0 for r in rows)
    table = json.load(open(os.path.join(out, "eval_val.json")))
    assert list(table)[:2] == ["blind", "blind+drop"] and table["blind"]["overall"]["n"] == 8
    M.load_model(os.path.join(out, "checkpoint"))
    assert train_sft.parse_args(["--strict"]).out.endswith("small-vl-sft-strict")
