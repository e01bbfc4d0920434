"""A PEFT adapter directory written from an input adapter with some tensors replaced.

The output keeps the input's tensor names, dtypes, shapes and order; tensors
that are not replaced are copied byte for byte from the input file. The other
files of the adapter directory (tokenizer files) are copied, its README.md (the
input's model card) is not, and
``adapter_config.json`` is copied or, when the method changes it (SafeMERGE's
merged adapter has ``lora_alpha = r``), rewritten. Everything goes into the
caller's temporary directory (``AtomicOutputDir``), so nothing is half-written.

Example:
    >>> adapter = lora.LoraAdapter("ft")  # doctest: +SKIP
    >>> files = write_adapter(tmp, adapter, {"...lora_B.weight": b_new}, {"format": "pt"})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np

from resta_fast.errors import RestaError
from resta_fast.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from resta_fast.io.digest import sha256_file
from resta_fast.io.public import copy_public, public_json
from resta_fast.io.reader import ITEMSIZE, SafetensorsFile
from resta_fast.io.writer import TensorFileWriter, write_all

# Never copied: files of ours that an input adapter directory may hold (an earlier output), and
# its README.md, the input's own model card (the output gets its own card, which says where that one is).
OWN_FILES = ("resta_fast.json", "VALIDATION_FAILED", "README.md")


class InputAdapter(Protocol):
    """What the writer reads of the input adapter: its directory and its open weights file.

    ``lora.LoraAdapter`` is one; named by shape rather than imported, so that ``io`` stays
    below the LoRA merge (the contracts in pyproject.toml).
    """

    path: Path
    file: SafetensorsFile


def _raw(tensor, dtype: str, shape, key: str) -> np.ndarray:
    """The bytes of a replacement tensor (torch or numpy), checked against the slot it fills."""
    if tuple(tensor.shape) != tuple(shape):
        raise AssertionError(f"replacement for {key} has shape {list(tensor.shape)}, expected {list(shape)}")
    if isinstance(tensor, np.ndarray):
        arr = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
    else:  # a torch tensor
        import torch

        arr = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    if arr.size != math.prod(shape) * ITEMSIZE[dtype]:
        raise AssertionError(f"replacement for {key} is not stored as {dtype}")
    return arr


def write_adapter(
    tmp: Path,
    adapter: InputAdapter,
    replace: dict,
    metadata: dict[str, str],
    *,
    config: dict | None = None,
    fsync: bool = True,
) -> dict[str, str]:
    """Write ``adapter`` into ``tmp`` with the tensors in ``replace`` swapped in.

    Args:
        tmp: the output's temporary directory.
        adapter: the input adapter (its weights file fixes names, dtypes, order).
        replace: {adapter key: tensor in that key's stored dtype and shape}.
        metadata: the weights file's safetensors metadata.
        config: a new ``adapter_config.json`` (None: copy the input's).
    Returns:
        {file name: sha256} of every file written.
    """
    src = adapter.file
    unknown = set(replace) - set(src.tensors)
    if unknown:
        raise AssertionError(f"replacements for tensors the adapter does not have: {sorted(unknown)[:3]}")
    infos = list(src.tensors.values())
    out = TensorFileWriter(tmp / ADAPTER_WEIGHTS, [(i.name, i.dtype, i.shape) for i in infos], metadata)
    try:
        for info in infos:
            data = (
                _raw(replace[info.name], info.dtype, info.shape, info.name).data
                if info.name in replace
                else src.raw(info.name)
            )
            write_all(out.fd, memoryview(data), out.offsets[info.name][0], out.path)
            # Copied: drop its mapped pages (and the folio before it a fault re-mapped), or RSS grows
            # with the adapter (77 MB at 1.2B, r = 16; bench_safelora e2e).
            lo = max(0, info.start - (1 << 21))
            src.release(lo, info.start + info.nbytes - lo)
        src.check_unchanged()  # a byte copied from a file that changed meanwhile is not ours to ship
    finally:
        out.close(fsync)
    files = {ADAPTER_WEIGHTS: sha256_file(out.path)}
    cfg_out = tmp / ADAPTER_CONFIG
    if config is None:
        copy_public(adapter.path / ADAPTER_CONFIG, cfg_out)
    else:
        cfg_out.write_text(json.dumps(public_json(config) or config, indent=2, sort_keys=True) + "\n")
    files[ADAPTER_CONFIG] = sha256_file(cfg_out)
    for path in sorted(adapter.path.iterdir()):
        if path.name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, src.path.name) + OWN_FILES or not path.is_file():
            continue
        if path.name.startswith("adapter_model") and path.suffix in (".bin", ".safetensors"):
            raise RestaError(
                f"{adapter.path}: holds a second weights file {path.name}; remove it (peft "
                f"would load it instead of {ADAPTER_WEIGHTS})"
            )
        copy_public(path, tmp / path.name)
        files[path.name] = sha256_file(tmp / path.name)
    return files
