"""The model registry in the object store: content-addressed blobs, immutable version manifests.

Layout (keys from :mod:`storage.objects.keys`):

- ``models/blobs/sha256/<digest>``: one file of a model, named by the SHA-256 of its bytes; a
  push uploads only the blobs the store lacks (multipart above the store's threshold).
- ``models/manifests/sha256/<digest>.json``: a version manifest (name, version, family, pipeline
  class, every file's path, size and digest, who pushed it and when), named by the SHA-256 of
  its own bytes, so it cannot change without changing its name.
- ``models/names/<name>/<version>.json``: which manifest version ``<version>`` of ``<name>`` is;
  versions count 1, 2, ... and a pointer is never rewritten.

A spec names ``registry:NAME`` (the latest version), ``registry:NAME@VERSION`` or
``registry:NAME@sha256:<manifest digest>``; :func:`resolve_model_ref` turns any of them into a
:class:`ManifestRef`, and :func:`pin_spec_model` rewrites a spec's model to the exact manifest
(``registry:NAME@sha256:<digest>``) at submit, so every shard of a job loads the same bytes.
Workers materialise a manifest into their host's cache (:mod:`farm.worker.model_store`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farm.errors import InvalidKey, ObjectNotFound, UserError
from farm.file_digests import file_sha256, folder_files
from farm.job_spec import SpecError
from farm.model_refs import REGISTRY_PREFIX, RegistryError, is_registry_ref, parse_registry_ref
from storage.objects.base import ObjectStore
from storage.objects.keys import (
    model_blob_key,
    model_manifest_key,
    model_version_key,
    model_versions_prefix,
    validate_key,
    validate_part,
    validate_sha256,
)

MANIFEST_SCHEMA = "patchfarm.model/1"
PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "svd": "StableVideoDiffusionPipeline",
}
# The img2img pipeline of each family that has one (an ``upscale`` step's refine, built on the
# resident pipeline of PIPELINE_CLASSES by farm.worker.kinds.upscale_img2img).
IMG2IMG_PIPELINES = {"sd15": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline"}


PIPELINE, LORA = "pipeline", "lora"  # what a manifest holds


@dataclass(frozen=True)
class ManifestRef:
    """One version of a registered model: its name, version, manifest digest and manifest."""

    name: str
    version: str
    digest: str
    manifest: dict[str, Any]

    @property
    def pinned(self) -> str:
        """The reference a job stores: ``registry:NAME@sha256:<manifest digest>``."""
        return f"{REGISTRY_PREFIX}{self.name}@sha256:{self.digest}"

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @property
    def kind(self) -> str:
        """``pipeline`` (a job's ``model``) or ``lora`` (one of a job's ``loras``)."""
        return str(self.manifest.get("kind", PIPELINE))

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"])


# -- reading -------------------------------------------------------------------------------------
def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _check_manifest(manifest: Any, digest: str) -> dict[str, Any]:
    """The manifest if its shape is what :func:`push_model` writes (every file path a valid key)."""
    try:
        if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"not a {MANIFEST_SCHEMA} manifest")
        for entry in manifest["files"]:
            validate_key(entry["path"], "file path")
            validate_sha256(entry["sha256"], "file digest")
            if not isinstance(entry["size"], int) or entry["size"] < 0:
                raise ValueError(f"{entry['path']}: bad size")
        validate_part(manifest["name"], "name")
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"manifest sha256:{digest} is malformed ({exc})") from None
    return manifest


def manifest_bytes(store: ObjectStore, digest: str) -> bytes:
    """The stored bytes of manifest ``digest`` (not yet checked: see :func:`parse_manifest`)."""
    try:
        return store.get_bytes(model_manifest_key(validate_sha256(digest, "manifest digest")))
    except ObjectNotFound:
        raise RegistryError(f"no manifest sha256:{digest} in the registry (was its version removed?)") from None


def parse_manifest(data: bytes, digest: str) -> dict[str, Any]:
    """The manifest in ``data``, which must hash to ``digest`` and have the shape a push writes."""
    if hashlib.sha256(data).hexdigest() != digest:
        raise RegistryError(f"manifest sha256:{digest} does not match its digest (corrupt)")
    try:
        manifest = json.loads(data)
    except ValueError:
        raise RegistryError(f"manifest sha256:{digest} is not JSON") from None
    return _check_manifest(manifest, digest)


def load_manifest(store: ObjectStore, digest: str) -> dict[str, Any]:
    """The manifest stored under ``digest``, its bytes checked against the digest."""
    return parse_manifest(manifest_bytes(store, digest), digest)


def versions(store: ObjectStore, name: str) -> list[str]:
    """The versions of ``name`` in the registry, oldest first."""
    found = []
    for info in store.list(model_versions_prefix(name)):
        stem = info.key.rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit():
            found.append(stem)
    return sorted(found, key=int)


def model_names(store: ObjectStore) -> list[str]:
    """Every model name with at least one version."""
    return sorted({info.key.split("/")[2] for info in store.list("models/names") if info.key.count("/") == 3})


def _version_digest(store: ObjectStore, name: str, version: str) -> str:
    try:
        pointer = json.loads(store.get_bytes(model_version_key(name, version)))
    except ObjectNotFound:
        raise RegistryError(f"model {name!r} has no version {version}") from None
    return validate_sha256(pointer["manifest"], "manifest digest")


def resolve_model_ref(store: ObjectStore, ref: str) -> ManifestRef:
    """The exact manifest a ``registry:`` reference names (the latest version for a bare name);
    :class:`RegistryError` when there is no such model, version or manifest."""
    parsed = parse_registry_ref(ref)
    if parsed.digest is not None:
        manifest = load_manifest(store, parsed.digest)
        if manifest["name"] != parsed.name:
            raise RegistryError(f"manifest sha256:{parsed.digest} is model {manifest['name']!r}, not {parsed.name!r}")
        return ManifestRef(parsed.name, str(manifest["version"]), parsed.digest, manifest)
    version = parsed.version
    if version is None:
        known = versions(store, parsed.name)
        if not known:
            raise RegistryError(f"no model {parsed.name!r} in the registry (`farm models list` shows what there is)")
        version = known[-1]
    digest = _version_digest(store, parsed.name, version)
    return ManifestRef(parsed.name, version, digest, load_manifest(store, digest))


def pin_spec_model(spec: Any, store: ObjectStore) -> Any:
    """``spec`` with a ``registry:`` model, and ``registry:`` LoRAs of its ``loras``, replaced by
    their exact manifests (``registry:NAME@sha256:<digest>``), each checked against the spec's
    family; :class:`SpecError` on the field (``model``, ``loras[N].model``) when a reference cannot
    be resolved. Local paths are left as they are."""
    update: dict[str, Any] = {}
    if is_registry_ref(spec.model):
        update["model"] = _pinned(store, spec.model, spec.family, "model", PIPELINE)
    loras = getattr(spec, "loras", None) or []
    if any(is_registry_ref(lora.model) for lora in loras):
        update["loras"] = [
            lora.model_copy(update={"model": _pinned(store, lora.model, spec.family, f"loras[{i}].model", LORA)})
            if is_registry_ref(lora.model)
            else lora
            for i, lora in enumerate(loras)
        ]
    return spec.model_copy(update=update) if update else spec


def _pinned(store: ObjectStore, ref: str, family: str, field: str, kind: str) -> str:
    try:
        found = resolve_model_ref(store, ref)
    except RegistryError as exc:
        raise SpecError([(field, str(exc))]) from None
    if found.kind != kind:
        where = "a job's loras" if found.kind == LORA else "a job's model"
        raise SpecError([(field, f"{ref} is a {found.kind}: it goes in {where}")])
    if found.family != family:
        raise SpecError([(field, f"{ref} is a {found.family} model, but the job's family is {family}")])
    return found.pinned


# -- writing -------------------------------------------------------------------------------------
def detect_family(folder: Path) -> str:
    """The family a diffusers folder's ``model_index.json`` declares (its pipeline class)."""
    index = folder / "model_index.json"
    try:
        declared = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{folder}: no readable model_index.json; give --family") from None
    for family, cls in PIPELINE_CLASSES.items():
        if cls == declared:
            return family
    raise UserError(f"{folder}: model_index.json names {declared!r}, not one of {', '.join(PIPELINE_CLASSES.values())}")


@dataclass(frozen=True)
class PushResult:
    """What a push did: the version written, and how many blobs (and bytes) went up or were there."""

    ref: ManifestRef
    uploaded: int
    uploaded_bytes: int
    present: int


def push_model(
    store: ObjectStore,
    folder: Path,
    name: str,
    family: str | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> PushResult:
    """Hash every file of ``folder`` (streamed; ``progress`` gets byte counts), upload the blobs
    the store lacks, then write a new version's manifest and pointer (versions never change).
    ``folder`` is a diffusers pipeline (``model_index.json``), or a LoRA: a folder without one
    that holds ``.safetensors`` weights (its ``family`` must be given; its manifest says
    ``"kind": "lora"``, and only a job's ``loras`` may name it)."""
    validate_part(name, "name")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    lora = not (folder / "model_index.json").is_file()
    if lora and (family is None or not any(p.suffix == ".safetensors" for p in folder.iterdir())):
        raise UserError(
            f"{folder}: no model_index.json; not a diffusers pipeline folder "
            "(a LoRA folder holds its .safetensors file: give its --family)"
        )
    family = family or detect_family(folder)
    if family not in PIPELINE_CLASSES:
        raise UserError(f"family: {family!r} is not one of {', '.join(PIPELINE_CLASSES)}")
    files, uploaded, uploaded_bytes = [], 0, 0
    for rel, path in folder_files(folder):
        try:
            validate_key(rel, "file path")
        except InvalidKey as exc:
            raise UserError(f"{folder}: {exc}; rename the file to push it") from None
        size = path.stat().st_size
        digest = file_sha256(path, progress)
        files.append({"path": rel, "size": size, "sha256": digest})
        if not store.exists(model_blob_key(digest)):
            store.put_file(model_blob_key(digest), path, content_type="application/octet-stream")
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + size
    known = versions(store, name)
    version = str(int(known[-1]) + 1 if known else 1)
    while store.exists(model_version_key(name, version)):  # another push took it meanwhile
        version = str(int(version) + 1)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "version": version,
        "family": family,
        **({"kind": LORA} if lora else {"pipeline_class": PIPELINE_CLASSES[family]}),
        "files": files,
        "created_by": f"{getpass.getuser()}@{socket.gethostname()}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    data = _canonical(manifest)
    digest = hashlib.sha256(data).hexdigest()
    store.put_bytes(model_manifest_key(digest), data, content_type="application/json")
    pointer = {"name": name, "version": version, "manifest": digest}
    store.put_bytes(model_version_key(name, version), _canonical(pointer), content_type="application/json")
    ref = ManifestRef(name, version, digest, manifest)
    return PushResult(ref, uploaded, uploaded_bytes, len(files) - uploaded)


def remove_version(store: ObjectStore, name: str, version: str) -> tuple[ManifestRef, int]:
    """Remove version ``version`` of ``name`` (its pointer and manifest) and every blob no other
    manifest lists; returns the removed version and how many blobs went."""
    ref = resolve_model_ref(store, f"{REGISTRY_PREFIX}{name}@{version}")
    store.delete(model_version_key(name, version))
    store.delete(model_manifest_key(ref.digest))
    referenced: set[str] = set()
    for info in store.list("models/manifests/sha256"):
        digest = info.key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            referenced.update(f["sha256"] for f in load_manifest(store, digest)["files"])
        except (RegistryError, InvalidKey):
            continue  # not a manifest of ours: it protects nothing
    removed = 0
    for entry in ref.manifest["files"]:
        if entry["sha256"] not in referenced and store.exists(model_blob_key(entry["sha256"])):
            store.delete(model_blob_key(entry["sha256"]))
            referenced.add(entry["sha256"])  # a file listed twice is deleted once
            removed += 1
    return ref, removed
