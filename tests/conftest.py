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
def samples():
    """Questions of every type, with different prompt lengths (so batches carry left padding)."""
    return [data.make_sample(0, "val", i) for i in range(5)]
