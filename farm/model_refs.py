"""``registry:`` model references as a spec writes them, parsed and checked without the store.

``registry:NAME`` (the latest version), ``registry:NAME@VERSION`` (1, 2, ...) or
``registry:NAME@sha256:<manifest digest>``. The spec fields check their form here; the registry
(:mod:`farm.model_registry`) resolves them against the store at submit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from farm.errors import InvalidKey, UserError
from storage.objects.keys import model_version_key, validate_part, validate_sha256

REGISTRY_PREFIX = "registry:"
_REF_RE = re.compile(r"registry:([^@]+)(?:@(sha256:)?([^@]+))?")


class RegistryError(UserError):
    """A registry reference or manifest cannot be used (no such model or version, bad digest)."""


@dataclass(frozen=True)
class RegistryRef:
    """A parsed ``registry:`` reference: a name and at most one of a version or a manifest digest."""

    name: str
    version: str | None = None
    digest: str | None = None


def is_registry_ref(model: str) -> bool:
    return model.startswith(REGISTRY_PREFIX)


def parse_registry_ref(ref: str) -> RegistryRef:
    """``registry:NAME[@VERSION | @sha256:DIGEST]`` checked part by part; :class:`RegistryError`
    says which part is wrong."""
    match = _REF_RE.fullmatch(ref)
    if match is None:
        raise RegistryError(f"{ref!r} is not registry:NAME, registry:NAME@VERSION or registry:NAME@sha256:DIGEST")
    name, is_digest, tail = match.groups()
    try:
        validate_part(name, "name")
        if tail is None:
            return RegistryRef(name)
        if is_digest:
            return RegistryRef(name, digest=validate_sha256(tail, "manifest digest"))
        model_version_key(name, tail)  # checks the version's form
        return RegistryRef(name, version=tail)
    except InvalidKey as exc:
        raise RegistryError(f"{ref!r}: {exc}") from None
