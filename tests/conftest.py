import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # 1 beside another torch job

import data  # noqa: E402
import model as M  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """A small random small-vl (same architecture, smaller sizes) and its tokenizer."""
    m, tok = M.build_small_vl(seed=0, text_hidden=64, text_layers=2, vision_hidden=32, vision_depth=1)
    return m, tok


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny):
    """The tiny model saved as a checkpoint directory (read-only for the tests that start from it)."""
    path = str(tmp_path_factory.mktemp("tiny") / "checkpoint")
    M.save_checkpoint(*tiny, path)
    return path


@pytest.fixture(scope="session")
def samples():
    """Questions of every type, with different prompt lengths (so batches carry left padding)."""
    return [data.make_sample(0, "val", i) for i in range(5)]


# --------------------------------------------------------- a checkpoint in the released Qwen2.5-VL layout
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # 151643-151664
LVR_SPECIAL = ["<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"]  # 151665-151668
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(lvr: bool):
    """Qwen's byte-level BPE (its pre-tokenizer split, byte alphabet, a few merges) with the real special
    token ids: ordinary ids are padded with unreachable filler up to 151643."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "n"), ("i", "s")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), 151643)})
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(QWEN_SPECIAL + (LVR_SPECIAL if lvr else []))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={})


def write_qwen_checkpoint(path, lvr=True, architectures=("Qwen2_5_VLForConditionalGeneration",), extra=None, seed=0):
    """A tiny random Qwen2.5-VL (3-channel, patch 14, merge 2, temporal 2, vocab 151936, tied embeddings)
    in the released layout: config.json (lvr_*_id at its top for the LVR variant), model.safetensors,
    tokenizer files, chat_template.json, preprocessor_config.json. `extra`: more tensors in the weights."""
    import json
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(path, exist_ok=True)
    text = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[0], out_hidden_size=32)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path, safe_serialization=True)
    qwen_tokenizer(lvr).save_pretrained(path)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN_TEMPLATE}, f)
    for name in ("chat_template.jinja",):  # the template lives in chat_template.json, as released
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                   "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "resample": 3, "rescale_factor": 0.00392156862745098}, f)
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    conf["architectures"] = list(architectures) if not isinstance(architectures, str) else architectures
    if lvr:
        conf = {"lvr_start_id": 151665, "lvr_id": 151666, "lvr_latent_end_id": 151667, "lvr_end_id": 151668, **conf}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=1)
    if extra:
        weights = load_file(os.path.join(path, "model.safetensors"))
        save_file({**weights, **extra}, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny LVR checkpoint directory in the released Qwen2.5-VL layout (see write_qwen_checkpoint)."""
    return write_qwen_checkpoint(tmp_path_factory.mktemp("qwen") / "lvr-ckpt")
