"""Both trainers end to end on tiny settings, resume, and the GRPO loss against formulas written out by hand."""
import argparse
import math
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import eval as ev
import lvr
import model as M
import reward
import summary
import train_rl
import train_sft

TINY_SFT = ["--batch-size", "4", "--n-val", "8", "--eval-every", "0", "--lr", "1e-3"]


def rows(path):
    return [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]


def weights(path):
    return load_file(os.path.join(path, "checkpoint", "model.safetensors"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    base, out = str(root / "base"), str(root / "sft")
    train_sft.main(["--base-steps", "2", "--steps", "2", "--save-every", "2", "--base", base, "--out", out] + TINY_SFT)
    return base, out


def test_sft_writes_log_checkpoint_and_table(sft_run):
    base, out = sft_run
    b, s = rows(base), rows(out)
    assert [r["stage"] for r in b] == [0, 0] and [r["stage"] for r in s] == [1, 1]
    assert all(r["ce"] > 0 and r["ground"] > 0 and r["point"] > 0 for r in b) and all("ground" not in r for r in s)
    assert all(r["mse"] > 0 for r in s) and all(r["mse"] == 0 for r in b)  # stage 0 carries no latent spans
    model, tok = M.load_model(os.path.join(out, "checkpoint"))
    assert M.lvr_token_ids(model)["lvr_id"] == tok.convert_tokens_to_ids("<|lvr|>")
    table = json.load(open(os.path.join(out, "eval_val.json")))
    assert {"normal", "drop", "noise", "noise_norm", "blank image", "sampled T=1"} <= set(table)
    assert table["normal"]["overall"]["n"] == 8
    state = torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)
    assert state["step"] == 2
    a, b = weights(base), load_file(os.path.join(out, "checkpoint", "model.safetensors"))
    vis = [k for k in a if "visual" in k]
    assert vis and all(torch.equal(a[k], b[k]) for k in vis)  # stage 1 keeps the vision tower frozen
    assert any(not torch.equal(a[k], b[k]) for k in a if k not in vis)


def test_sft_resume_equals_uninterrupted(sft_run, tmp_path, monkeypatch):
    base, full = sft_run
    part = str(tmp_path / "part")
    args = ["--base-steps", "2", "--base", base, "--out", part, "--steps", "2", "--save-every", "1"] + TINY_SFT
    real, calls = lvr.sft_loss, []

    def killed_at_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(lvr, "sft_loss", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(args)
    monkeypatch.setattr(lvr, "sft_loss", real)
    assert [r["step"] for r in rows(part)] == [1]
    train_sft.main(args + ["--resume"])
    a, b = weights(full), weights(part)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert [r["step"] for r in rows(part)] == [1, 2]


def test_sft_bad_data_path_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                        "--base", str(tmp_path / "b")] + TINY_SFT)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.endswith(f"error: argument --data: file not found: {tmp_path / 'none.jsonl'}")
    assert not os.path.exists(tmp_path / "b") and not os.path.exists(tmp_path / "o")  # failed before any work


# --------------------------------------------------------------------------------------- GRPO
TINY_RL = ["--prompts", "2", "--group", "4", "--max-new-tokens", "16", "--latent-steps", "3", "--lr", "1e-3",
           "--temperature", "1.0", "--eval-every", "0"]


def test_uniform_share_is_the_update_mass_of_groups_all_right_or_all_wrong():
    """adv_uniform in the log: group 1 (both right) carries |0.5| + |-0.5| of the 3.0 in all; none without any advantage."""
    adv, acc = torch.tensor([0.5, -0.5, 1.0, -1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert train_rl.uniform_share(adv, acc, 2) == pytest.approx(1 / 3)
    assert train_rl.uniform_share(adv, torch.tensor([0.0, 0.0, 1.0, 1.0]), 2) == pytest.approx(1.0)
    assert train_rl.uniform_share(torch.zeros(4), acc, 2) == 0.0


def test_rl_two_steps_write_a_checkpoint_eval_loads(tiny_ckpt, tmp_path, samples):
    out = str(tmp_path / "rl")
    train_rl.main(["--model", tiny_ckpt, "--steps", "2", "--out", out] + TINY_RL)
    log = rows(out)
    assert [r["step"] for r in log] == [1, 2]
    for key in ("reward", "acc", "latent_rate", "att_share", "multi_span", "att_share_multi", "kl",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "zero_spread", "length",
                "t_rollout", "t_decode", "decode_steps", "t_score", "t_update"):
        assert key in log[0]
    assert all(0 < r["t_decode"] < r["t_rollout"] and 1 <= r["decode_steps"] <= 16 for r in log)
    assert all(0 <= r["adv_uniform"] <= 1 for r in log)
    model, tok = M.load_model(os.path.join(out, "checkpoint"))
    recs = ev.evaluate(model, tok, samples, max_new_tokens=12, progress=False)
    assert len(recs) == len(samples)


def test_rl_resume_equals_uninterrupted(tiny_ckpt, tmp_path):  # the kill -9 cases: test_faults.py
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train_rl.main(["--model", tiny_ckpt, "--steps", "2", "--out", full] + TINY_RL)
    train_rl.main(["--model", tiny_ckpt, "--steps", "1", "--out", part] + TINY_RL)
    train_rl.main(["--model", tiny_ckpt, "--steps", "2", "--out", part, "--resume"] + TINY_RL)
    a, b = rows(full), rows(part)
    assert [r["step"] for r in b] == [1, 2]
    for key in ("reward", "acc", "length", "loss"):
        assert a[1][key] == pytest.approx(b[1][key], abs=1e-6), key
    wa, wb = weights(full), weights(part)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_rl_validation_curve_rows_and_unchanged_training(tmp_path):
    """--eval-every 2 over 3 steps: validation rows at steps 0, 2 and 3 (the end), each after its step's training
    row, with every key; the last equals eval.py on the saved checkpoint and the same questions, normal and with
    spans forbidden; the training rows and the final weights are those of a run without the curve. From the
    shipped LVR SFT model on the hard task: it answers some questions, and differently without spans."""
    start = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "small-vl-sft")
    common = ["--model", start, "--task", "hard", "--steps", "3", "--save-every", "3"] + TINY_RL
    plain, curve = str(tmp_path / "plain"), str(tmp_path / "curve")
    train_rl.main(common + ["--out", plain])
    train_rl.main(common + ["--out", curve, "--eval-every", "2", "--n-eval", "8"])
    log = rows(curve)
    assert [(r["step"], "val_acc" in r) for r in log] == [(0, True), (1, False), (2, False), (2, True), (3, False), (3, True)]
    questions = data.make_split("val", 8, 0, task="hard")
    keys = {"step", "val_acc", "val_latent_rate", "val_att_share", "val_never_acc"} | {f"val_{s.qtype}" for s in questions}
    val = [r for r in log if "val_acc" in r]
    assert all(set(r) == keys for r in val)
    model, tok = M.load_model(os.path.join(curve, "checkpoint"))
    normal = ev.evaluate(model, tok, questions, latent_steps=3, max_new_tokens=16, progress=False)
    never = ev.evaluate(model, tok, questions, latent_steps=3, max_new_tokens=16, route="none", progress=False)
    s, n = summary.summarize(normal), summary.summarize(never)
    assert s["overall"]["acc"] != n["overall"]["acc"] and s["overall"]["latent_rate"] > 0  # the passes are told apart
    assert val[-1]["val_acc"] == s["overall"]["acc"] and val[-1]["val_never_acc"] == n["overall"]["acc"]
    assert val[-1]["val_latent_rate"] == s["overall"]["latent_rate"]
    assert val[-1]["val_att_share"] == pytest.approx(s["overall"]["att_share"], abs=1e-6)
    assert all(val[-1][f"val_{t}"] == v["acc"] for t, v in s["per_type"].items())
    assert val[0]["val_att_share"] != pytest.approx(val[-1]["val_att_share"], abs=1e-6)  # each row is its step's model
    train = lambda out: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows(out) if "reward" in r]  # noqa: E731
    assert train(curve) == train(plain)
    wa, wb = weights(plain), weights(curve)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rl_nan_loss_skips_the_update(tiny_ckpt, tmp_path, monkeypatch):
    real, calls = train_rl.policy_loss, []

    def nan_once(*a, **k):
        calls.append(1)
        loss, stats = real(*a, **k)
        return (loss * float("nan") if len(calls) == 1 else loss), stats

    monkeypatch.setattr(train_rl, "policy_loss", nan_once)
    out = str(tmp_path / "nan")
    with pytest.warns(UserWarning, match="non-finite loss"):
        train_rl.main(["--model", tiny_ckpt, "--steps", "2", "--out", out] + TINY_RL)
    assert [r["skipped"] for r in rows(out)] == [True, False]


def hand_args(loss, **kw):
    base = dict(loss=loss, clip_low=0.2, clip_high=0.3, dual_clip=3.0, beta=0.0, max_new_tokens=4)
    return argparse.Namespace(**{**base, **kw})


def by_hand(logp, old, adv, mask, a, ref=None):
    """The PPO-clip / dual-clip / k3 formulas, one token at a time."""
    N, T = logp.shape
    per = [[0.0] * T for _ in range(N)]
    for i in range(N):
        for t in range(T):
            r = float(torch.exp(logp[i, t] - old[i, t]))
            A = float(adv[i])
            c = min(max(r, 1 - a.clip_low), 1 + a.clip_high)
            v = max(-r * A, -c * A)
            if A < 0 and a.dual_clip:
                v = min(v, -a.dual_clip * A)
            if ref is not None:
                d = float(ref[i, t] - logp[i, t])
                v += a.beta * (torch.exp(torch.tensor(d)).item() - d - 1)
            per[i][t] = v
    m = mask.tolist()
    if a.loss == "dapo":
        return sum(per[i][t] for i in range(N) for t in range(T) if m[i][t]) / sum(map(sum, m))
    if a.loss == "grpo":
        return sum(sum(per[i][t] for t in range(T) if m[i][t]) / sum(m[i]) for i in range(N)) / N
    return sum(per[i][t] for i in range(N) for t in range(T) if m[i][t]) / (N * a.max_new_tokens)


@pytest.mark.parametrize("loss", train_rl.LOSSES)
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_policy_loss_matches_hand_written(loss, beta):
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.7, -2.0, -1.0], [-1.2, -0.1, -0.9, -3.0]])
    logp = old + torch.tensor([[0.5, -0.5, 0.1, 0.0], [1.5, -1.5, 0.2, -0.1], [0.05, 0.3, -0.4, 2.0]])  # clipped both ways
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    ref = old - 0.3
    a = hand_args(loss, beta=beta)
    got, stats = train_rl.policy_loss(logp, old, adv, mask, train_rl.loss_weights(mask, a), a, ref if beta else None)
    assert got.item() == pytest.approx(by_hand(logp, old, adv, mask, a, ref if beta else None), abs=1e-6)
    # micro-batches (any split of the rows) add up to the full batch's loss
    w = train_rl.loss_weights(mask, a)
    parts = [train_rl.policy_loss(logp[r], old[r], adv[r], mask[r], w[r], a, ref[r] if beta else None)[0]
             for r in (slice(0, 1), slice(1, 3))]
    assert sum(parts).item() == pytest.approx(got.item(), abs=1e-7)
    stats = {k: v / stats["tokens"] for k, v in stats.items()}
    # TRL's clip metrics: tokens where the clip binds (ratio below the band with A < 0, above it with A > 0)
    r, A, m = torch.exp(logp - old), adv[:, None].expand_as(logp), mask
    low = [(r[i, t] < 0.8 and A[i, t] < 0) for i in range(3) for t in range(4) if m[i, t]]
    high = [(r[i, t] > 1.3 and A[i, t] > 0) for i in range(3) for t in range(4) if m[i, t]]
    assert stats["clip_ratio/low_mean"] == pytest.approx(sum(low) / len(low)) and sum(low) > 0
    assert stats["clip_ratio/high_mean"] == pytest.approx(sum(high) / len(high)) and sum(high) > 0
    assert stats["clip_ratio/region_mean"] == pytest.approx((sum(low) + sum(high)) / len(low))
    # a ratio outside the band whose clip does not bind (ratio 0.22 with A > 0) counts in neither
    assert r[0, 1] < 0.8 and A[0, 1] > 0


@pytest.mark.parametrize("value", [0.9, 0.997, 0.1 + 0.2])
def test_equal_rewards_give_exactly_zero_advantage(value):
    for std in (True, False):
        assert torch.equal(train_rl.advantages(torch.full((8,), value), 8, std), torch.zeros(8))
    mixed = torch.tensor([0.9] * 8 + [0.997] * 8 + [1.0, 0.0] * 4)  # two equal groups batched with a spread one
    a = train_rl.advantages(mixed, 8, True)
    assert torch.equal(a[:16], torch.zeros(16)) and a[16:].abs().min() > 0.9


def test_first_epoch_logps_are_the_sampling_distribution(tiny, samples, monkeypatch):
    """Scored log-prob of every sampled token == log_softmax(logits / T) of the decode step that sampled it."""
    m, tok = tiny
    seen, real = [], lvr.sample_token
    monkeypatch.setattr(lvr, "sample_token", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    roll = lvr.generate(m, tok, M.encode(m, tok, samples[:3]), G=2, max_new_tokens=12, latent_steps=3, temperature=0.5,
                        top_p=0.99, generator=torch.Generator().manual_seed(0), force=torch.tensor([1, 1, 0, 0, 0, 0]))
    args = train_rl.parse_args(["--temperature", "0.5"])
    logp, _ = train_rl.score(args, m, roll, need_attn=False)
    want = torch.log_softmax(torch.stack(seen, 1) / 0.5, -1).gather(-1, roll.tokens[..., None])[..., 0]
    sampled = roll.mask & ~roll.latent_mask & ~roll.forced
    assert sampled.sum() > 20 and roll.forced[:2, 0].all() and roll.latent_mask.any()
    assert (logp[sampled] - want[sampled]).abs().max() < 1e-4
    assert (logp[roll.forced] == 0).all()  # forced tokens carry no log-prob (and are out of the loss mask)


def test_advantages_normalised_within_groups():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = train_rl.advantages(r, 4, std=True)
    assert a[:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)
    assert a[4:].abs().max() == 0
    assert train_rl.advantages(r, 4, std=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]


@pytest.mark.parametrize("mode", ["mask", "vlpo"])
def test_latent_positions_in_the_policy_gradient(tiny, samples, mode):
    """No token log-prob is ever taken at a latent slot. There, mask gives no gradient at all and vlpo only
    its Gaussian's: d logp / dh = (z - h) / sigma^2, through the hidden state that produced latent z."""
    m, tok = tiny
    roll = lvr.generate(m, tok, M.encode(m, tok, samples[:2]), G=2, max_new_tokens=10, latent_steps=3,
                        force=torch.tensor([1, 1, 0, 0]))
    lat = roll.latent_mask
    z = roll.latents + 0.1 * torch.randn(roll.latents.shape, generator=torch.Generator().manual_seed(0)) * lat[..., None]
    roll = dataclasses.replace(roll, latents=z)
    h = lvr.score_forward(m, roll).detach().requires_grad_()
    args = train_rl.parse_args(["--latent-logp", mode, "--temperature", "1.0", "--sigma", "10"])
    logp = train_rl.token_logps(m, h, roll, args, chunk=3)
    logp.sum().backward()
    want = (z - h.detach()) / 100 if mode == "vlpo" else torch.zeros_like(z)
    assert lat.sum() == 12 and torch.allclose(h.grad[lat], want[lat], atol=1e-7)
    if mode == "vlpo":
        assert torch.allclose(logp[lat], -0.5 * (z - h).pow(2).sum(-1)[lat] / 100)
    assert h.grad[roll.mask & ~lat & ~roll.forced].abs().sum(-1).min() > 0  # every sampled token has a gradient


def test_attention_reward_enters_only_with_its_weight(tiny_ckpt, tmp_path):
    out0, out1 = str(tmp_path / "w0"), str(tmp_path / "w1")
    args = ["--model", tiny_ckpt, "--steps", "1", "--prompts", "2", "--group", "4", "--max-new-tokens", "16",
            "--latent-steps", "3", "--temperature", "1.0", "--eval-every", "0"]
    train_rl.main(args + ["--out", out0, "--att-weight", "0"])
    train_rl.main(args + ["--out", out1, "--att-weight", "1"])
    r0, r1 = rows(out0)[0], rows(out1)[0]
    assert r0["att_share"] == pytest.approx(r1["att_share"])  # same rollouts, logged either way
    assert r1["reward"] == pytest.approx(r0["reward"] + r1["att_share"] * r1["latent_rate"], abs=1e-5)
    assert reward.parse_answer("<answer>A</answer>") == "A"


def pair_replies(m, tok):
    """Three replies that each name two objects (position, distance, position): samples, batch, inputs."""
    samples = [data.make_sample(0, "val", i) for i in (0, 4, 5)]
    batch = M.encode(m, tok, samples, [data.chat_response(s.answer, s.reason) for s in samples])
    return samples, batch, {k: v for k, v in batch.items() if k != "labels"}


def named_objects(tok, batch, samples):
    """(row, position, object its colour word names, the object named before it or None), written out
    independently of train_sft.naming_words."""
    for b, s in enumerate(samples):
        words = tok.convert_ids_to_tokens(batch["input_ids"][b])
        prev = None
        for p in (batch["labels"][b] != -100).nonzero()[:, 0].tolist():
            obj = next((o for o in s.objects if o.colour == words[p]), None)
            if obj is not None:
                yield b, p, obj, prev
                prev = obj


def test_point_loss_matches_eager_attention(tiny):
    """The pointing loss against transformers' own eager attention probabilities of layer 0: head 0 on the
    objects a reply word names, head 2 on those the previous naming word named."""
    m, tok = tiny
    samples, batch, inputs = pair_replies(m, tok)
    with torch.no_grad(), reward.capture_qk(m, [0]) as qk:
        m(**inputs)
        loss = train_sft.point_loss(m, tok, qk, batch, samples)
    with torch.no_grad(), reward.eager_attention(m):
        att = m(**inputs, output_attentions=True).attentions[0]  # (B, H, L, L)
    terms = []
    for b, p, obj, prev in named_objects(tok, batch, samples):
        cells = (batch["input_ids"][b] == m.config.image_token_id).nonzero()[:, 0]
        for head, o in ((0, obj), (train_sft.POINT_PREV_HEAD, prev)):
            if o is not None:
                target = cells[lvr.region_tokens(o.bbox(data.IMAGE_SIZE), 6, 6)]
                terms.append(-att[b, head, p, target].sum().log())
    assert len(terms) == 2 * 6 - 3  # three replies naming two objects each; the first has no previous
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


def test_coord_loss_against_transformers_hidden_states(tiny):
    """The coordinate read-out against layer 0's output as transformers returns it (hidden_states[1]): at
    each reply word naming one object, the centres of that object and of the one named before it, squared
    error over the known centres in units of 1/12, written out by hand."""
    m, tok = tiny
    samples, batch, inputs = pair_replies(m, tok)
    probe = train_sft.GroundingProbe(m, tok)
    torch.nn.init.normal_(probe.coord.weight, std=0.1)
    with torch.no_grad(), train_sft.layer0_output(m, True) as h0:
        m(**inputs)
        loss, n = train_sft.coord_loss(probe, h0[0], batch, samples, tok)
    with torch.no_grad():
        hs = m(**inputs, output_hidden_states=True).hidden_states[1]
    err, count = 0.0, 0
    for b, p, obj, prev in named_objects(tok, batch, samples):
        pred = probe.coord(hs[b, p] / hs[b, p].pow(2).mean().add(1e-6).sqrt())
        for j, o in ((0, obj), (2, prev)):
            if o is not None:
                err += (pred[j] - (o.cx / data.IMAGE_SIZE - 0.5)) ** 2 + (pred[j + 1] - (o.cy / data.IMAGE_SIZE - 0.5)) ** 2
                count += 2
    assert n == count == 2 * (2 * 6 - 3)  # six naming words; the first of each reply has no previous object
    assert torch.allclose(loss, 12 * err / count, atol=1e-5)


# ------------------------------------------------------------------------- micro-batching, memory
def one_step(ckpt, extra, samples, micro=None, hook=None):
    """One grpo_step from `ckpt` on `samples`: (the model after it, its log row)."""
    args = train_rl.parse_args(["--model", ckpt, "--prompts", str(len(samples)), "--group", "4", "--max-new-tokens", "12",
                                "--latent-steps", "3", "--lr", "1e-3", "--temperature", "1.0"]
                               + (["--micro-batch", str(micro)] if micro else []) + extra)
    model, tok = M.load_model(ckpt)
    model.train()
    for p in model.model.visual.parameters():
        p.requires_grad_(args.train_vision)
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if hook:
        model.model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    row = train_rl.grpo_step(args, model, tok, None, opt, samples, 0, reward.LengthPenalty())
    return model, row


@pytest.mark.parametrize("loss", train_rl.LOSSES)
def test_micro_batches_give_the_full_batch_update(tiny_ckpt, samples, loss):
    """Micro-batches of 1, 5 and all 20 rollouts: the same gradient and the same weights after the step."""
    runs = [one_step(tiny_ckpt, ["--loss", loss], samples, micro) for micro in (1, 5, 20)]
    assert 0 < runs[0][1]["latent_rate"] < 1 and runs[0][1]["zero_spread"] < 1
    ref = dict(runs[0][0].named_parameters())
    for model, row in runs[1:]:
        assert row["loss"] == pytest.approx(runs[0][1]["loss"], abs=1e-6)
        noisy = moved = 0
        for n, p in model.named_parameters():
            if p.grad is None:
                assert torch.equal(p, ref[n]), n
                continue
            g = ref[n].grad
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-8), n
            # Adam's first step is lr * g / (|g| + eps): where g is float noise around 0 (e.g. k_proj's bias,
            # whose gradient is 0 in exact arithmetic) the same noise may move a weight by up to 2 lr
            noise = g.abs() < 1e-6
            assert ((p - ref[n]).abs() <= torch.where(noise, 2e-3, 1e-6)).all(), n
            noisy, moved = noisy + int((noise & (g != 0)).sum()), moved + int((g != 0).sum())
        assert noisy < 0.02 * moved  # nearly every weight is held to 1e-6


def test_grad_ckpt_gives_the_same_gradient(tiny_ckpt, samples):
    (a, _), (b, _) = (one_step(tiny_ckpt, extra, samples[:2], 3) for extra in ([], ["--grad-ckpt"]))
    assert b.model.language_model.gradient_checkpointing and not a.model.language_model.gradient_checkpointing
    grads = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()) if p.grad is not None]
    assert len(grads) > 10 and all(torch.allclose(g, h, rtol=1e-5, atol=1e-9) for g, h in grads)


@pytest.mark.parametrize("train_vision", [False, True])
def test_vision_tower_runs_once_per_prompt(tiny_ckpt, samples, train_vision):
    """Per step the vision tower sees each question's image once while decoding; the scoring passes reuse
    those visual tokens, and with --train-vision the update runs the tower once more per prompt."""
    seen = []
    hook = lambda mod, args, kwargs: seen.append(int((args[1] if len(args) > 1 else kwargs["grid_thw"]).shape[0]))  # noqa: E731
    one_step(tiny_ckpt, ["--train-vision"] if train_vision else [], samples[:3], 4, hook)
    assert sum(seen) == 3 * (2 if train_vision else 1)


def test_logps_equal_the_plain_log_softmax(tiny, samples):
    """Chunked, checkpointed log-probs == log_softmax(lm_head(h) / T) gathered, in value and in gradient."""
    m, tok = tiny
    roll = lvr.generate(m, tok, M.encode(m, tok, samples[:2]), G=2, max_new_tokens=10, latent_steps=3, temperature=1.0,
                        generator=torch.Generator().manual_seed(1), force=torch.tensor([1, 0, 0, 0]))
    args = train_rl.parse_args(["--temperature", "0.7"])
    h0 = lvr.score_forward(m, roll).detach()
    out = []
    for chunk in (1, 4, 1000):
        h = h0.clone().requires_grad_()
        lp = train_rl.token_logps(m, h, roll, args, chunk=chunk)
        lp[roll.mask].sum().backward()
        out.append((lp.detach(), h.grad))
    h = h0.clone().requires_grad_()
    logits = m.lm_head(h) / 0.7
    logits[..., lvr.structural_ids(m)] = float("-inf")
    plain = torch.log_softmax(logits, -1).gather(-1, roll.tokens[..., None])[..., 0]
    sampled = roll.mask & ~roll.latent_mask & ~roll.forced
    plain[~sampled].detach().zero_()
    plain = torch.where(sampled, plain, torch.zeros_like(plain))
    plain = torch.where(roll.latent_mask, -0.5 * (roll.latents - h).pow(2).sum(-1) / 100, plain)
    plain[roll.mask].sum().backward()
    for lp, g in out:
        # compared where the rollout is (after EOS nothing is scored; the reference above zeroes those)
        assert torch.allclose(lp[roll.mask], plain.detach()[roll.mask], atol=1e-5) and torch.allclose(g, h.grad, atol=1e-6)


def test_rl_runs_in_bf16_with_a_reference(tiny_ckpt, tmp_path):
    """--dtype bf16 (autocast, here on the CPU) with --beta: the reference in bf16; a finite step, fp32 weights saved."""
    out = str(tmp_path / "bf16")
    train_rl.main(["--model", tiny_ckpt, "--steps", "1", "--out", out, "--dtype", "bf16", "--beta", "0.1",
                   "--micro-batch", "3"] + TINY_RL)
    row = rows(out)[0]
    assert not row["skipped"] and math.isfinite(row["loss"]) and row["kl"] >= 0
    assert all(v.dtype == torch.float32 for v in weights(out).values())


def test_micro_batch_default_follows_the_model_size(tiny_ckpt):
    """A small-vl checkpoint given by path scores a whole step at once (as --model small-vl does); a model of
    100M parameters or more gets micro-batches of 4; an explicit --micro-batch is kept."""
    args = train_rl.parse_args(["--model", tiny_ckpt])
    model, _ = M.load_model(tiny_ckpt)
    train_rl.default_micro_batch(args, model)
    assert args.micro_batch == args.prompts * args.group == 64
    big = torch.nn.Linear(10_000, 10_001, device="meta")  # 100M parameters, no memory
    args = train_rl.parse_args(["--model", tiny_ckpt])
    train_rl.default_micro_batch(args, big)
    assert args.micro_batch == 4
    args = train_rl.parse_args(["--model", tiny_ckpt, "--micro-batch", "3"])
    train_rl.default_micro_batch(args, big)
    assert args.micro_batch == 3


def test_default_base_is_the_shipped_one_of_its_seed_at_the_shipped_recipe():
    base = lambda *argv: train_sft.parse_args(list(argv)).base  # noqa: E731
    assert base() == os.path.join("checkpoints", "small-vl-base")
    assert base("--seed", "2") == os.path.join("checkpoints", "small-vl-base-s2")
    assert base("--seed", "3") == os.path.join("runs", "small-vl-base-seed3")  # not shipped: trained first
    assert base("--base-steps", "500") == os.path.join("runs", "small-vl-base")  # another recipe than the shipped one


def test_rl_starts_from_the_shipped_stage_1_model_of_its_task(monkeypatch, tmp_path):
    """small-vl RL: the default task's shipped LVR SFT model, the easy task's with --task easy, the strict one
    with --strict; a run of that task and kind under runs/ comes first; default run folders name another task."""
    start = lambda *argv: train_rl.initial_model(train_rl.parse_args(list(argv)))  # noqa: E731
    assert start() == os.path.join("checkpoints", "small-vl-hard-sft")
    assert start("--task", "easy") == os.path.join("checkpoints", "small-vl-sft")
    assert start("--strict") == os.path.join("checkpoints", "small-vl-hard-sft-strict")
    assert train_rl.parse_args([]).out == os.path.join("runs", "small-vl-rl-att")
    assert train_rl.parse_args(["--task", "easy"]).out == os.path.join("runs", "small-vl-rl-att-easy")
    assert train_sft.parse_args(["--task", "easy", "--no-latents"]).out == os.path.join("runs", "small-vl-sft-text-easy")
    # a real model's runs are named after it (its run folder for a run's checkpoint/), never small-vl's
    real = os.path.join("runs", "Qwen2.5-VL-3B-Instruct-sft", "checkpoint")
    assert train_rl.parse_args(["--model", real, "--data", "requirements.txt"]).out == os.path.join(
        "runs", "Qwen2.5-VL-3B-Instruct-sft-rl-att")
    assert train_rl.parse_args(["--model", real + os.sep, "--att-weight", "0", "--data", "requirements.txt"]).out == os.path.join(
        "runs", "Qwen2.5-VL-3B-Instruct-sft-rl")
    assert train_sft.parse_args(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--data", "requirements.txt"]).out == os.path.join(
        "runs", "Qwen2.5-VL-3B-Instruct-sft")
    repo = os.getcwd()
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(repo, "checkpoints"), "checkpoints")
    os.makedirs(os.path.join("runs", "small-vl-sft-easy", "checkpoint"))
    assert start("--task", "easy") == os.path.join("runs", "small-vl-sft-easy", "checkpoint")
    assert start() == os.path.join("checkpoints", "small-vl-hard-sft")  # the easy run is not the hard task's


def test_hard_task_is_recorded_and_followed(tiny_ckpt, tmp_path):
    """Stage 1 on the hard task from an easy-task model: the hard words get embedding rows, config.json
    records the task, and --resume, eval.py and train_rl.py follow it without being told."""
    out = str(tmp_path / "sft")
    args = ["--model", "small-vl", "--base", tiny_ckpt, "--out", out, "--save-every", "1"] + TINY_SFT
    train_sft.main(args + ["--task", "hard", "--steps", "1"])
    ckpt = os.path.join(out, "checkpoint")
    assert M.saved_task(ckpt) == "hard" and M.saved_task(tiny_ckpt) == "easy"
    model, tok = M.load_model(ckpt)
    assert len(tok) == len(M.build_tokenizer("hard")) == model.get_input_embeddings().num_embeddings
    assert set(json.load(open(os.path.join(out, "eval_val.json")))["normal"]["per_type"]) == set(data.qtypes_of("hard"))
    train_sft.main(args + ["--steps", "2", "--resume"])  # no --task: the run's
    assert torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["args"]["task"] == "hard"
    with pytest.raises(SystemExit, match="--task"):
        train_sft.main(args + ["--steps", "3", "--resume", "--task", "easy"])  # another data stream: refused
    res = str(tmp_path / "eval.json")
    ev.main(["--model", ckpt, "--n", "8", "--out", res, "--max-new-tokens", "8"])
    assert [r["qtype"] for r in json.load(open(res))["records"]["normal"]] == list(data.qtypes_of("hard")) * 2
    rl = str(tmp_path / "rl")
    train_rl.main(["--model", ckpt, "--steps", "1", "--out", rl] + TINY_RL)
    assert M.saved_task(os.path.join(rl, "checkpoint")) == "hard"
