"""The small-vl preset, its tokenizer and image preprocessing, and loading/saving of Qwen2-VL-family models.

small-vl is transformers' own `Qwen2_5_VLForConditionalGeneration` built from a tiny config (the
paper's base architecture), so the latent patch in lvr.py runs unchanged on a real Qwen2.5-VL /
Qwen2-VL / LVR checkpoint directory. Its tokenizer is a word-level `tokenizers` model over the task's
vocabulary plus the Qwen chat tokens and the four LVR tokens. One departure from stock Qwen2.5-VL:
small-vl's vision tower takes 5 input channels, RGB plus x and y coordinate ramps (see results/NOTES.md,
"How small-vl was made to learn"); the preprocessing adds them only when `vision_config.in_channels == 5`,
so real 3-channel checkpoints are untouched.

    python model.py                      # build small-vl and print its size
    python model.py --load DIR           # load a checkpoint directory and print what it is
    python model.py --load Qwen/Qwen2.5-VL-3B-Instruct    # a hub id, from the local Hugging Face cache only
"""
from __future__ import annotations

import argparse
import errno
import glob
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import data

hf_logging.disable_progress_bar()  # our own tqdm bars are the ones that matter
LVR_TOKENS = (data.LVR_START, data.LVR, data.LVR_LATENT_END, data.LVR_END)
LVR_CONFIG_KEYS = ("lvr_start_id", "lvr_id", "lvr_latent_end_id", "lvr_end_id")  # order of LVR_TOKENS
SPECIAL = ["<|endoftext|>", data.IM_START, data.IM_END, data.VISION_START, data.VISION_END, data.IMAGE_PAD,
           "<|video_pad|>", *LVR_TOKENS, "<answer>", "</answer>", "<unk>"]
ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(ValueError):
    """A model directory that cannot be used; the message is one line naming the path and the problem."""


# ------------------------------------------------------------------------------------- small-vl
def build_tokenizer(task: str = "easy") -> PreTrainedTokenizerFast:
    """small-vl's word-level tokenizer over the task's vocabulary (the hard task's extends the easy one's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    vocab = {tok: i for i, tok in enumerate(SPECIAL + data.vocabulary(task))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tk.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token=data.IM_END, extra_special_tokens={})


def small_vl_config(tok, text_hidden=128, text_layers=4, vision_hidden=96, vision_depth=2) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config sized for CPU: 96 px images -> 12x12 patches of 8 px -> 6x6 merged tokens."""
    ids = tok.convert_tokens_to_ids
    half = text_hidden // 4 // 2  # half the head dim: M-RoPE splits it into (t, h, w) sections like Qwen's 16/24/24
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=4,
                  in_channels=5, patch_size=8, temporal_patch_size=1, spatial_merge_size=2, window_size=256,
                  fullatt_block_indexes=list(range(vision_depth)), out_hidden_size=text_hidden)
    text = dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=4 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                bos_token_id=None, eos_token_id=ids(data.IM_END), pad_token_id=ids("<|endoftext|>"))
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids(data.IMAGE_PAD),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids(data.VISION_START),
                           vision_end_token_id=ids(data.VISION_END), tie_word_embeddings=False)
    for key, t in zip(LVR_CONFIG_KEYS, LVR_TOKENS):
        setattr(cfg, key, ids(t))
    return cfg


def build_small_vl(seed: int = 0, task: str = "easy", **sizes):
    """A freshly initialised small-vl model and its tokenizer (over `task`'s words)."""
    tok = build_tokenizer(task)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(small_vl_config(tok, **sizes)).float().eval()
    model.image_processor = image_processor(model.config.vision_config)
    return model, tok


TASK_KEY = "synthetic_task"  # config.json: the synthetic task a small-vl model was trained on (absent: easy)


def saved_task(path: str) -> str:
    """The synthetic task a checkpoint directory records ('easy' when it records none, as the shipped ones)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get(TASK_KEY) or "easy"
    except (OSError, ValueError, AttributeError):
        return "easy"


def extend_vocabulary(model, tok, task: str):
    """The tokenizer of `task` for a small-vl model whose word-level vocabulary is a strict prefix of the
    task's (an easy-task model on the hard task): the new embedding rows start at the mean embedding, as
    _ensure_lvr_tokens does. Any other tokenizer (the task's own, a real checkpoint's subword one, which
    spells every word) is returned as it is."""
    want = build_tokenizer(task)
    have, new = tok.get_vocab(), want.get_vocab()
    if len(have) >= len(new) or any(new.get(t) != i for t, i in have.items()):
        return tok
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(len(want), mean_resizing=False)
    with torch.no_grad():
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            m.weight[old:] = m.weight[:old].mean(0)
    return want


# -------------------------------------------------------------------------------- preprocessing
SMALL_VL_PIXELS = (56 * 56, 1024 * 28 * 28)  # small-vl's min / max pixels (its images are 96 x 96: no resize)


def image_processor(vcfg, path: str | None = None, max_pixels: int | None = None, min_pixels: int | None = None):
    """The checkpoint's own Qwen2-VL image processor (its preprocessor_config.json: patch sizes, min/max
    pixels), else one built from the vision config with small-vl's pixel bounds; `max_pixels` and
    `min_pixels` override."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    cfg_file = os.path.join(path, "preprocessor_config.json") if path else None
    override = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if cfg_file and os.path.isfile(cfg_file):
        try:
            return Qwen2VLImageProcessorPil.from_pretrained(path, **override)
        except Exception as e:  # noqa: BLE001 - a broken preprocessor_config.json
            raise ModelLoadError(f"{cfg_file}: cannot build the image processor ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return Qwen2VLImageProcessorPil(patch_size=vcfg.patch_size, temporal_patch_size=vcfg.temporal_patch_size,
                                    merge_size=vcfg.spatial_merge_size, min_pixels=override.get("min_pixels", SMALL_VL_PIXELS[0]),
                                    max_pixels=override.get("max_pixels", SMALL_VL_PIXELS[1]))


def processor_of(model):
    """The image processor attached to the model at load/build time (built from its config if none)."""
    if getattr(model, "image_processor", None) is None:
        model.image_processor = image_processor(model.config.vision_config)
    return model.image_processor


def resized(shape, model) -> tuple[int, int]:
    """(h, w) an HxW(xC) image is resized to: Qwen's rule with the processor's min/max pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    proc, vcfg = processor_of(model), model.config.vision_config
    factor = vcfg.patch_size * vcfg.spatial_merge_size
    return smart_resize(shape[0], shape[1], factor, proc.size["shortest_edge"], proc.size["longest_edge"])


def preprocess_image(img: np.ndarray, model):
    """HxWx3 uint8 -> (patches [grid_h*grid_w, C*T*P*P], grid_thw [1, gh, gw]) in Qwen's patch order.
    3-channel towers: the checkpoint's own transformers image processor. small-vl's 5-channel tower
    (RGB + x/y coordinate ramps, which transformers has no processor for): the same steps by hand."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    vcfg = model.config.vision_config
    if vcfg.in_channels != 5:
        from PIL import Image
        out = processor_of(model)(images=[Image.fromarray(img)], return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"]
    P, M, T = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
    x = torch.tensor(img).permute(2, 0, 1).float().div(255)  # a copy: images may be read-only arrays
    h, w = resized(img.shape, model)
    if (h, w) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    x = torch.cat([x, xs[None], ys[None]])  # coordinate channels: x and y ramps in [-1, 1]
    C, gh, gw = x.shape[0], h // P, w // P
    x = x.reshape(C, gh // M, M, P, gw // M, M, P).permute(1, 4, 2, 5, 0, 3, 6)  # gh/M, gw/M, M, M, C, P, P
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, T, -1, -1)  # the still image repeated over T frames
    return x.reshape(gh * gw, C * T * P * P), torch.tensor([[1, gh, gw]])


def merged_grid(shape, model) -> tuple[int, int]:
    """(rows, cols) of merged visual tokens for an image of this HxWxC shape."""
    factor = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    h, w = resized(shape, model)
    return h // factor, w // factor


def n_image_tokens(grid_thw: torch.Tensor, vcfg) -> int:
    return int(grid_thw.prod()) // vcfg.spatial_merge_size ** 2


def prompt_text(tok, question: str, counts: list[int]) -> str:
    """The chat prompt up to where the reply starts, image placeholders expanded to `counts` tokens each.
    With a chat template (real checkpoints): the tokenizer's own, so its default system message is kept,
    and each `<image>` of the question becomes an image there (none: images first, as Qwen's processor
    does). Without one (small-vl): data.chat_prompt."""
    if not getattr(tok, "chat_template", None):
        return data.chat_prompt(question, counts)
    parts = question.split(data.IMAGE_TAG)
    if len(parts) == 1:
        parts = [""] * len(counts) + parts
    elif len(parts) != len(counts) + 1:
        raise ValueError(f"question has {len(parts) - 1} <image> placeholders for {len(counts)} images")
    content = [{"type": "text", "text": parts[0]}] if parts[0] else []
    for part in parts[1:]:
        content += [{"type": "image"}] + ([{"type": "text", "text": part}] if part else [])
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    pieces = text.split(data.IMAGE_PAD)
    if len(pieces) != len(counts) + 1:
        raise ValueError(f"the chat template wrote {len(pieces) - 1} image placeholders for {len(counts)} images")
    return pieces[0] + "".join(data.IMAGE_PAD * n + p for n, p in zip(counts, pieces[1:]))


def encode(model, tok, samples, responses=None, images=None):
    """Left-padded batch of chat prompts (+ responses): ids, masks, pixels, grids, mm_token_type_ids, and
    with responses `labels` (-100 on the prompt and padding). Prompt and response are tokenised apart,
    so the label boundary is exact for any tokenizer. `images` overrides the samples' images."""
    cfg = model.config
    pix, grids, ids, labels = [], [], [], []
    for i, s in enumerate(samples):
        counts = []
        for img in (s.load_images() if images is None else [images[i]]):
            p, g = preprocess_image(img, model)
            pix.append(p)
            grids.append(g)
            counts.append(n_image_tokens(g, cfg.vision_config))
        prompt = tok(prompt_text(tok, s.question, counts), add_special_tokens=False)["input_ids"]
        reply = tok(responses[i], add_special_tokens=False)["input_ids"] if responses else []
        ids.append(prompt + reply)
        labels.append([-100] * len(prompt) + reply)
    L, pad = max(map(len, ids)), tok.pad_token_id
    input_ids = torch.tensor([[pad] * (L - len(x)) + x for x in ids])
    batch = {"input_ids": input_ids, "attention_mask": torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids]),
             "pixel_values": torch.cat(pix), "image_grid_thw": torch.cat(grids),
             "mm_token_type_ids": (input_ids == cfg.image_token_id).int()}
    if responses:
        batch["labels"] = torch.tensor([[-100] * (L - len(x)) + x for x in labels])
    return batch


# ------------------------------------------------------------------------------ device / dtype
def add_device_args(p):
    """--device and --dtype, the same on every script."""
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute dtype: auto = bf16 on CUDA, fp32 on CPU (training keeps fp32 weights and runs "
                        "bf16 under autocast unless --param-dtype bf16; eval loads the weights in it)")


def device_arg(s: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, a GPU only where there is one (one line naming the option)."""
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device: cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device: cpu, cuda or cuda:N")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s}: no such CUDA GPU here ({torch.cuda.device_count()} found); use cpu")
    return s


def resolve_dtype(args) -> str:
    """'fp32' or 'bf16' for args.dtype 'auto' on args.device."""
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if torch.device(args.device).type == "cuda" else "fp32"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------- load / save
def lvr_token_ids(model) -> dict:
    """{'lvr_start_id': .., 'lvr_id': .., 'lvr_latent_end_id': .., 'lvr_end_id': ..} from the config."""
    return {k: getattr(model.config, k) for k in LVR_CONFIG_KEYS}


MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")


def resolve(name: str) -> str:
    """A local directory as given; a hub id ("Qwen/Qwen2.5-VL-3B-Instruct") from the local Hugging Face
    cache only: nothing is ever downloaded here."""
    if os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return name
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or not a valid id
        raise ModelLoadError(f"model {name!r} is not a local directory and not in the local Hugging Face cache (nothing is "
                             f"downloaded at run time); fetch it first with: hf download {name}  (or huggingface-cli download {name})") from None


def _check_dir(path: str) -> dict:
    if not os.path.exists(path):
        raise ModelLoadError(f"model path not found: {path}")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model path is not a directory: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object, got a {type(cfg).__name__}")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelLoadError(f"{cfg_path}: field 'architectures' must be a list of class names, got {archs!r}")
    if cfg.get("model_type") not in MODEL_TYPES:  # acceptance by model_type, as transformers' Auto classes do
        raise ModelLoadError(f"{cfg_path}: unsupported model_type {cfg.get('model_type')!r}; expected one of {list(MODEL_TYPES)}")
    if not glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(os.path.join(path, "pytorch_model*.bin")):
        raise ModelLoadError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    return cfg


def _chat_template(tok, path: str):
    """Qwen's releases keep the template in chat_template.json (the processor's) as well as, or instead
    of, tokenizer_config.json: use it when the tokenizer has none."""
    file = os.path.join(path, "chat_template.json")
    if not getattr(tok, "chat_template", None) and os.path.isfile(file):
        try:
            with open(file, encoding="utf-8") as f:
                tok.chat_template = json.load(f)["chat_template"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{file}: no 'chat_template' string ({type(e).__name__})") from None


def _ensure_lvr_tokens(model, tok):
    """Add the LVR tokens when missing; a reference LVR checkpoint's config ids take precedence."""
    missing = [t for t in LVR_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    emb = model.get_input_embeddings()
    if len(tok) > emb.num_embeddings:
        old = emb.num_embeddings
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():  # new rows start at the mean embedding
            for m in (model.get_input_embeddings(), model.get_output_embeddings()):
                m.weight[old:] = m.weight[:old].mean(0)
    for key, t in zip(LVR_CONFIG_KEYS, LVR_TOKENS):
        if getattr(model.config, key, None) is None:
            setattr(model.config, key, tok.convert_tokens_to_ids(t))


def load_model(path: str, dtype=torch.float32, device="cpu", attn="sdpa", max_pixels: int | None = None):
    """Load our save_pretrained output or a Hugging Face Qwen2.5-VL / Qwen2-VL (/ LVR) checkpoint: a local
    directory or a hub id already in the local cache."""
    from transformers import AutoModelForImageTextToText
    path = resolve(path)
    cfg = _check_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    _chat_template(tok, path)
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn,
                                                                  output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if type(model).__name__ not in ARCHITECTURES:
        raise ModelLoadError(f"{path}: loaded {type(model).__name__}, expected one of {list(ARCHITECTURES)}")
    unused = sorted(info.get("unexpected_keys") or [])
    if unused:  # e.g. an LVR head: named, never dropped silently
        print(f"note: {path}: {len(unused)} weights not used by {type(model).__name__}: {', '.join(unused[:8])}"
              + (" ..." if len(unused) > 8 else ""), file=sys.stderr)
    for key in LVR_CONFIG_KEYS:  # a reference LVR checkpoint stores these at the top level of config.json
        if key in cfg and getattr(model.config, key, None) is None:
            setattr(model.config, key, cfg[key])
    bad = nonfinite_tensor(model)
    if bad:
        raise ModelLoadError(f"{path}: tensor {bad} holds NaN/inf values (a diverged or corrupted checkpoint)")
    _ensure_lvr_tokens(model, tok)
    model.image_processor = image_processor(model.config.vision_config, path, max_pixels)
    return model.to(device).eval(), tok


def fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model(model, tok, path: str, dtype=None, weights: dict | None = None):
    """save_pretrained, the tokenizer and the image processor into a new directory, every file fsynced;
    weights cast to `dtype` (default: the model's). `weights`: a full state dict to write in place of the
    model's own (an FSDP-sharded model: parallel.model_state's). I/O failures, safetensors' included, come
    out as OSError naming the path."""
    cast = dtype is not None and dtype != model.dtype
    try:
        sd = weights if weights is not None else model.state_dict() if cast else None
        sd = {k: v.to(dtype) for k, v in sd.items()} if cast else sd
        model.save_pretrained(path, safe_serialization=True, state_dict=sd)
        tok.save_pretrained(path)
        processor_of(model).save_pretrained(path)  # preprocessor_config.json: AutoProcessor, vLLM, VLMEvalKit load it
        if cast:  # config.json says which dtype the weights are in
            cfg_path = os.path.join(path, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg["dtype"] = str(dtype).split(".")[1]
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=2)
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(path)
    except OSError as e:
        raise e if e.filename else OSError(e.errno, e.strerror, path) from None
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        raise OSError(errno.EIO, f"cannot write ({type(e).__name__}: {str(e).splitlines()[0]})", path) from None


def replace_dir(src: str, dst: str):
    """Rename directory src over dst (dst -> dst.old first, removed last), fsyncing the parent."""
    old = dst.rstrip("/") + ".old"
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, tok, path: str, dtype=None):
    """Write an HF-format directory atomically: into path.tmp (fsynced), then rename over path.
    Training runs save through rundir.save, which adds the trainer state beside it."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_model(model, tok, tmp, dtype)
    replace_dir(tmp, path)


def saved_dtype(path: str):
    """The dtype a checkpoint's config.json gives its weights (None when unstated)."""
    try:
        with open(os.path.join(resolve(path), "config.json")) as f:
            cfg = json.load(f)
        name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    except (OSError, ValueError, AttributeError):
        return None
    return getattr(torch, name, None) if isinstance(name, str) else None


def nonfinite_tensor(model) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None (FSDP: in this process's shards)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this process's shard
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", metavar="DIR", help="load this checkpoint (directory or cached hub id) instead of small-vl")
    add_device_args(p)
    a = p.parse_args()
    a.dtype = resolve_dtype(a)
    try:
        model, tok = load_model(a.load, DTYPES[a.dtype], a.device) if a.load else build_small_vl()
    except (ModelLoadError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    n = sum(p.numel() for p in model.parameters())
    nv = sum(p.numel() for p in model.model.visual.parameters())
    print(f"{type(model).__name__}: {n / 1e6:.2f}M parameters ({nv / 1e6:.2f}M vision), vocab {len(tok)}")
    print("LVR token ids:", lvr_token_ids(model))


if __name__ == "__main__":
    main()
