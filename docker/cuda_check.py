"""Build-time check of the GPU worker image: torch and onnxruntime-gpu use the base image's CUDA.

A torch wheel from another CUDA index, or an onnxruntime-gpu linked against another CUDA major
(onnxruntime-gpu 1.31 links libcudart.so.13), imports fine on a build machine without a GPU and
fails only on the GPU host. This turns that into a build error:

    CUDA_VERSION=13.0.1 python docker/cuda_check.py      (the nvidia/cuda images set CUDA_VERSION)
"""

from __future__ import annotations

import os
import re
import struct
import sys
from pathlib import Path

CUDART = re.compile(r"libcudart\.so\.(\d+)")
SHT_DYNAMIC, DT_NULL, DT_NEEDED = 6, 0, 1


def needed(library: Path) -> list[str]:
    """The DT_NEEDED entries of a 64-bit ELF shared library (what `readelf -d` lists as NEEDED)."""
    data = library.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{library} is not a 64-bit ELF file")
    endian = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from(endian + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: list[str] = []
    for section in sections:
        if section[1] != SHT_DYNAMIC:
            continue
        strings = sections[section[6]][4]
        for offset in range(section[4], section[4] + section[5], 16):
            tag, value = struct.unpack_from(endian + "qQ", data, offset)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                start = strings + value
                names.append(data[start : data.index(b"\0", start)].decode())
    return names


def linked_cuda_majors(library: Path) -> set[str]:
    """The CUDA runtime majors a shared library links (``libcudart.so.13`` -> ``13``)."""
    return {m.group(1) for name in needed(library) if (m := CUDART.fullmatch(name))}


def problems(
    cuda_version: str, torch_cuda: str | None, ort_providers: list[str], ort_libraries: list[Path]
) -> list[str]:
    major = cuda_version.split(".")[0]
    found = []
    if not torch_cuda:
        found.append("torch is a CPU build (install it from PyTorch's CUDA index)")
    elif torch_cuda.split(".")[0] != major:
        found.append(f"torch is built for CUDA {torch_cuda}, the image has CUDA {cuda_version}")
    if "CUDAExecutionProvider" not in ort_providers:
        found.append("onnxruntime has no CUDAExecutionProvider (the CPU onnxruntime is installed)")
    for library in ort_libraries:
        majors = linked_cuda_majors(library)
        if majors and majors != {major}:
            found.append(f"{library.name} links CUDA {', '.join(sorted(majors))}, the image has CUDA {cuda_version}")
    return found


def main() -> int:
    import onnxruntime
    import torch

    cuda_version = os.environ.get("CUDA_VERSION", "")
    if not cuda_version:
        print("cuda_check: CUDA_VERSION is not set (not an nvidia/cuda base image?)", file=sys.stderr)
        return 1
    capi = Path(onnxruntime.__file__).parent / "capi"
    found = problems(
        cuda_version,
        torch.version.cuda,
        onnxruntime.get_available_providers(),
        sorted(capi.glob("libonnxruntime_providers_cuda*.so")),
    )
    for problem in found:
        print(f"cuda_check: {problem}", file=sys.stderr)
    if not found:
        print(f"cuda_check: CUDA {cuda_version}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}: ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
