"""The latent decode loop against full-recompute and per-sample oracles, interventions, the SFT loss by hand."""
import pytest
import torch
import torch.nn.functional as F

import lvr
import model as M


def ids_of(model):
    return M.lvr_token_ids(model)


def decode(model, tok, samples, **kw):
    prompt = M.encode(model, tok, samples)
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("latent_steps", 3)
    return lvr.generate(model, tok, prompt, **kw)


FORCE = torch.tensor([1, 0, 1, -1, 1])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_equals_full_recompute(tiny, samples, temperature):
    m, tok = tiny
    runs = [decode(m, tok, samples, G=2, force=FORCE.repeat_interleave(2), temperature=temperature, top_p=0.9,
                   generator=torch.Generator().manual_seed(3), use_cache=c) for c in (True, False)]
    cached, full = runs
    assert cached.latent_mask.any(), "the test needs latent steps"
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.latent_mask, full.latent_mask)
    assert (cached.latents - full.latents).abs().max() < 1e-5


def test_batched_equals_per_sample(tiny, samples):
    m, tok = tiny
    lens = [M.encode(m, tok, [s])["input_ids"].shape[1] for s in samples]
    assert len(set(lens)) > 1, "prompts of different lengths are needed to exercise left padding"
    batched = decode(m, tok, samples, force=FORCE)
    for i, s in enumerate(samples):
        one = decode(m, tok, [s], force=FORCE[i:i + 1])
        T = one.tokens.shape[1]
        assert torch.equal(batched.tokens[i, :T], one.tokens[0])
        assert torch.equal(batched.latent_mask[i, :T], one.latent_mask[0])
        assert (batched.latents[i, :T] - one.latents[0]).abs().max() < 1e-5


def test_group_rows_share_the_prompt(tiny, samples):
    m, tok = tiny
    roll = decode(m, tok, samples[:2], G=3, force=torch.tensor([1, 1, 1, -1, -1, -1]))
    assert roll.tokens.shape[0] == 6
    assert roll.prow.tolist() == [0, 0, 0, 1, 1, 1] and roll.prompt["input_ids"].shape[0] == 2  # one prompt per group
    assert torch.equal(roll.tokens[0], roll.tokens[1])  # greedy: identical rows within a group
    assert roll.opened.tolist() == [True] * 3 + [False] * 3


def test_latent_span_layout(tiny, samples):
    m, tok = tiny
    ids = ids_of(m)
    roll = decode(m, tok, samples, force=torch.ones(5, dtype=torch.long), latent_steps=4)
    for row, lat in zip(roll.tokens, roll.latent_mask):
        assert row[0] == ids["lvr_start_id"]
        assert lat[1:5].all() and not lat[0] and not lat[5]  # (a random model may open another span later)
        assert (row[1:5] == ids["lvr_id"]).all() and row[5] == ids["lvr_end_id"]
    # the fed latent is the hidden state of the position before it
    h = lvr.score_forward(m, roll)
    assert (h[:, 1:5] - roll.latents[:, 1:5]).abs().max() < 1e-5


def test_drop_feeds_no_latents(tiny, samples):
    m, tok = tiny
    ids = ids_of(m)
    roll = decode(m, tok, samples, force=torch.ones(5, dtype=torch.long), mode="drop")
    assert not roll.latent_mask.any() and roll.latents.abs().sum() == 0
    assert (roll.tokens[:, 0] == ids["lvr_start_id"]).all() and (roll.tokens[:, 1] == ids["lvr_end_id"]).all()


def test_noise_replaces_latents(tiny, samples):
    m, tok = tiny
    force, K = torch.ones(5, dtype=torch.long), 3
    normal = decode(m, tok, samples, force=force, latent_steps=K)
    noise = decode(m, tok, samples, force=force, latent_steps=K, mode="noise", generator=torch.Generator().manual_seed(7))
    matched = decode(m, tok, samples, force=force, latent_steps=K, mode="noise_norm",
                     generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise.latent_mask, normal.latent_mask) and torch.equal(matched.latent_mask, normal.latent_mask)
    # plain noise: exactly the generator's standard normal draws (one draw of N x D per decode step)
    g, D = torch.Generator().manual_seed(7), normal.latents.shape[-1]
    draws = torch.stack([torch.randn((5, D), generator=g) for _ in range(K + 1)], 1)
    assert torch.allclose(noise.latents[:, 1:K + 1], draws[:, 1:K + 1])
    # norm-matched: the first latent replaces the same hidden state as in the normal run
    real, fake = normal.latents[:, 1], matched.latents[:, 1]
    assert torch.allclose(fake.norm(dim=-1), real.norm(dim=-1), rtol=1e-5)
    assert F.cosine_similarity(fake, real, dim=-1).abs().max() < 0.5
    assert torch.allclose(fake / fake.norm(dim=-1, keepdim=True), draws[:, 1] / draws[:, 1].norm(dim=-1, keepdim=True), atol=1e-5)


def test_forcing_and_learned_exit(tiny, samples):
    m, tok = tiny
    ids = ids_of(m)
    never = decode(m, tok, samples, force=-torch.ones(5, dtype=torch.long))
    assert not never.opened.any()
    with pytest.raises(ValueError, match="latent_exit"):
        decode(m, tok, samples, latent_exit="sometimes")
    with pytest.raises(ValueError, match="latent mode"):
        decode(m, tok, samples, mode="silence")
    # one span fits in 6 new tokens: <|lvr_start|>, 4 latent steps, <|lvr_end|>
    run = lambda **kw: lvr.generate(m, tok, M.encode(m, tok, samples), max_new_tokens=6, latent_steps=4,
                                    force=torch.ones(5, dtype=torch.long), **kw)
    assert run().latent_mask.sum(1).eq(4).all()
    # learned exit: a head that always prefers <|lvr_end|> closes every span before its first latent step
    head = m.lm_head
    try:
        m.lm_head = torch.nn.Linear(head.in_features, head.out_features)
        m.lm_head.weight.data.copy_(head.weight)
        m.lm_head.bias.data.zero_()[ids["lvr_end_id"]] = 1e4
        learned = run(latent_exit="learned")
        assert not learned.latent_mask.any() and (learned.tokens[:, 0] == ids["lvr_start_id"]).all()
        assert (learned.tokens[:, 1] == ids["lvr_end_id"]).all()
    finally:
        m.lm_head = head


def test_region_tokens_known_boxes():
    assert lvr.region_tokens([0, 0, 1 / 6, 1 / 6], 6, 6) == [0]
    assert lvr.region_tokens([0.5, 0.5, 1.0, 1.0], 6, 6) == [21, 22, 23, 27, 28, 29, 33, 34, 35]
    assert lvr.region_tokens([0.40, 0.10, 0.45, 0.12], 6, 6) == [2]  # small box inside one cell
    assert lvr.region_tokens([0.30, 0.0, 0.36, 0.2], 6, 6) == [1, 2, 7, 8]  # straddles a cell border
    assert lvr.region_tokens([0.0, 0.0, 1.0, 0.5], 2, 4) == [0, 1, 2, 3]


def test_slot_groups_pool_boxes_onto_k():
    boxes = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    g = lvr.slot_groups(boxes, 6, 6, "pooled", 8)
    assert len(g) == 8
    first, second = set(lvr.region_tokens(boxes[0], 6, 6)), set(lvr.region_tokens(boxes[1], 6, 6))
    assert all(set(s) <= first for s in g[:4]) and all(set(s) <= second for s in g[4:])
    assert set().union(*g[:4]) == first
    one = lvr.slot_groups([[0, 0, 1 / 6, 1 / 6]], 6, 6, "pooled", 8)
    assert one == [[0]] * 8  # one token repeated onto all slots
    assert lvr.slot_groups(boxes, 6, 6, "bbox") == [[i] for i in sorted(first | second)]
    with pytest.raises(ValueError, match="latent target"):
        lvr.slot_groups(boxes, 6, 6, "mean")


def test_sft_loss_equals_hand_written(tiny, samples):
    """CE over response text (no CE on <|lvr|>) + lam * MSE, via transformers' own forward."""
    m, tok = tiny
    lam, K = 0.1, 4
    chunk = samples[:3]
    batch, W = lvr.sft_batch(m, tok, chunk, [True, False, True], K)
    ids, labels = batch["input_ids"], batch["labels"]
    assistant = tok.convert_tokens_to_ids("assistant")
    for b in range(len(chunk)):  # labels start right after the prompt's "assistant" word
        start = (ids[b] == assistant).nonzero()[0, 0]
        assert (labels[b, :start + 1] == -100).all() and (labels[b, start + 1:] == ids[b, start + 1:]).all()
    groups = [lvr.slot_groups(s.bboxes, 6, 6, "pooled", K) if i != 1 else [] for i, s in enumerate(chunk)]
    got = lvr.sft_loss(m, batch, W, lam)

    with torch.no_grad():
        feats = lvr.image_features(m, batch["pixel_values"], batch["image_grid_thw"])
        emb = m.get_input_embeddings()(ids).clone()
        targets = {}
        for b, g in enumerate(groups):
            slots = (ids[b] == m.config.lvr_id).nonzero()[:, 0].tolist()
            for p, idx in zip(slots, g):
                targets[(b, p)] = feats[[36 * b + j for j in idx]].mean(0)
                emb[b, p] = targets[(b, p)]
        out = m.model(input_ids=ids, inputs_embeds=emb, attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      mm_token_type_ids=batch["mm_token_type_ids"])
        h = out.last_hidden_state
        logits = m.lm_head(h)
        ce_terms, mse_terms = [], []
        for b in range(len(chunk)):
            for p in range(ids.shape[1] - 1):
                nxt = ids[b, p + 1].item()
                if labels[b, p + 1] != -100 and nxt != m.config.lvr_id:
                    ce_terms.append(-torch.log_softmax(logits[b, p], -1)[nxt])
                if (b, p + 1) in targets:
                    mse_terms.append(((h[b, p] - targets[(b, p + 1)]) ** 2).mean())
        ce, mse = torch.stack(ce_terms).mean(), torch.stack(mse_terms).mean()
    assert len(mse_terms) == 2 * K
    assert abs(got["ce"].item() - ce.item()) < 1e-5
    assert abs(got["mse"].item() - mse.item()) < 1e-5
    assert abs(got["loss"].item() - (ce + lam * mse).item()) < 1e-5


def test_multi_image_prompts_decode_like_single_ones(tiny, samples):
    """A row with two images (BLINK-style) among one-image rows: cache == recompute, batched == alone."""
    import dataclasses
    m, tok = tiny
    two = dataclasses.replace(samples[1], extra_images=[samples[2].image])
    chunk = [samples[0], two, samples[3]]
    prompt = M.encode(m, tok, chunk)
    assert prompt["image_grid_thw"].shape[0] == 4
    force = torch.tensor([1, 1, 0]).repeat_interleave(2)
    kw = dict(G=2, max_new_tokens=10, latent_steps=2, force=force)
    cached, full = (lvr.generate(m, tok, prompt, use_cache=c, **kw) for c in (True, False))
    assert torch.equal(cached.tokens, full.tokens) and (cached.latents - full.latents).abs().max() < 1e-5
    alone = lvr.generate(m, tok, M.encode(m, tok, [two]), G=2, max_new_tokens=10, latent_steps=2,
                         force=torch.tensor([1, 1]))
    T = alone.tokens.shape[1]
    assert torch.equal(cached.tokens[2:4, :T], alone.tokens)


def test_structural_tokens_are_never_sampled(tiny, samples):
    """A head that prefers the structural tokens by far still never samples them as text: image and vision
    tokens, <|lvr|>, and outside a span <|lvr_latent_end|> and <|lvr_end|> (each <|lvr_end|> is forced)."""
    m, tok = tiny
    cfg = m.config
    banned = lvr.structural_ids(m)
    assert {cfg.lvr_end_id, cfg.lvr_latent_end_id, cfg.lvr_id, cfg.image_token_id} <= set(banned)
    head = m.lm_head
    try:
        m.lm_head = torch.nn.Linear(head.in_features, head.out_features)
        m.lm_head.weight.data.copy_(head.weight)
        m.lm_head.bias.data.zero_()[banned] = 1e4
        roll = decode(m, tok, samples, G=2, temperature=1.0, generator=torch.Generator().manual_seed(0),
                      force=torch.tensor([1, 0] * 5))
    finally:
        m.lm_head = head
    text = roll.tokens[~roll.latent_mask & roll.mask]
    assert not torch.isin(text, torch.tensor([b for b in banned if b != cfg.lvr_end_id])).any()
    ends = roll.tokens == cfg.lvr_end_id
    assert ends[0::2].any(1).all() and torch.equal(ends, roll.forced & ends)
    assert torch.equal(roll.forced & ~ends, torch.zeros_like(ends).index_fill(0, torch.arange(0, 10, 2), True) &
                       (torch.arange(ends.shape[1]) == 0))  # the forced opens at t=0, nothing else


def test_zero_repeat_and_given_latents(tiny, samples):
    """The ablation arms: zero vectors; the span's first latent repeated; caller-given vectors (oracle)."""
    m, tok = tiny
    force = torch.ones(5, dtype=torch.long)
    normal, zero, rep = (decode(m, tok, samples, force=force, latent_steps=4, mode=mode) for mode in ("normal", "zero", "repeat"))
    assert zero.latent_mask[:, 1:5].all() and zero.latents.abs().sum() == 0
    assert torch.allclose(rep.latents[:, 1], normal.latents[:, 1])  # the first latent is the model's own
    assert all(torch.equal(rep.latents[:, k], rep.latents[:, 1]) for k in (2, 3, 4))
    assert not torch.allclose(normal.latents[:, 2], normal.latents[:, 1])
    given = torch.randn(5, 4, m.config.text_config.hidden_size)
    fed = decode(m, tok, samples, force=force, latent_steps=4, given=given)
    assert torch.allclose(fed.latents[:, 1:5], given)
    prompt = M.encode(m, tok, samples)
    oracle = lvr.oracle_latents(m, prompt, samples, K=4)
    feats = lvr.image_features(m, prompt["pixel_values"], prompt["image_grid_thw"])[:36]  # the first image's 6 x 6
    groups = lvr.slot_groups(samples[0].bboxes, 6, 6, "pooled", 4)
    assert oracle.shape == (5, 4, m.config.text_config.hidden_size)
    assert torch.allclose(oracle[0], torch.stack([feats[g].mean(0) for g in groups]), atol=1e-6)


def test_inverse_cdf_sampling_follows_the_nucleus():
    """Evenly spaced uniforms land on each kept token in proportion to its renormalised probability."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    probs = torch.softmax(logits[0], -1)
    u = (torch.arange(10000) + 0.5) / 10000
    picks = lvr.sample_token(logits.expand(10000, -1), 1.0, 0.9, u)
    kept = probs.sort(descending=True).values.cumsum(0) - probs.sort(descending=True).values < 0.9
    want = torch.where(kept, probs, torch.zeros_like(probs))  # logits are sorted already
    assert torch.allclose(torch.bincount(picks, minlength=5) / 10000, want / want.sum(), atol=2e-4)


def test_per_group_generators_make_rollouts_independent_of_batching(tiny, samples):
    """One generator per question: its G rollouts are the same whether decoded alone or with others."""
    m, tok = tiny
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    kw = dict(G=3, temperature=1.0, top_p=0.95, mode="noise")
    together = decode(m, tok, samples, generator=gens(range(5)), **kw)
    assert len({tuple(r.tolist()) for r in together.tokens[:3]}) > 1, "sampling must differ within a group"
    for i, s in enumerate(samples):
        one = decode(m, tok, [s], generator=gens([i]), **kw)
        T = one.tokens.shape[1]
        assert torch.equal(together.tokens[3 * i:3 * i + 3, :T], one.tokens)
        assert torch.allclose(together.latents[3 * i:3 * i + 3, :T], one.latents)


def test_variable_span_lengths(tiny, samples):
    """--span-lengths: each reply's span has its own number of slots (seeded per sample, within LO..HI)."""
    import train_sft
    m, tok = tiny
    batch, W = lvr.sft_batch(m, tok, samples[:3], [True, True, False], [2, 5, 7])
    slots = (batch["input_ids"] == m.config.lvr_id).sum(1).tolist()
    assert slots == [2, 5, 0] and W.shape[0] == 7
    args = train_sft.parse_args(["--span-lengths", "2,6", "--latent-steps", "8"])
    lengths = [train_sft.span_length(args, i) for i in range(200)]
    assert set(lengths) == {2, 3, 4, 5, 6} and lengths == [train_sft.span_length(args, i) for i in range(200)]
    assert train_sft.span_length(train_sft.parse_args(["--span-lengths", "8,8"]), 5) == 8  # fixed K
    default = train_sft.parse_args([])
    assert {train_sft.span_length(default, i) for i in range(400)} == set(range(1, 17))  # the default: 1..16
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--span-lengths", "0,3"])
