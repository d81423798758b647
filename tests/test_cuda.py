"""The CUDA paths: run with `python -m pytest -m cuda` on a GPU machine (skipped without one).
torch.compile of the fused attention reward against the naive oracle, the KV-cached decode on the GPU
against its full recompute, a bf16-autocast GRPO run end to end and its resume, the graph and static decoders
against the dynamic one."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import decode
import lvr
import model as M
import reward
import train_rl
from test_reward import rollouts_with_spans

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu(tiny):
    m, tok = tiny
    return M.build_small_vl(seed=0, text_hidden=64, text_layers=2, vision_hidden=32, vision_depth=1)[0].cuda(), tok


def test_compiled_fused_reward_equals_naive_on_cuda(gpu, samples):
    m, tok = gpu
    prompt, tokens, latents, latent, real = [x.cuda() if torch.is_tensor(x) else {k: v.cuda() for k, v in x.items()}
                                             for x in rollouts_with_spans(m, tok, samples)]
    with torch.no_grad(), reward.capture_qk(m, [0]) as qk:
        lvr.score_forward(m, lvr.rollout_of(m, prompt, tokens, latents, latent, real))
    q, k = qk[0]
    keys, queries = reward.span_masks(tokens, latent, real, m.config.lvr_start_id, m.config.lvr_end_id)
    pad = lambda t: torch.cat([torch.zeros_like(prompt["attention_mask"]).bool(), t], 1)  # noqa: E731
    full_mask = torch.cat([prompt["attention_mask"], real.long()], 1)
    compiled = reward.share_fn(q.device)
    assert compiled is not reward.attention_share
    got = compiled(q, k, pad(queries), pad(keys), full_mask)
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1).float()
    s = q.float() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    L = s.shape[-1]
    allowed = torch.ones(L, L, dtype=torch.bool, device=s.device).tril() & full_mask.bool()[:, None, None, :]
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)  # as eager attention masks: a left-pad row (no key) stays finite
    naive = reward.attention_share_naive(torch.softmax(s, -1), pad(queries), pad(keys))
    assert (got - naive).abs().max() < 1e-5


def test_kv_cache_equals_recompute_on_cuda(gpu, samples):
    m, tok = gpu
    prompt = {k: v.cuda() for k, v in M.encode(m, tok, samples).items()}
    force = torch.tensor([1, 0, 1, -1, 1], device="cuda")
    runs = [lvr.generate(m, tok, prompt, max_new_tokens=12, latent_steps=3, force=force, use_cache=c) for c in (True, False)]
    assert runs[0].latent_mask.any() and torch.equal(runs[0].tokens, runs[1].tokens)
    assert (runs[0].latents - runs[1].latents).abs().max() < 1e-4  # TF32-free fp32 on GPU: loose only for kernel order


def test_bf16_grpo_run_on_cuda(gpu, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    M.save_checkpoint(*gpu, ckpt)
    out = str(tmp_path / "rl")
    train_rl.main(["--model", ckpt, "--steps", "2", "--out", out, "--prompts", "2", "--group", "4",
                   "--max-new-tokens", "16", "--latent-steps", "3", "--temperature", "1.0", "--device", "cuda",
                   "--eval-every", "1", "--n-eval", "4"])
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in rows if "val_acc" in r] == [0, 1, 2]  # the validation curve on the default decoder
    rows = [r for r in rows if "val_acc" not in r]
    assert [r["step"] for r in rows] == [1, 2] and all(not r["skipped"] for r in rows)
    assert all(0 <= r["att_share"] <= 1 for r in rows)
    M.load_model(os.path.join(out, "checkpoint"), device="cuda")


def resume_equals_uninterrupted(m, tok, tmp_path, device):
    """2 steps in one run against 1 step, then --resume for the second (bf16 autocast, the device's default
    decoder): the same rollouts (rewards, lengths) and weights equal to float rounding. The CPU case is
    test_train.py's; here the CUDA generators' state and the fused AdamW's go through the save."""
    ckpt, full, part = (str(tmp_path / n) for n in ("ckpt", "full", "part"))
    M.save_checkpoint(m, tok, ckpt)
    args = ["--model", ckpt, "--prompts", "2", "--group", "4", "--max-new-tokens", "16", "--latent-steps", "3",
            "--temperature", "1.0", "--eval-every", "0", "--device", device, "--dtype", "bf16"]
    train_rl.main(args + ["--steps", "2", "--out", full])
    train_rl.main(args + ["--steps", "1", "--out", part])
    train_rl.main(args + ["--steps", "2", "--out", part, "--resume"])
    a, b = ([json.loads(line) for line in open(os.path.join(o, "log.jsonl"))] for o in (full, part))
    assert [r["step"] for r in b] == [1, 2]
    for key in ("reward", "acc", "length", "latent_rate"):
        assert a[1][key] == b[1][key], key
    wa, wb = (load_file(os.path.join(o, "checkpoint", "model.safetensors")) for o in (full, part))
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5


def test_resume_equals_uninterrupted_on_cuda(gpu, tmp_path):
    resume_equals_uninterrupted(*gpu, tmp_path, "cuda")


def _decode(m, tok, prompt, cache, **kw):
    gens = [torch.Generator(device="cuda").manual_seed(5 + i) for i in range(prompt["input_ids"].shape[0])]
    return lvr.generate(m, tok, prompt, G=2, max_new_tokens=20, latent_steps=3, temperature=1.0, top_p=0.9, generator=gens,
                        force=torch.tensor([1, 0, 1, -1, 1], device="cuda").repeat_interleave(2), cache=cache, **kw)


@pytest.mark.parametrize("blind", [False, True])
@pytest.mark.parametrize("mode", ["normal", "noise_norm", "repeat"])
def test_graph_and_static_decoders_equal_the_dynamic_one_on_cuda(gpu, samples, mode, blind):
    """fp32 on the GPU: the captured step replays what the eager static step and the dynamic loop compute,
    image-blind (per-row image keys hidden from each row's <|lvr_end|> on) or not."""
    m, tok = gpu
    prompt = {k: v.cuda() for k, v in M.encode(m, tok, samples).items()}
    runs = {c: _decode(m, tok, prompt, c, mode=mode, blind=blind) for c in ("dynamic", "static", "graph")}
    assert runs["dynamic"].latent_mask.any() and (runs["dynamic"].tokens == m.config.lvr_end_id).any()
    for c in ("static", "graph"):
        for k in ("tokens", "latent_mask", "mask", "forced"):
            assert torch.equal(getattr(runs[c], k), getattr(runs["dynamic"], k)), (c, k)
        assert (runs[c].latents - runs["dynamic"].latents).abs().max() < 1e-4, c


def test_graph_decoder_under_autocast_is_the_static_one_and_reuses_its_capture(gpu, samples):
    """bf16 autocast over fp32 weights (as train_rl runs): both decode with one bf16 copy of the weights, so the
    replayed graph gives the eager static step's rollouts (bf16: latents to its rounding); a kept graph gives
    exactly the same again; the weights are fp32 afterwards."""
    m, tok = gpu
    prompt = {k: v.cuda() for k, v in M.encode(m, tok, samples).items()}
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            static = _decode(m, tok, prompt, "static")
            graph = _decode(m, tok, prompt, "graph", keep=True)
            dec = m._lvr_decoder
            again = _decode(m, tok, prompt, "graph", keep=True)
            assert m._lvr_decoder is dec and dec.graph is not None
    finally:
        decode.release(m)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(graph.tokens, static.tokens) and (graph.latents.float() - static.latents.float()).abs().max() < 2e-2
    assert torch.equal(again.tokens, graph.tokens) and torch.equal(again.latents, graph.latents)


def test_a_kept_graph_serves_blind_and_sighted_calls_on_cuda(gpu, samples):
    """One captured graph decodes a blind call, a sighted one and a blind one again, each as the eager static
    step does (blind or not is what Decoder.load puts in the buffers, not part of the capture)."""
    m, tok = gpu
    prompt = {k: v.cuda() for k, v in M.encode(m, tok, samples).items()}
    try:
        got = [_decode(m, tok, prompt, "graph", keep=True, blind=True)]
        dec = m._lvr_decoder
        got += [_decode(m, tok, prompt, "graph", keep=True, blind=b) for b in (False, True)]
        assert m._lvr_decoder is dec and dec.graph is not None
    finally:
        decode.release(m)
    want = [_decode(m, tok, prompt, "static", blind=b) for b in (True, False, True)]
    assert want[0].tokens.shape != want[1].tokens.shape or not torch.equal(want[0].tokens, want[1].tokens)
    for g, w in zip(got, want):
        assert torch.equal(g.tokens, w.tokens) and torch.equal(g.latent_mask, w.latent_mask)
        assert (g.latents - w.latents).abs().max() < 1e-4


def test_graph_decoder_steps_make_no_host_sync(gpu, samples):
    import bench_rollout
    m, tok = gpu
    prompt = {k: v.cuda() for k, v in M.encode(m, tok, samples[:2]).items()}
    short, long = (bench_rollout.decode_once("graph", m, tok, prompt, 2, T, "cuda", sync_debug=True) for T in (4, 14))
    decode.release(m)
    # the 10 more steps add no sync (on an H100 the two calls' set-up syncs differed by one: 52 short, 51 long)
    assert long["steps"] - short["steps"] == 10 and long["syncs"] <= short["syncs"]


def test_allocator_counts_see_a_cudamalloc():
    """bench.allocator_counts (the gap and grpo tables' allocator column): a fresh 1 GiB block is a cudaMalloc
    since the count before it; off CUDA there is nothing to count."""
    import bench
    torch.cuda.empty_cache()  # no cached block to reuse
    before = bench.allocator_counts("cuda")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    retries, mallocs = bench.allocator_counts("cuda", since=before)
    assert mallocs >= 1 and retries >= 0 and bench.allocator_counts("cpu") is None
    del x
