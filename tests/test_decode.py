"""The static-cache decoder (decode.Decoder: the step a CUDA graph captures, run eagerly here) against the
dynamic-cache loop and the no-cache oracle: token for token, latent for latent, in every situation the
loop handles, image-blind (blind=True) or not; the step against a full forward; a kept decoder reused;
a GRPO step; no host syncs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import bench_rollout
import decode
import lvr
import model as M
import reward
import train_rl
from test_train import one_step

FORCE = torch.tensor([1, 0, 1, -1, 1])


def run(m, tok, prompt, cache, **kw):
    """One decode with cache "dynamic" / "static" or the oracle ("none": the whole sequence recomputed)."""
    kw = {"max_new_tokens": 12, "latent_steps": 3, **kw}  # one generator per prompt row, fresh for every decoder
    kw["generator"] = [torch.Generator().manual_seed(10 + i) for i in range(prompt["input_ids"].shape[0])]
    return lvr.generate(m, tok, prompt, use_cache=cache != "none", cache=None if cache == "none" else cache, **kw)


def assert_same(a, b, atol=1e-5):
    """Token for token, flag for flag, latent for latent."""
    assert a.tokens.shape == b.tokens.shape
    for k in ("tokens", "latent_mask", "mask", "forced"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert (a.latents - b.latents).abs().max() <= atol


def three_ways(m, tok, prompt, **kw):
    runs = [run(m, tok, prompt, c, **kw) for c in ("static", "dynamic", "none")]
    assert_same(runs[0], runs[1])
    assert_same(runs[0], runs[2])
    if kw.get("blind"):
        blind_is_not_sighted(m, tok, prompt, runs[0], kw)
    return runs[0]


def blind_is_not_sighted(m, tok, prompt, blind, kw):
    """A blind parity test is not vacuous: some row that fed <|lvr_end|> decodes otherwise than with the image in
    sight, and every row that never did (no span, or still in it) decodes exactly as with the image in sight."""
    sighted = run(m, tok, prompt, "static", **{**kw, "blind": False})
    T = max(blind.tokens.shape[1], sighted.tokens.shape[1])
    same = (F.pad(blind.tokens, (0, T - blind.tokens.shape[1]), value=tok.pad_token_id)
            == F.pad(sighted.tokens, (0, T - sighted.tokens.shape[1]), value=tok.pad_token_id)).all(1)
    seen = (blind.tokens == m.config.lvr_end_id).any(1)
    assert seen.any() and not same[seen].all()
    assert same[~seen].all()


@pytest.fixture(scope="module")
def prompt(tiny, samples):
    m, tok = tiny
    return M.encode(m, tok, samples)


@pytest.mark.parametrize("blind", [False, True])
@pytest.mark.parametrize("mode", lvr.MODES)
def test_static_equals_dynamic_and_oracle_in_every_mode(tiny, prompt, mode, blind):
    """G = 2, left-padded prompts, forced / free / forbidden spans, greedy and nucleus sampling with one
    generator per prompt (the uniforms and, in the noise modes, the noise drawn in the dynamic loop's order);
    image-blind too (rows that never open a span among them)."""
    m, tok = tiny
    force = FORCE.repeat_interleave(2)
    greedy = three_ways(m, tok, prompt, G=2, force=force, mode=mode, blind=blind)
    sampled = three_ways(m, tok, prompt, G=2, force=force, mode=mode, temperature=1.0, top_p=0.9, blind=blind)
    if mode != "drop":
        assert greedy.latent_mask.any() and sampled.latent_mask.any(), "the test needs latent steps"
    assert greedy.forced[:, 0].sum() == 6  # the three forced opens, twice each


@pytest.mark.parametrize("blind", [False, True])
def test_eager_attention(tiny, prompt, blind):
    """Eager attention: the static step's additive float key mask (sdpa takes a boolean one)."""
    m, tok = tiny
    with reward.eager_attention(m):
        three_ways(m, tok, prompt, G=2, force=FORCE.repeat_interleave(2), temperature=1.0, top_p=0.9, blind=blind)


@pytest.fixture
def eos_head(tiny):
    """A head that samples EOS with a fair probability, so rows end at different steps."""
    m, tok = tiny
    head = m.lm_head
    m.lm_head = torch.nn.Linear(head.in_features, head.out_features)
    m.lm_head.weight.data.copy_(head.weight)
    m.lm_head.bias.data.zero_()[lvr.eos_ids(m, tok)] = 1.5
    yield m
    m.lm_head = head


@pytest.mark.parametrize("blind", [False, True])
def test_eos_mid_batch_and_the_done_check(tiny, prompt, eos_head, blind):
    """Rows end at different steps, some after two of the static decoder's `done` checks (every 16 steps), all
    before max_new_tokens at a step it does not check: it runs on over finished rows and drops the pad columns."""
    m, tok = tiny
    roll = three_ways(m, tok, prompt, G=2, temperature=1.0, max_new_tokens=60, force=FORCE.repeat_interleave(2),
                      blind=blind)
    lengths = roll.mask.sum(1)
    assert len(set(lengths.tolist())) > 3 and 2 * decode.CHECK_EVERY < roll.tokens.shape[1] < 60
    assert roll.tokens.shape[1] % decode.CHECK_EVERY != 0
    assert (roll.tokens[~roll.mask] == tok.pad_token_id).all()


@pytest.mark.parametrize("blind", [False, True])
def test_given_vectors_and_learned_exits(tiny, prompt, blind):
    """Given latents (all K slots, the first k), and spans that end early on a learned exit (under blind: rows
    that turn blind at different steps)."""
    m, tok = tiny
    given = torch.randn(10, 4, m.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    fed = three_ways(m, tok, prompt, G=2, force=torch.ones(10, dtype=torch.long), latent_steps=4, given=given, blind=blind)
    assert torch.allclose(fed.latents[:, 1:5], given)
    first = three_ways(m, tok, prompt, G=2, force=torch.ones(10, dtype=torch.long), latent_steps=6, given=given[:, :2],
                       blind=blind)
    assert torch.allclose(first.latents[:, 1:3], given[:, :2])  # donor-k: the first k slots given, then its own
    assert not torch.allclose(first.latents[:, 3:7], given[:, 1:2].expand(-1, 4, -1))
    ids = M.lvr_token_ids(m)
    head = m.lm_head
    try:  # a head that likes <|lvr_end|> a little: some spans end early, others run their K steps
        m.lm_head = torch.nn.Linear(head.in_features, head.out_features)
        m.lm_head.weight.data.copy_(head.weight)
        m.lm_head.bias.data.zero_()[ids["lvr_end_id"]] = 4.0
        roll = three_ways(m, tok, prompt, G=2, latent_exit="learned", temperature=1.0, latent_steps=5,
                          force=torch.ones(10, dtype=torch.long), max_new_tokens=16, blind=blind)
    finally:
        m.lm_head = head
    spans = roll.latent_mask.sum(1)
    assert (spans < 5).any() and (spans > 0).any()


@pytest.mark.parametrize("blind", [False, True])
def test_multi_image_prompts(tiny, samples, blind):
    m, tok = tiny
    two = dataclasses.replace(samples[1], extra_images=[samples[2].image])
    prompt = M.encode(m, tok, [samples[0], two, samples[3]])
    assert prompt["image_grid_thw"].shape[0] == 4
    three_ways(m, tok, prompt, G=2, latent_steps=2, max_new_tokens=10, force=torch.tensor([1, 1, 0]).repeat_interleave(2),
               temperature=1.0, blind=blind)


@pytest.mark.parametrize("blind", [False, True])
def test_the_buffer_step_equals_the_full_forward(tiny, prompt, blind):
    """After T eager steps the decoder's hidden state is the one a full forward over prompt + the T recorded
    inputs (tokens, and the fed vectors at latent slots) gives at the last position (under blind, with the 4-D
    blind mask); the last step's key mask is the prompt's padding mask, less the image columns in the rows that
    fed <|lvr_end|> when blind, and every written column."""
    m, tok = tiny
    T = 9
    roll = lvr.generate(m, tok, prompt, G=2, max_new_tokens=T, latent_steps=3, force=FORCE.repeat_interleave(2),
                        cache="static", keep=True, blind=blind)
    try:
        dec = m._lvr_decoder
        assert int(dec.t) == T and roll.tokens.shape[1] == T and roll.latent_mask.any()
        full = lvr.select_prompt(prompt, roll.prow.tolist(), roll.images, pixels=False)
        feats = torch.cat([roll.feats[p] for p in roll.prow.tolist()])
        attn = torch.cat([full["attention_mask"], torch.ones(10, T, dtype=torch.long)], 1)
        with torch.no_grad():
            want = lvr.recompute(m, full, feats, list(roll.tokens.T), list(roll.latents.transpose(0, 1)),
                                 list(roll.latent_mask.T), attn, blind)
        assert (dec.h - want).abs().max() < 1e-5
        L0 = prompt["input_ids"].shape[1]
        assert int(dec.at) == L0 + T and dec.mask[:, 0, 0, L0:L0 + T].all() and not dec.mask[:, 0, 0, L0 + T:].any()
        seen = (roll.tokens == m.config.lvr_end_id).any(1)
        assert seen.any() and not seen.all()
        hidden = (full["input_ids"] == m.config.image_token_id) & (seen[:, None] & blind)
        assert torch.equal(dec.mask[:, 0, 0, :L0], full["attention_mask"].bool() & ~hidden)
    finally:
        decode.release(m)


def test_a_kept_decoder_is_reused_and_gives_the_same_result(tiny, samples):
    """keep=True: the second call (other prompts of the same shape) reuses the buffers, the third (the first
    prompts again) gives exactly the first call's rollouts; a fresh decoder gives the second's."""
    m, tok = tiny
    a, b = M.encode(m, tok, samples), M.encode(m, tok, samples[::-1])
    assert a["input_ids"].shape == b["input_ids"].shape and not torch.equal(a["input_ids"], b["input_ids"])
    kw = dict(G=2, force=FORCE.repeat_interleave(2), temperature=1.0, top_p=0.9, mode="noise_norm")
    try:
        first = run(m, tok, a, "static", keep=True, **kw)
        dec = m._lvr_decoder
        L0 = a["input_ids"].shape[1]
        for buf in dec.keys + dec.values:  # what a diverged earlier call could leave in the unused columns
            buf[:, :, L0:] = float("nan")
        second = run(m, tok, b, "static", keep=True, **kw)
        assert m._lvr_decoder is dec
        third = run(m, tok, a, "static", keep=True, **kw)
        assert m._lvr_decoder is dec
    finally:
        decode.release(m)
    assert not hasattr(m, "_lvr_decoder")
    assert_same(first, third, atol=0)
    assert_same(second, run(m, tok, b, "static", **kw), atol=0)


def test_a_kept_decoder_serves_blind_and_sighted_calls(tiny, prompt):
    """Blind or not is a call's, not a decoder's: one kept decoder (on CUDA one captured graph) decodes a blind
    call, a sighted one, then a blind one again, each as a fresh decoder does (no image column or seen-<|lvr_end|>
    flag of one call leaks into the next)."""
    m, tok = tiny
    kw = dict(G=2, force=FORCE.repeat_interleave(2), temperature=1.0, top_p=0.9)
    try:
        blind = run(m, tok, prompt, "static", keep=True, blind=True, **kw)
        dec = m._lvr_decoder
        sighted = run(m, tok, prompt, "static", keep=True, **kw)
        again = run(m, tok, prompt, "static", keep=True, blind=True, **kw)
        assert m._lvr_decoder is dec
    finally:
        decode.release(m)
    assert_same(blind, again, atol=0)
    assert_same(blind, run(m, tok, prompt, "static", blind=True, **kw), atol=0)
    assert_same(sighted, run(m, tok, prompt, "static", **kw), atol=0)
    blind_is_not_sighted(m, tok, prompt, blind, {**kw, "blind": True})


@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_grpo_step_with_the_static_decoder_makes_the_same_update(tiny_ckpt, samples, strict):
    """The same update from the static decoder's rollouts as from the dynamic one's, image-blind (--strict) too."""
    (a, row_a), (b, row_b) = (one_step(tiny_ckpt, ["--cache", cache] + strict, samples[:3], micro=4)
                              for cache in ("dynamic", "static"))
    assert 0 < row_a["latent_rate"] and row_a["reward"] == pytest.approx(row_b["reward"], abs=1e-6)
    assert row_a["loss"] == pytest.approx(row_b["loss"], abs=1e-6)
    moved = 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n
            moved += 1
        assert (p - q).abs().max() < 1e-5, n
    assert moved > 10


def test_the_step_reads_nothing_back_to_the_host(tiny, prompt, monkeypatch):
    """No .item(), bool() or boolean-mask indexing in the static step (each one is a host sync on CUDA);
    the dynamic loop makes several per step (so the counter sees them)."""
    m, tok = tiny
    with bench_rollout.HostSyncs() as dyn:
        lvr.generate(m, tok, prompt, G=2, max_new_tokens=6, force=FORCE.repeat_interleave(2), cache="dynamic")
    assert dyn.count >= 6 * 3
    counts, step = [], decode.Decoder.step

    def counted(self):
        with bench_rollout.HostSyncs() as hs:
            step(self)
        counts.append(hs.ops)
    monkeypatch.setattr(decode.Decoder, "step", counted)
    for kw in (dict(temperature=1.0, top_p=0.9, mode="noise_norm", latent_exit="learned"),
               dict(mode="repeat", given=torch.randn(10, 3, m.config.text_config.hidden_size)),
               dict(temperature=1.0, blind=True)):
        lvr.generate(m, tok, prompt, G=2, max_new_tokens=6, force=FORCE.repeat_interleave(2), cache="static", **kw)
    assert len(counts) == 18 and not any(counts), counts


def test_cache_choice_and_errors(tiny, prompt, monkeypatch):
    m, tok = tiny
    assert lvr.default_cache("cpu") == "dynamic" and lvr.default_cache("cuda") == "graph"
    assert lvr.default_cache("cuda", sharded=True) == "dynamic"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        lvr.generate(m, tok, prompt, cache="graph")
    with pytest.raises(ValueError, match="unknown cache"):
        lvr.generate(m, tok, prompt, cache="paged")
    stats = {}
    lvr.generate(m, tok, prompt, max_new_tokens=5, cache="static", stats=stats)
    assert stats["steps"] == 5 and stats["cache"] == "static" and stats["decode_s"] > 0
    args = train_rl.parse_args(["--cache", "static"])
    assert args.cache == "static" and train_rl.parse_args([]).cache is None
    assert train_rl.parse_args(["--strict", "--cache", "static"]).cache == "static"
    monkeypatch.setattr(lvr, "default_cache", lambda *a: "static")  # as "graph" on CUDA: blind takes the default too
    lvr.generate(m, tok, prompt, max_new_tokens=5, stats=stats, blind=True)
    assert stats["cache"] == "static"
    for bad in (["--cache", "paged"], ["--cache", "graph", "--device", "cpu"]):
        with pytest.raises(SystemExit):
            train_rl.parse_args(bad)


def test_grouped_decode_attention_equals_transformers_sdpa():
    """The attention the compiled graph step uses (bench.py --profile --compile) against transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    layer = torch.nn.Module()
    layer.num_key_value_groups, layer.is_causal = 4, True
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.4
    mask[..., -1] = True
    want = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25)[0]
    got = decode.gqa_decode_attention(layer, q, k, v, mask, scaling=0.25)[0]
    assert got.shape == want.shape == (3, 1, 8, 16) and (got - want).abs().max() < 1e-6
    assert (got - sdpa_attention_forward(layer, q, k, v, torch.ones_like(mask), scaling=0.25)[0]).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's imports
def test_the_compiled_step_equals_the_eager_one(tiny, prompt, monkeypatch):
    """bench.py --compile's step (torch.compile'd, its attention gqa_decode_attention) run on the CPU with the
    static cache: the same rollouts as the eager step, traced as one graph (no graph break), the model's
    attention implementation restored after."""
    from torch._dynamo.utils import counters
    m, tok = tiny
    kw = dict(G=2, temperature=1.0, top_p=0.9, blind=True, keep=True)
    eager = run(m, tok, prompt, "static", **kw)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(lvr, "_COMPILE_STEP", True)
    try:
        got = run(m, tok, prompt, "static", **kw)
        assert m._lvr_decoder.step_fn != m._lvr_decoder.step  # the kept decoder is the compiled one
    finally:
        decode.release(m)
    assert_same(eager, got)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert m.config.text_config._attn_implementation == "sdpa"
