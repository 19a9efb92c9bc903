"""Which device and dtype a worker renders with, decided at run time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farm.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda" / "cuda:N"
    dtype_name: str  # "float32", "float16", "bfloat16"

    @property
    def dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype_name)


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """``auto`` picks CUDA with fp16 when a GPU is visible, else CPU with fp32. fp16 on CPU is
    refused: most CPU kernels don't implement it."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda") and not cuda:
        raise ConfigError("worker.device is cuda but no CUDA device is visible to this process")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    if device == "cpu" and dtype == "float16":
        raise ConfigError("worker.dtype float16 needs a CUDA device; use float32 or bfloat16 on CPU")
    return Placement(device, dtype)


def device_info(placement: Placement) -> dict[str, Any]:
    """What the worker registry records about the device: its kind, and the GPU's name and total
    memory when it is one."""
    info: dict[str, Any] = {"device": placement.device, "gpu_name": None, "gpu_memory_bytes": None}
    if placement.device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(placement.device))
        info.update(gpu_name=props.name, gpu_memory_bytes=int(props.total_memory))
    return info
