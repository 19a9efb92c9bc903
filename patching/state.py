"""Per-step information that patches read while the pipeline runs.

A :class:`StepState` belongs to one :class:`~patching.patcher.ModelPatcher`. While a patch set
is applied, a forward pre-hook on the UNet updates it before every UNet call (so extra calls, such
as a guidance pass, see the right values too): the timestep the UNet was given, the matching
sigma and step index from the pipeline's scheduler, the batch size, and the cond/uncond layout
of the batch (diffusers stacks ``[uncond, cond]`` when classifier-free guidance is on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values


@dataclass
class StepState:
    """What the current UNet call is doing. Processors hold a reference and read it per call."""

    timestep: float | None = None
    sigma: float | None = None
    step_index: int | None = None
    num_steps: int | None = None
    num_train_timesteps: int = 1000
    batch_size: int = 0
    latent_size: tuple[int, int] | None = None  # (h, w) of the UNet's input sample
    cond_or_uncond: list[int] = field(default_factory=list)  # one entry per batch chunk, in order
    unet_calls: int = 0
    forced_layout: list[int] | None = None  # set by a patch that makes its own UNet calls (SAG)
    pipeline_ref: Any = field(default=lambda: None, repr=False)  # set by the patcher

    @property
    def cfg(self) -> bool:
        """Whether the batch holds an uncond half (first) and a cond half (second)."""
        return self.cond_or_uncond == [UNCOND, COND]

    @property
    def percent(self) -> float | None:
        """Sampling progress on ComfyUI's timestep axis: 0 at the first (noisiest) step's
        ``t = T-1``, 1 at ``t = 0``. ``None`` before the first call."""
        if self.timestep is None:
            return None
        return 1.0 - self.timestep / (self.num_train_timesteps - 1)

    def reset(self) -> None:
        self.timestep = self.sigma = None
        self.step_index = self.num_steps = None
        self.batch_size = self.unet_calls = 0
        self.latent_size = None
        self.cond_or_uncond = []
        self.forced_layout = None

    def update(self, timestep: Any, sample: Any, pipeline: Any | None) -> None:
        """Called by the UNet pre-hook with the call's ``timestep`` and ``sample``."""
        self.unet_calls += 1
        self.timestep = _first_float(timestep)
        shape = tuple(sample.shape) if sample is not None and hasattr(sample, "shape") else ()
        self.batch_size = int(shape[0]) if shape else 0
        self.latent_size = (int(shape[-2]), int(shape[-1])) if len(shape) >= 3 else None
        scheduler = getattr(pipeline, "scheduler", None)
        self.sigma = self.step_index = self.num_steps = None
        if scheduler is not None:
            self.num_train_timesteps = int(getattr(scheduler.config, "num_train_timesteps", 1000))
            self._locate(scheduler)
        if self.forced_layout is not None:
            self.cond_or_uncond = list(self.forced_layout)
            return
        cfg = bool(getattr(pipeline, "do_classifier_free_guidance", False)) if pipeline is not None else False
        self.cond_or_uncond = [UNCOND, COND] if cfg and self.batch_size % 2 == 0 else [COND]

    def _locate(self, scheduler: Any) -> None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or self.timestep is None or len(timesteps) == 0:
            return
        self.num_steps = int(getattr(scheduler, "num_inference_steps", None) or len(timesteps))
        index = getattr(scheduler, "step_index", None)
        if index is None or index >= len(timesteps) or abs(float(timesteps[index]) - self.timestep) > 1e-4:
            matches = [i for i, t in enumerate(timesteps.tolist()) if abs(t - self.timestep) <= 1e-4]
            index = matches[0] if matches else None
        self.step_index = index
        sigmas = getattr(scheduler, "sigmas", None)
        if index is not None and sigmas is not None and index < len(sigmas):
            self.sigma = float(sigmas[index])


def _first_float(value: Any) -> float | None:
    if value is None:
        return None
    if hasattr(value, "reshape"):
        flat = value.reshape(-1)
        return float(flat[0]) if flat.numel() else None
    return float(value)
