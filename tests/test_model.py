"""Preprocessing against transformers' own Qwen2-VL image processor; loading real-format checkpoints; bad paths."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, \
    Qwen2VLForConditionalGeneration

import data
import lvr
import model as M


@pytest.mark.parametrize("w,h", [(640, 480), (1000, 300), (1920, 1080), (40, 40)])
def test_preprocessing_matches_the_checkpoints_own_processor(qwen_dir, w, h):
    """Pixel values and grid of our encode() against transformers' image processor loaded from the
    checkpoint directory by AutoImageProcessor (its min/max pixels) and against one set by hand."""
    from PIL import Image
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    model, tok = M.load_model(qwen_dir)
    img = np.random.default_rng(w).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    batch = M.encode(model, tok, [data.Sample("What is it?", "A", "", "x", [], image=img)])
    for ref_proc in (AutoImageProcessor.from_pretrained(qwen_dir), Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)):
        ref = ref_proc(images=[Image.fromarray(img)], return_tensors="pt")
        assert batch["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        diff = (batch["pixel_values"] - ref["pixel_values"].float()).abs().max().item()
        assert diff < 1e-5, diff
    n = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n == int(ref["image_grid_thw"].prod()) // 4
    print(f"parity {w}x{h}: grid {batch['image_grid_thw'].tolist()}, {n} image tokens, max |diff| {diff:.2e}")


def test_coordinate_channels_only_for_five_channel_towers(tiny):
    m, _ = tiny
    img = data.make_sample(0, "val", 0).image
    p5, g = M.preprocess_image(img, m)
    assert p5.shape == (144, 5 * 1 * 8 * 8) and g.tolist() == [[1, 12, 12]]
    xs = p5.view(144, 5, 8, 8)[:, 3]  # x ramp: constant down a column, increasing along a row
    assert torch.all(xs[:, :, 1:] > xs[:, :, :-1])


def roundtrip(model, tok, path):
    M.save_checkpoint(model, tok, str(path))
    return M.load_model(str(path))


def logits(model, tok, samples, n_prompt_only=True):
    b = M.encode(model, tok, samples)
    with torch.no_grad():
        return model(**b).logits


def test_small_vl_save_load_roundtrip(tiny, samples, tmp_path):
    m, tok = tiny
    m2, tok2 = roundtrip(m, tok, tmp_path / "ckpt")
    assert M.lvr_token_ids(m2) == M.lvr_token_ids(m)
    assert tok2.get_vocab() == tok.get_vocab()
    assert torch.allclose(logits(m, tok, samples[:2]), logits(m2, tok2, samples[:2]), atol=1e-5)
    assert not os.path.exists(str(tmp_path / "ckpt") + ".tmp")


def _word_tokenizer_without_lvr():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = [t for t in M.SPECIAL if t not in M.LVR_TOKENS]
    vocab = {t: i for i, t in enumerate(special + data.vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>", eos_token=data.IM_END)


def _stock_config(cls, tok, vocab_size):
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                eos_token_id=ids(data.IM_END), pad_token_id=ids("<|endoftext|>"))
    if cls is Qwen2VLConfig:
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, temporal_patch_size=2)
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      temporal_patch_size=2, fullatt_block_indexes=[0])
    return cls(text_config=text, vision_config=vision, image_token_id=ids(data.IMAGE_PAD),
               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids(data.VISION_START),
               vision_end_token_id=ids(data.VISION_END))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl"])
def test_stock_checkpoint_gets_lvr_tokens_and_decodes(arch, samples, tmp_path):
    """A tiny random stock Qwen2.5-VL / Qwen2-VL (3 channels, patch 14, temporal 2), tokenizer without
    LVR tokens: loading adds them, and the latent decode runs through the same patch."""
    tok = _word_tokenizer_without_lvr()
    cfg_cls, model_cls = (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration) if arch == "qwen2_5_vl" else \
        (Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    torch.manual_seed(0)
    stock = model_cls(_stock_config(cfg_cls, tok, len(tok)))
    stock.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m, tok2 = M.load_model(str(tmp_path))
    ids = M.lvr_token_ids(m)
    assert [tok2.convert_ids_to_tokens(ids[k]) for k in M.LVR_CONFIG_KEYS] == list(M.LVR_TOKENS)
    assert m.get_input_embeddings().num_embeddings == len(tok2) == len(tok) + 4
    roll = lvr.generate(m, tok2, M.encode(m, tok2, samples[:2]), max_new_tokens=8, latent_steps=2,
                        force=torch.tensor([1, 1]))
    assert roll.latent_mask[:, 1:3].all()
    full = lvr.generate(m, tok2, M.encode(m, tok2, samples[:2]), max_new_tokens=8, latent_steps=2,
                        force=torch.tensor([1, 1]), use_cache=False)
    assert torch.equal(roll.tokens, full.tokens) and (roll.latents - full.latents).abs().max() < 1e-4


def test_reference_lvr_ids_are_respected(samples, tmp_path):
    """A reference LVR checkpoint stores lvr_id / lvr_start_id / lvr_end_id in config.json: they win."""
    m, tok = M.build_small_vl(text_hidden=32, text_layers=1, vision_hidden=32, vision_depth=1)
    for key in M.LVR_CONFIG_KEYS:
        delattr(m.config, key)
    M.save_checkpoint(m, tok, str(tmp_path))
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(lvr_id=20, lvr_start_id=21, lvr_end_id=22)  # deliberately not the tokenizer's ids
    cfg_path.write_text(json.dumps(cfg))
    m2, _ = M.load_model(str(tmp_path))
    assert (m2.config.lvr_id, m2.config.lvr_start_id, m2.config.lvr_end_id) == (20, 21, 22)
    assert m2.config.lvr_latent_end_id == tok.convert_tokens_to_ids(data.LVR_LATENT_END)


def test_bad_model_paths_give_one_line_errors(tmp_path):
    cases = {}
    cases["missing"] = (str(tmp_path / "nope"), "not found")
    (tmp_path / "afile").write_text("x")
    cases["file"] = (str(tmp_path / "afile"), "not a directory")
    (tmp_path / "empty").mkdir()
    cases["no config"] = (str(tmp_path / "empty"), "no config.json")
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    cases["bad json"] = (str(bad_json), "not valid JSON")
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    cases["arch"] = (str(llama), "unsupported model_type")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    m, tok = M.build_small_vl(text_hidden=32, text_layers=1, vision_hidden=32, vision_depth=1)
    m.config.save_pretrained(noweights)
    cases["weights"] = (str(noweights), "no weights")
    for name, (path, message) in cases.items():
        with pytest.raises(M.ModelLoadError) as e:
            M.load_model(path)
        text = str(e.value)
        assert message in text and path in text and "\n" not in text, name


@pytest.mark.parametrize("name", ["small-vl-base", "small-vl-base-s1", "small-vl-base-s2", "small-vl-sft", "small-vl-sft-text",
                                  "small-vl-hard-sft", "small-vl-hard-sft-text", "small-vl-hard-sft-strict"])
def test_shipped_checkpoints_load_and_match_the_code(name):
    """The committed starting points load, hold finite weights, and are what the code builds: small-vl's
    config (every architecture field) and its tokenizer (the task's it records: the hard models' is longer)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", name)
    m, tok = M.load_model(path)
    assert M.saved_task(path) == ("hard" if "-hard-" in name else "easy")
    ref_tok = M.build_tokenizer(M.saved_task(path))
    assert tok.get_vocab() == ref_tok.get_vocab()
    want = M.small_vl_config(ref_tok)
    for part in ("text_config", "vision_config"):
        got, exp = getattr(m.config, part).to_dict(), getattr(want, part).to_dict()
        for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures"):
            got.pop(key, None), exp.pop(key, None)
        assert got == exp, part
    assert M.lvr_token_ids(m) == M.lvr_token_ids(M.build_small_vl()[0])
    assert all(torch.isfinite(p).all() for p in m.parameters())
