"""The ``face_identity`` job kind: renders that keep a person's identity from reference images.

``identity.method = ip_adapter`` conditions every render on the reference images
through an IP-Adapter: the references are encoded once per job with the adapter's CLIP vision
encoder, then either averaged into one image prompt (``combine: average``) or given as one image
prompt each (``combine: separate``), with the identity ``weight``, active window ``start``..
``stop`` (fractions of sampling progress) and combination ``mode`` (``additive`` as diffusers'
IP-Adapter, or ``fooocus``'s joint attention).

``identity.method = instantid`` finds the largest face of each reference (insightface, the
pack in ``worker.face_models_dir``), combines the raw ArcFace embeddings, and applies InstantID's
attention patch (weight, ``start_at``/``end_at``, noise, optional mask shrunk to each layer's
token grid ``bicubic`` by default or ``bilinear`` per ``mask_resize``) and, with a ``controlnet``
folder, IdentityNet on the face keypoints. The embeddings are computed once per job and stored
beside its outputs (``face_embeds.safetensors``) for every shard to reuse.

Items are ``frames x prompts x seeds`` (frame-major): without ``frames`` just prompts x seeds;
with ``frames`` (one reference image per output frame, e.g. a video's frames) every frame adds its
own image prompt at ``frame_weight`` on top of the identity (ip_adapter), or its face to the
references and its keypoints to IdentityNet (instantid; a frame without a face fails its shards).
Outputs are PNGs like text-to-image. The runner is :mod:`farm.worker.kinds.face_identity`
(InstantID: :mod:`farm.worker.kinds.face_identity_instantid`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from farm.guidance import SelfAttentionGuidanceSpec
from farm.inputs import ImageRef
from farm.job_spec import MAX_PATH_CHARS, JobSpec, local_path
from farm.kinds.base import ItemSource, JobKind, ShardRunner
from farm.loras import LoraStack
from farm.spec_problems import problem

MAX_REFERENCES = 16
MAX_FRAMES = 10_000


class IdentitySettings(BaseModel):
    """What the identity methods share: strict fields, and the summary every output records."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    recorded: ClassVar[tuple[str, ...]] = ()  # the fields an output's ``identity`` parameter holds

    def summary(self) -> dict[str, Any]:
        """The :attr:`recorded` fields, input images as their object keys."""
        out: dict[str, Any] = {}
        for name in self.recorded:
            value = getattr(self, name)
            if isinstance(value, list):
                value = [v.key if isinstance(v, ImageRef) else v for v in value]
            out[name] = value.key if isinstance(value, ImageRef) else value
        return out


class IPAdapterIdentity(IdentitySettings):
    """Identity through an IP-Adapter checkpoint and its CLIP vision encoder."""

    recorded: ClassVar[tuple[str, ...]] = (
        "method", "adapter", "negative", "references", "combine", "weight", "mode", "start", "stop"
    )  # fmt: skip

    method: Literal["ip_adapter"]
    adapter: str = Field(max_length=MAX_PATH_CHARS, description="IP-Adapter checkpoint (.safetensors or .bin)")
    image_encoder: str = Field(max_length=MAX_PATH_CHARS, description="CLIP vision encoder folder")
    negative: str | None = Field(default=None, max_length=MAX_PATH_CHARS, description="uncond embedding file")
    references: list[ImageRef] = Field(min_length=1, max_length=MAX_REFERENCES)
    combine: Literal["average", "separate"] = "average"
    weight: float = Field(default=0.8, ge=-1.0, le=5.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    stop: float = Field(default=1.0, ge=0.0, le=1.0)
    mode: Literal["additive", "fooocus"] = "additive"
    crop: Literal["center", "stretch"] = "center"
    frame_weight: float = Field(default=0.5, ge=-1.0, le=5.0)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str) -> str:
        return local_path(value, (".safetensors", ".bin"))

    @field_validator("image_encoder")
    @classmethod
    def _encoder(cls, value: str) -> str:
        return local_path(value)

    @field_validator("negative")
    @classmethod
    def _negative(cls, value: str | None) -> str | None:
        return None if value is None else local_path(value, (".safetensors",))

    @model_validator(mode="after")
    def _window(self) -> IPAdapterIdentity:
        if self.start > self.stop:
            raise problem(("start",), f"must not be after stop ({self.stop})", self.start)
        return self


class InstantIDIdentity(IdentitySettings):
    """Identity through InstantID: ArcFace embeddings of the reference faces, the InstantID
    checkpoint's Resampler and attention patch, and optionally IdentityNet (a ControlNet fed the
    face tokens, drawing the face keypoints of ``pose``, the frame, or the first reference)."""

    recorded: ClassVar[tuple[str, ...]] = (
        "method", "checkpoint", "references", "combine", "weight", "start_at", "end_at", "noise", "mask",
        "mask_resize", "controlnet", "controlnet_strength",
    )  # fmt: skip

    method: Literal["instantid"]
    checkpoint: str = Field(max_length=MAX_PATH_CHARS, description="InstantID ip-adapter (.bin or .safetensors)")
    references: list[ImageRef] = Field(min_length=1, max_length=MAX_REFERENCES)
    combine: Literal["average", "norm_average", "concat"] = "average"
    weight: float = Field(default=1.0, ge=-1.0, le=3.0)
    start_at: float = Field(default=0.0, ge=0.0, le=1.0)
    end_at: float = Field(default=1.0, ge=0.0, le=1.0)
    noise: float = Field(default=0.0, ge=0.0, le=1.0)
    mask: ImageRef | None = Field(default=None, description="greyscale; white is where the identity applies")
    mask_resize: Literal["bicubic", "bilinear"] = Field(
        default="bicubic",
        description="how the mask shrinks to each attention layer's token grid: bicubic (the seed node and "
        "diffusers' IPAdapterMaskProcessor) or bilinear (ComfyUI_InstantID at HEAD)",
    )
    controlnet: str | None = Field(default=None, max_length=MAX_PATH_CHARS, description="IdentityNet folder")
    controlnet_strength: float = Field(default=0.8, ge=0.0, le=2.0)
    controlnet_start: float = Field(default=0.0, ge=0.0, le=1.0)
    controlnet_end: float = Field(default=1.0, ge=0.0, le=1.0)
    pose: ImageRef | None = Field(default=None, description="keypoints from this image's face")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, value: str) -> str:
        return local_path(value, (".safetensors", ".bin"))

    @field_validator("controlnet")
    @classmethod
    def _controlnet(cls, value: str | None) -> str | None:
        return None if value is None else local_path(value)

    @model_validator(mode="after")
    def _windows(self) -> InstantIDIdentity:
        if self.start_at > self.end_at:
            raise problem(("start_at",), f"must not be after end_at ({self.end_at})", self.start_at)
        if self.controlnet_start > self.controlnet_end:
            raise problem(("controlnet_start",), f"must not be after controlnet_end ({self.controlnet_end})", 0)
        if self.mask_resize != "bicubic" and self.mask is None:
            raise problem(("mask_resize",), "needs identity.mask (it says how the mask is resized)", self.mask_resize)
        if self.pose is not None and self.controlnet is None:
            raise problem(("pose",), "needs identity.controlnet (the pose drives IdentityNet)", None)
        return self

    def summary(self) -> dict[str, Any]:
        out = super().summary()  # settings of a part that is off are recorded as None
        out["mask_resize"] = out["mask_resize"] if self.mask is not None else None
        out["controlnet_strength"] = out["controlnet_strength"] if self.controlnet is not None else None
        return out


Identity = Annotated[IPAdapterIdentity | InstantIDIdentity, Field(discriminator="method")]


class FaceIdentitySpec(JobSpec):
    """Prompts x seeds (x frames) rendered with an identity from reference images."""

    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl")

    kind: Literal["face_identity"] = "face_identity"
    identity: Identity
    frames: list[ImageRef] | None = Field(default=None, min_length=1, max_length=MAX_FRAMES)
    sag: SelfAttentionGuidanceSpec | None = None
    loras: LoraStack = Field(default_factory=list, description="LoRAs applied to the model, in order")

    def item_axes(self) -> dict[str, int]:
        axes = super().item_axes()
        return {"frames": len(self.frames), **axes} if self.frames else axes


def identity_items(spec: FaceIdentitySpec) -> Iterator[ItemSource]:
    """Frame-major, then prompt-major like text-to-image; ``frame_index`` rides in extra."""
    seeds = spec.resolved_seeds()
    for frame_index in range(len(spec.frames)) if spec.frames else [None]:
        extra: tuple[tuple[str, Any], ...] = () if frame_index is None else (("frame_index", frame_index),)
        for prompt_index in range(len(spec.prompts)):
            for seed in seeds:
                yield ItemSource(prompt_index, seed, extra)


def runner() -> ShardRunner:
    from farm.worker.kinds.face_identity import run_face_identity_shard  # worker side

    return run_face_identity_shard


KIND = JobKind(
    spec=FaceIdentitySpec, items=identity_items, runner=runner, ext="png", bulk=True, runtime_applies_patches=False
)
