"""What the planner and the engine need of a checkpoint: the ``TensorSource`` protocol.

Two classes satisfy it: ``io.checkpoint.Checkpoint`` (safetensors files on disk)
and ``lora.LoraFinetuned`` (a base model with a PEFT adapter merged in fp32,
tensor by tensor). Code that takes either calls these members directly; it
never probes with ``hasattr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from resta_fast.io.reader import SafetensorsFile, TensorInfo


class TensorFile(Protocol):
    """One weight file of the output layout: its path and its tensors, in order."""

    path: Path
    tensors: Mapping[str, TensorInfo]


@runtime_checkable
class TensorSource(Protocol):
    """A model read tensor by tensor.

    Attributes:
        role: what the user called it (``finetuned``, ``aligned`` ...), for errors.
        path: what the user passed (a directory, a file, an adapter directory).
        root: the directory side files are looked up in.
        is_dir: whether ``path`` is a model directory (else a bare .safetensors file).
        config: the parsed config.json ({} without one).
        files: file name -> TensorFile; the output keeps this layout and order.
        location: tensor name -> file name, for every readable name (aliases included).

    Example:
        >>> from resta_fast.io.checkpoint import Checkpoint
        >>> isinstance(Checkpoint("./llama-chat"), TensorSource)  # doctest: +SKIP
        True
    """

    role: str
    path: Path
    root: Path
    is_dir: bool
    config: dict
    files: Mapping[str, TensorFile]
    location: dict[str, str]

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and byte range of tensor ``name`` as read (merged LoRA tensors: F32)."""
        ...

    def stored_dtype(self, name: str) -> str:
        """The dtype the output keeps for ``name`` (a merged LoRA tensor: its base's)."""
        ...

    def is_merged(self, name: str) -> bool:
        """Whether ``name`` is a LoRA merge computed in fp32 (not bytes from a file)."""
        ...

    def file_of(self, name: str) -> SafetensorsFile | None:
        """The file holding ``name``'s bytes, or None when it lives in memory (merged LoRA)."""
        ...

    def tensor_view(self, name: str) -> torch.Tensor: ...

    def array(self, name: str) -> np.ndarray: ...

    def prefetch(self, name: str, byte_lo: int, byte_hi: int) -> None: ...

    def release(self, name: str, byte_lo: int, byte_hi: int) -> None: ...

    def tied_embeddings(self) -> tuple[str, str] | None: ...

    def quantization(self) -> str | None: ...

    def side_files(self) -> list[Path]: ...

    def fingerprint(self) -> dict: ...

    def check_unchanged(self) -> None: ...

    def close(self) -> None: ...
