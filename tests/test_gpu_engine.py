"""The engine's GPU path made right on CPU first (issue 23): backend settings, the non-finite guard without a host
sync, the reference model's precision, DDP + compile, the owned Muon, the device defaults, and the out-of-memory
fallback. ``gpu``-marked tests repeat a check where only CUDA can show it (skipped without CUDA by conftest.py)."""
from __future__ import annotations

import pytest
import torch

from xiaolm.train import dist as dist_mod


# ------------------------------------------------------------------------------------ item 8: TF32 on CUDA


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_setup_turns_on_tf32_matmuls_for_cuda_only(monkeypatch, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(dist_mod, "pick_device", lambda pref: "cpu")
    assert dist_mod.setup_distributed("cpu").device == "cpu"
    assert torch.get_float32_matmul_precision() == "highest"  # the CPU keeps exact float32
    assert not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(dist_mod, "pick_device", lambda pref: "cuda")
    assert dist_mod.setup_distributed("auto").device == "cuda"
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32
