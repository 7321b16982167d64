"""A cache of parsed kernel images, keyed by a hash of the file's bytes.

pyelftools is the parser, but importing it takes ~25 ms, a third of a whole
``pyvmm boot`` (docs/decisions.md). Booting the same image again reads its layout
(segment offsets, entry point, relocation limits) from here instead. The layout is
checked against the file's bytes again on every use, so a stale or damaged entry
can only cause a fresh parse, never a different load.
"""

from __future__ import annotations

import marshal
import os
from _blake2 import blake2b  # hashlib's import costs more than the hash itself

from .elf import KernelImage, RelocConstraint, Segment, parse_kernel

FORMAT = 1  # bump when KernelImage's meaning changes


def cache_dir() -> str:
    configured = os.environ.get("PYVMM_CACHE_DIR")
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pyvmm", "kernels")


def parse_kernel_cached(data: bytes, name: str) -> KernelImage:
    """``parse_kernel``, remembered across runs. Set PYVMM_CACHE_DIR=off to disable."""
    directory = cache_dir()
    if directory == "off":
        return parse_kernel(data, name)
    path = os.path.join(directory, f"{blake2b(data, digest_size=20).hexdigest()}.v{FORMAT}")
    try:
        with open(path, "rb") as f:
            return _from_layout(marshal.load(f), data)
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError):
        pass
    image = parse_kernel(data, name)
    _store(path, _layout(image))
    return image


def _layout(image: KernelImage) -> tuple:
    reloc = image.reloc
    return (
        image.elf_class,
        image.entry,
        None if reloc is None else (reloc.align, reloc.min_addr, reloc.max_addr),
        tuple((s.paddr, s.file_offset, len(s.data), s.memsz) for s in image.segments),
    )


def _from_layout(layout: tuple, data: bytes) -> KernelImage:
    elf_class, entry, reloc, segments = layout
    rebuilt = []
    for paddr, offset, filesz, memsz in segments:
        if not (offset >= 0 and offset + filesz <= len(data) and 0 <= filesz <= memsz):
            raise ValueError("cached layout does not match the file")
        rebuilt.append(Segment(paddr, data[offset : offset + filesz], memsz, offset))
    constraint = None if reloc is None else RelocConstraint(*reloc)
    return KernelImage(elf_class, tuple(rebuilt), entry, constraint)


def _store(path: str, layout: tuple) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(temporary, "wb") as f:
            marshal.dump(layout, f)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass  # a cache that cannot be written only costs speed
