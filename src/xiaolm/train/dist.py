"""Devices, precision and the torchrun process group."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from xiaolm.utils import pick_device


_PEAK_BF16 = {  # dense bf16 tensor-core FLOP/s by GPU name fragment (datasheets)
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "B200": 2250e12, "A100": 312e12, "A800": 312e12, "H800": 989e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 4080": 97e12, "RTX 3090": 71e12, "RTX 3080": 59.5e12,
    "A6000": 155e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: str) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for frag, flops in _PEAK_BF16.items():
        if frag in name:
            return flops
    return None


# The one place that defines the training settings left "auto" (None) in TrainConfig: on CUDA the fast path; on the
# CPU what measures fastest there (eager: a one-off compile costs tens of seconds on a few cores, more than it saves
# in a CPU-sized run; plain float32 CE and matmuls: CPU bf16 matrix products are emulated). `--help` prints this table.
DEVICE_DEFAULTS = {
    "cuda": {"compile": True, "loss_chunk_size": 8192, "precision": "bf16"},  # bf16 where the card has it, else fp32
    "cpu": {"compile": False, "loss_chunk_size": 0, "precision": "fp32"},  # also MPS
}


def device_defaults(device: str) -> dict:
    """The ``DEVICE_DEFAULTS`` row for ``device`` (cuda, cuda:N; anything else takes the CPU row)."""
    row = dict(DEVICE_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"])
    if row["precision"] == "bf16" and not torch.cuda.is_bf16_supported():
        row["precision"] = "fp32"  # pre-Ampere cards: fp16 would need loss scaling, which Muon does not take
    return row


def auto_help(name: str) -> str:
    """``--help`` text of an "auto" setting, from ``DEVICE_DEFAULTS``."""
    show = {True: "on", False: "off", 0: "off"}
    cuda, cpu = (DEVICE_DEFAULTS[k][name] for k in ("cuda", "cpu"))
    return f"auto: on CUDA {show.get(cuda, cuda)}, on CPU {show.get(cpu, cpu)}"


def resolve_device_defaults(cfg, device: str):
    """Fill ``cfg``'s "auto" (None) settings for ``device`` in place, so the run's config.yaml records what ran."""
    for name, value in device_defaults(device).items():
        if getattr(cfg, name) in (None, "auto"):
            setattr(cfg, name, value)
    return cfg


def resolve_precision(precision: str, device: str) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32."""
    if precision == "auto":
        precision = device_defaults(device)["precision"]
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if not device.startswith("cuda"):
        raise ValueError("fp16 mixed precision needs a CUDA device; use bf16 or fp32")
    return torch.float16


def configure_device(device: str) -> None:
    """Backend settings for fast training on ``device``: on CUDA, float32 matrix products (anything outside autocast,
    and every matmul of an fp32 run) use TF32 tensor cores -- ~8x the fp32 rate on Ampere and newer, at a 10-bit
    mantissa that training does not notice. The CPU keeps full float32 (its "high" setting may use bf16 passes)."""
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # also sets torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = True


def autocast_for(device: str, amp_dtype: Optional[torch.dtype]):
    """A zero-argument factory of the autocast context a run trains under (``resolve_precision``'s dtype; None: plain
    float32). Everything whose numbers meet the policy's -- reference and old log-probabilities -- uses the same one."""
    def make():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype)

    return make


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_pref: str = "auto") -> DistEnv:
    """Under torchrun: init the process group (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = pick_device(device_pref)
        configure_device(device)
        return DistEnv(device=device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    configure_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
