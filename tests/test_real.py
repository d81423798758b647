"""Issue 12: real checkpoints (released Qwen2.5-VL / LVR layout), LVR's data as released, real-model
defaults; issue 13 items 9-10: bad data and config files give one line naming the file and row."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

import benchmarks
import data
import datafiles
import lvr
import model as M
import train_sft
from conftest import write_qwen_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def img(path, w=80, h=60, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def lvr_record(image="viscot/x.jpg", reply="<lvr>\nThe car is red.", boxes=((0.1, 0.1, 0.5, 0.5),), question="<image>\nWhat colour is the car?"):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
            "bboxes": [list(b) for b in boxes]}


@pytest.fixture
def lvr_dir(tmp_path):
    (tmp_path / "viscot").mkdir()
    img(tmp_path / "viscot" / "x.jpg")
    img(tmp_path / "viscot" / "y.jpg", seed=1)
    return tmp_path


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def load_one(lvr_dir, rec):
    return datafiles.load_jsonl(write_json(lvr_dir / "d.json", [rec]))[0]


# ------------------------------------------------------------------------------ checkpoints
def fake_hub_cache(cache, repo, src):
    """The local Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    os.symlink(src, entry / "snapshots" / commit) if (entry / "snapshots").mkdir() is None else None


def test_hub_id_resolves_from_the_local_cache_only(qwen_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path / "hub", "Qwen/Qwen2.5-VL-3B-Instruct", qwen_dir)
    model, tok = M.load_model("Qwen/Qwen2.5-VL-3B-Instruct")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and M.lvr_token_ids(model)["lvr_id"] == 151666
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert "not in the local Hugging Face cache" in str(e.value) and "hf download Qwen/Qwen2.5-VL-7B-Instruct" in str(e.value)
    assert "\n" not in str(e.value)


def test_hub_id_not_cached_cli_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "model.py", "--load", "Qwen/Qwen2.5-VL-3B-Instruct"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "local Hugging Face cache" in r.stderr


def test_model_type_decides_not_architectures(tmp_path):
    path = write_qwen_checkpoint(tmp_path / "c", architectures=["Qwen2_5_VLForConditionalGenerationWithLVRHead"])
    model, _ = M.load_model(path)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_unused_weights_are_named(tmp_path, capsys):
    path = write_qwen_checkpoint(tmp_path / "c", extra={"lvr_head.proj.weight": torch.zeros(4, 32)})
    M.load_model(path)
    err = capsys.readouterr().err
    assert "lvr_head.proj.weight" in err and "not used" in err


def test_saved_checkpoint_carries_processor_and_chat_template(qwen_dir, tmp_path):
    model, tok = M.load_model(qwen_dir, max_pixels=200704)
    M.save_checkpoint(model, tok, str(tmp_path / "saved"))
    proc = AutoImageProcessor.from_pretrained(str(tmp_path / "saved"))
    assert proc.size["longest_edge"] == 200704 and proc.patch_size == 14 and proc.merge_size == 2
    assert "You are a helpful assistant." in AutoTokenizer.from_pretrained(str(tmp_path / "saved")).chat_template
    small, small_tok = M.build_small_vl(text_hidden=32, text_layers=1, vision_hidden=32, vision_depth=1)
    M.save_checkpoint(small, small_tok, str(tmp_path / "small"))
    assert AutoImageProcessor.from_pretrained(str(tmp_path / "small")).patch_size == 8


def test_min_max_pixels_come_from_the_checkpoint(qwen_dir):
    big = np.zeros((1080, 1920, 3), np.uint8)
    sample = data.Sample("What is it?", "A", "", "x", [], image=big)
    model, tok = M.load_model(qwen_dir)
    n = int((M.encode(model, tok, [sample])["input_ids"] == 151655).sum())
    assert n == 2691  # transformers' processor with the released max_pixels 12845056
    model, tok = M.load_model(qwen_dir, max_pixels=1024 * 28 * 28)  # --max-pixels overrides
    assert int((M.encode(model, tok, [sample])["input_ids"] == 151655).sum()) <= 1024


def test_prompt_is_the_chat_template_with_image_positions(qwen_dir, tmp_path):
    model, tok = M.load_model(qwen_dir)
    one = data.Sample("What is it?", "A", "", "x", [], image=np.zeros((56, 56, 3), np.uint8))
    text = tok.decode(M.encode(model, tok, [one])["input_ids"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    two = data.Sample("Compare <image> with <image>: which is brighter?", "A", "", "x", [],
                      image=np.zeros((56, 56, 3), np.uint8), extra_images=[np.zeros((56, 56, 3), np.uint8)])
    text = tok.decode(M.encode(model, tok, [two])["input_ids"][0]).replace("<|image_pad|>", "")
    assert "user\nCompare <|vision_start|><|vision_end|> with <|vision_start|><|vision_end|>: which is brighter?<|im_end|>" in text


# ------------------------------------------------------------------------------------- data
def test_lvr_data_as_one_json_array_with_image_lists(lvr_dir):
    rows = [lvr_record(image=["viscot/x.jpg"]), lvr_record(image="viscot/y.jpg")]
    samples = datafiles.load_jsonl(write_json(lvr_dir / "lvr.json", rows))
    assert [os.path.basename(s.image_path) for s in samples] == ["x.jpg", "y.jpg"]
    assert samples[0].load_image().shape == (60, 80, 3)
    two = load_one(lvr_dir, lvr_record(image=["viscot/x.jpg", "viscot/y.jpg"], question="<image> or <image>?"))
    assert len(two.load_images()) == 2


def test_lvr_placeholder_becomes_the_latent_span(lvr_dir, qwen_dir):
    s = load_one(lvr_dir, lvr_record(reply="Look.\n<lvr>\nThe car is red."))
    assert data.chat_response(s.answer, s.reason, 2, s.response) == \
        "Look.\n<|lvr_start|><|lvr|><|lvr|><|lvr_end|>\nThe car is red.<|im_end|>"
    assert data.chat_response(s.answer, s.reason, 0, s.response) == "Look.\n\nThe car is red.<|im_end|>"
    model, tok = M.load_model(qwen_dir)
    batch, W = lvr.sft_batch(model, tok, [s], [True], K=2)
    reply = tok.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert "<lvr>" not in reply and reply.startswith("Look.\n<|lvr_start|><|lvr|><|lvr|><|lvr_end|>") and W.shape[0] == 2


def test_rl_rows_without_boxes(lvr_dir, qwen_dir):
    rec = {"image": "viscot/x.jpg", "question": "How many cars?", "answer": "2"}
    s = load_one(lvr_dir, rec)
    assert s.bboxes == [] and s.answer == "2" and s.question == "How many cars?"
    model, tok = M.load_model(qwen_dir)
    batch, W = lvr.sft_batch(model, tok, [s], [True], K=2)  # no boxes: no latent span, no crash
    assert W.shape[0] == 0 and not (batch["input_ids"] == 151665).any()


def test_free_form_answers_and_the_checker(lvr_dir):
    s = load_one(lvr_dir, lvr_record(reply="<lvr>\nThere are 3 circles."))
    assert s.answer == "There are 3 circles."
    assert benchmarks.is_correct("<answer>3</answer>", s) and not benchmarks.is_correct("<answer>4</answer>", s)
    n = load_one(lvr_dir, {"image": "viscot/x.jpg", "question": "25/2?", "answer": "12.5"})
    assert benchmarks.is_correct("It is \\boxed{12.50}", n) and not benchmarks.is_correct("\\boxed{12.6}", n)
    w = load_one(lvr_dir, {"image": "viscot/x.jpg", "question": "Colour?", "answer": "Dark red"})
    assert benchmarks.is_correct("<answer>dark red.</answer>", w) and not benchmarks.is_correct("<answer>red</answer>", w)
    letter = load_one(lvr_dir, lvr_record(reply="<answer>B</answer>", question="<image>\nWhich?\nA. x\nB. y"))
    assert letter.answer == "B" and benchmarks.is_correct("<|lvr_start|>A<|lvr_end|> <answer>B</answer>", letter)


def test_pixel_boxes_are_normalised_by_the_image_size(lvr_dir):
    s = load_one(lvr_dir, lvr_record(boxes=[(8, 6, 40, 30)]))  # the image is 80 x 60
    assert s.bboxes == [[0.1, 0.1, 0.5, 0.5]]
    with pytest.raises(ValueError, match=r"d.json:row 0: .*inside the 80x60 image"):
        load_one(lvr_dir, lvr_record(boxes=[(8, 6, 90, 30)]))


def test_real_model_defaults_and_held_out_validation(lvr_dir, qwen_dir):
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--model", qwen_dir])  # no --data: the synthetic scenes are small-vl's
    path = write_json(lvr_dir / "lvr.json", [lvr_record(image=["viscot/x.jpg" if i % 2 else "viscot/y.jpg"],
                                                        reply=f"<lvr>\nanswer {i}") for i in range(20)])
    a = train_sft.parse_args(["--model", qwen_dir, "--data", path])
    assert a.lr == 1e-5 and a.point_weight == 0.0 and a.out == os.path.join("runs", "lvr-ckpt-sft")
    small = train_sft.parse_args([])
    assert small.lr == 1e-3 and small.point_weight == 1.0 and small.out == os.path.join("runs", "small-vl-sft")
    stream = datafiles.Stream(a)
    val = {s.response for s in stream.val(100)}
    train = {stream[i].response for i in range(200)}
    assert len(val) == 1 and not val & train and len(train) == 19


# ---------------------------------------------------------------------- issue 13, items 9-10
def test_image_that_is_not_an_image_names_file_and_row(lvr_dir):
    (lvr_dir / "viscot" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    path = write_json(lvr_dir / "d.jsonl", {}) if False else str(lvr_dir / "d.jsonl")
    (lvr_dir / "d.jsonl").write_text(json.dumps(lvr_record()) + "\n" + json.dumps(lvr_record(image="viscot/bad.png")) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: image .*bad.png is not a readable image"):
        datafiles.load_jsonl(path)


def test_decompression_bomb_is_refused_when_read(lvr_dir):
    Image.new("1", (20000, 10000)).save(lvr_dir / "viscot" / "bomb.png")  # 2e8 pixels, a few KB on disk
    with pytest.raises(ValueError, match=r"row 0: image .*bomb.png has too many pixels"):
        load_one(lvr_dir, lvr_record(image="viscot/bomb.png"))


def test_non_utf8_byte_names_the_line(lvr_dir):
    path = lvr_dir / "d.jsonl"
    path.write_bytes(json.dumps(lvr_record()).encode() + b"\n" + json.dumps(lvr_record()).encode()[:-2] + b"\xff\"}\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8"):
        datafiles.load_jsonl(str(path))


def test_answer_letter_outside_the_options(lvr_dir):
    with pytest.raises(ValueError, match=r"row 0: answer 'E' is not one of the options ABCD"):
        load_one(lvr_dir, lvr_record(reply="<answer>E</answer>", question="<image>\nWhich?\nA. a\nB. b\nC. c\nD. d"))


def test_config_not_an_object_and_architectures_a_string(tmp_path):
    path = write_qwen_checkpoint(tmp_path / "c")
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    open(os.path.join(path, "config.json"), "w").write(json.dumps([cfg]))
    with pytest.raises(M.ModelLoadError, match=r"config.json must hold a JSON object, got a list"):
        M.load_model(path)
    open(os.path.join(path, "config.json"), "w").write(json.dumps({**cfg, "architectures": "Qwen2_5_VLForConditionalGeneration"}))
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model(path)
    assert "'architectures' must be a list of class names, got 'Qwen2_5_VLForConditionalGeneration'" in str(e.value)


def test_every_entry_point_runs_on_the_released_layout(qwen_dir, lvr_dir, tmp_path):
    """SFT on LVR's data, then RL on RL-style rows (free-form answers), then eval, from the checkpoint."""
    import eval as ev
    import train_rl
    rows = [lvr_record(image=["viscot/x.jpg"]), lvr_record(image="viscot/y.jpg", boxes=[(8, 6, 40, 30)]),
            {"image": "viscot/x.jpg", "question": "How many cars?", "answer": "2"}]
    path = write_json(lvr_dir / "lvr.json", rows)
    common = ["--latent-steps", "2", "--device", "cpu"]
    train_sft.main(["--model", qwen_dir, "--data", path, "--steps", "1", "--batch-size", "2", "--eval-every", "0",
                    "--out", str(tmp_path / "sft"), *common])
    sft = str(tmp_path / "sft" / "checkpoint")
    assert os.path.isfile(os.path.join(sft, "preprocessor_config.json"))
    train_rl.main(["--model", sft, "--data", path, "--steps", "1", "--prompts", "2", "--group", "2",
                   "--max-new-tokens", "4", "--out", str(tmp_path / "rl"), *common])
    ev.main(["--model", str(tmp_path / "rl" / "checkpoint"), "--n", "2", "--max-new-tokens", "4", "--out",
             str(tmp_path / "e.json"), "--latent-steps", "2"])
    assert json.load(open(tmp_path / "e.json"))["summaries"]["normal"]["overall"]["n"] == 2
