"""Hugging Face model directories and bare .safetensors files as one object.

A Checkpoint maps tensor names to (file, TensorInfo) across shards, validates
``model.safetensors.index.json`` against the shards, and knows which side files
(config, tokenizer, generation config, chat template) travel with the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from resta_fast.errors import CheckpointError
from resta_fast.io import torch_bin
from resta_fast.io.identity import file_identity
from resta_fast.io.reader import MAX_HEADER_BYTES, SafetensorsFile, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from the fine-tune so the output loads like it (transformers, vLLM).
SIDE_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "spiece.model",
)
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
LM_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
# Tensor-name endings that only quantized checkpoints have.
QUANTIZED_SUFFIXES = (
    (".qweight", "GPTQ/AWQ"),
    (".qzeros", "GPTQ/AWQ"),
    (".g_idx", "GPTQ"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit"),
    (".SCB", "bitsandbytes 8-bit"),
    (".weight_scale_inv", "FP8 block"),
    (".weight_scale", "FP8/compressed-tensors"),
)


def _link_target_allowed(root: Path, real: str) -> bool:
    """Whether a weight file that resolves to ``real`` may be read for model ``root``.

    Its own directory, or, for a Hugging Face hub cache snapshot
    (``.../models--org--name/snapshots/REV/``), that repository's ``blobs/``
    directory, where the hub keeps the files its snapshot links point to.
    """
    root_real = os.path.realpath(root)
    parent = os.path.dirname(real)
    if parent == root_real:
        return True
    snapshots = os.path.dirname(root_real)
    if os.path.basename(snapshots) == "snapshots":
        return parent == os.path.join(os.path.dirname(snapshots), "blobs")
    return False


class Checkpoint:
    """A validated model: tensors by name across one or more safetensors files (or
    zip-format torch ``.bin`` files, read pickle-free by ``io.torch_bin``).

    A ``io.source.TensorSource``, as is ``lora.LoraFinetuned``.

    Args:
        path: an HF model directory or a single ``.safetensors`` file.
        role: what the user called it (``finetuned``, ``aligned`` ...), for errors.

    Example:
        >>> ckpt = Checkpoint("./llama-chat", role="aligned")  # doctest: +SKIP
        >>> ckpt.info("model.norm.weight").shape  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, role: str = "model"):
        self.role = role
        self.path = Path(path)
        self.files: dict[str, SafetensorsFile] = {}
        self.index_metadata: dict = {}
        self.config: dict = {}
        if not self.path.exists():
            raise CheckpointError(f"{role} {self.path}: does not exist; check the path")
        if self.path.is_file():
            self._open_files([self.path.name], self.path.parent)
            self.root = self.path.parent
            self.is_dir = False
        else:
            self.root = self.path
            self.is_dir = True
            self._open_directory()
        self.location: dict[str, str] = {}
        self._stored: dict[str, str] = {}  # alias -> stored name (see add_aliases)
        self._identity: dict | None = None  # fingerprint(), once
        for fname, f in self.files.items():
            for name in f.tensors:
                if name in self.location:
                    raise CheckpointError(
                        f"{role} {self.path}: tensor {name!r} is stored in both "
                        f"{self.location[name]} and {fname}; the checkpoint is corrupt"
                    )
                self.location[name] = fname

    def _open_directory(self) -> None:
        root = self.path
        if not os.access(root, os.R_OK | os.X_OK):
            raise CheckpointError(f"{self.role} {root}: directory is not readable; check permissions")
        config = root / "config.json"
        if config.is_file():
            try:
                self.config = json.loads(config.read_text())
            except (ValueError, OSError, RecursionError) as exc:
                raise CheckpointError(f"{config}: not valid JSON ({exc}); fix or remove it") from None
            if not isinstance(self.config, dict):
                raise CheckpointError(
                    f"{config}: must be a JSON object, got {type(self.config).__name__}; fix or remove it"
                )
        index = root / INDEX_NAME
        if index.is_file():
            self._open_index(index)
        elif (root / SINGLE_NAME).is_file():
            self._open_files([SINGLE_NAME], root)
        else:
            found = sorted(p.name for p in root.glob("*.safetensors"))
            if (root / "adapter_config.json").is_file():
                raise CheckpointError(
                    f"{self.role} {root}: is a PEFT adapter, not a full model; "
                    "pass it as --finetuned together with --base"
                )
            if len(found) == 1:
                self._open_files(found, root)
                return
            # No safetensors: transformers' pickle names, read without running the pickle (io/torch_bin.py).
            if (root / torch_bin.INDEX_NAME).is_file():
                self._open_index(root / torch_bin.INDEX_NAME)
                return
            if (root / torch_bin.SINGLE_NAME).is_file():
                self._open_files([torch_bin.SINGLE_NAME], root)
                return
            bins = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
            if bins:
                raise CheckpointError(
                    f"{self.role} {root}: holds pickle files ({', '.join(bins[:3])}) but no {torch_bin.SINGLE_NAME} "
                    f"or {torch_bin.INDEX_NAME}; if one of them is the weights, pass that file itself"
                )
            what = f"several ({', '.join(found[:4])}) but no {INDEX_NAME}" if found else "none"
            raise CheckpointError(f"{self.role} {root}: expected {SINGLE_NAME} or {INDEX_NAME}; found {what}")

    def _open_index(self, index: Path) -> None:
        try:
            if index.stat().st_size > MAX_HEADER_BYTES:  # same bound as a header: real ones are < 10 MB
                raise CheckpointError(
                    f"{index}: {index.stat().st_size} bytes is over the "
                    f"{MAX_HEADER_BYTES}-byte cap; the index is corrupt, regenerate it"
                )
            obj = json.loads(index.read_text())
        except RecursionError:
            raise CheckpointError(f"{index}: JSON nested too deeply; regenerate the index") from None
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not valid JSON ({exc}); regenerate the index") from None
        weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index}: needs a 'weight_map' object of tensor -> shard file")
        self.index_metadata = obj.get("metadata") or {}
        for shard in sorted(set(weight_map.values())):
            if (
                not shard
                or "/" in shard
                or "\\" in shard
                or shard in (".", "..")
                or os.path.isabs(shard)
                or "\x00" in shard
            ):
                raise CheckpointError(
                    f"{index}: shard name {shard!r} is not a plain file name; "
                    "refusing to read outside the model directory"
                )
            real = os.path.realpath(self.path / shard)
            if not _link_target_allowed(self.path, real):
                raise CheckpointError(
                    f"{index}: shard {shard!r} is a link pointing outside the "
                    f"model directory ({real}); refusing to read it"
                )
            if not (self.path / shard).is_file():
                raise CheckpointError(
                    f"{index}: names shard {shard!r}, which does not exist in "
                    f"{self.path}; re-download the missing shard"
                )
        self._open_files(sorted(set(weight_map.values())), self.path)
        for name, shard in weight_map.items():
            if name not in self.files[shard].tensors:
                raise CheckpointError(
                    f"{index}: says tensor {name!r} is in {shard}, but that shard "
                    "does not contain it; the index and shards disagree"
                )
        for shard, f in self.files.items():
            extra = [n for n in f.tensors if weight_map.get(n) != shard]
            if extra:
                raise CheckpointError(
                    f"{self.path / shard}: tensor {extra[0]!r} is not listed for this "
                    f"shard in {index.name}; the index and shards disagree"
                )

    def _open_files(self, names, root: Path) -> None:
        for name in names:
            self.files[name] = torch_bin.open_weight_file(root / name)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def info(self, name: str) -> TensorInfo:
        return self.files[self.location[name]].tensors[self._stored.get(name, name)]

    def stored_dtype(self, name: str) -> str:
        """The dtype the output keeps for ``name``: the one on disk."""
        return self.info(name).dtype

    def is_merged(self, name: str) -> bool:
        """Always False: every tensor is read from a file (see lora.LoraFinetuned)."""
        return False

    def file_of(self, name: str) -> SafetensorsFile:
        return self.files[self.location[name]]

    def tensor_view(self, name: str):
        """Flat zero-copy torch view of tensor ``name`` in its stored dtype."""
        return self.file_of(name).view(self._stored.get(name, name))

    def array(self, name: str):
        """Flat zero-copy numpy view of tensor ``name`` (BF16 as uint16 bits; see reader.NUMPY_STORAGE)."""
        return self.file_of(name).array(self._stored.get(name, name))

    def prefetch(self, name: str, byte_lo: int, byte_hi: int) -> None:
        """Start reading bytes [lo, hi) of tensor ``name`` ahead of use."""
        info = self.info(name)
        hi = min(byte_hi, info.nbytes)
        if hi > byte_lo:
            self.file_of(name).prefetch(info.start + byte_lo, hi - byte_lo)

    def release(self, name: str, byte_lo: int, byte_hi: int) -> None:
        """Drop the mapped pages of bytes [lo, hi) of tensor ``name``."""
        info = self.info(name)
        hi = min(byte_hi, info.nbytes)
        if hi > byte_lo:
            self.file_of(name).release(info.start + byte_lo, hi - byte_lo)

    def add_aliases(self, aliases: dict[str, str]) -> None:
        """Make each ``alias`` read stored tensor ``aliases[alias]`` (e.g. the fine-tune's
        ``model.x`` for this checkpoint's ``x``); the stored names stay valid."""
        for alias, stored in aliases.items():
            self.location[alias] = self.location[stored]
            self._stored[alias] = self._stored.get(stored, stored)

    def quantization(self) -> str | None:
        """Why the weights are quantized (config or tensor names), or None.

        Quantized weights are integers plus scales: RESTA arithmetic on them
        would be silently wrong, so callers refuse them.
        """
        qc = self.config.get("quantization_config")
        if isinstance(qc, dict):
            method = qc.get("quant_method") or (
                "bitsandbytes" if any(k.startswith(("load_in_4bit", "load_in_8bit", "bnb_")) for k in qc) else "unknown"
            )
            return f"config.json has a quantization_config ({method})"
        for name in self.location:
            for suffix, method in QUANTIZED_SUFFIXES:
                if name.endswith(suffix):
                    return f"tensor {name!r} is {method} quantization data"
        return None

    def side_files(self) -> list[Path]:
        """Config/tokenizer/generation files to copy next to the output weights."""
        if not self.is_dir:
            return []
        return [self.root / n for n in SIDE_FILE_PATTERNS if (self.root / n).is_file()]

    def tied_embeddings(self) -> tuple[str, str] | None:
        """(embed, lm_head) names when the config ties them and both are on disk."""
        if not self.config.get("tie_word_embeddings", False):
            return None
        embed = next((n for n in self.location if n.endswith(EMBED_SUFFIXES)), None)
        head = next((n for n in self.location if n.endswith(LM_HEAD_SUFFIXES)), None)
        return (embed, head) if embed and head else None

    def fingerprint(self) -> dict:
        """The inputs' identity from their content: ``io.identity.file_identity`` per weight file
        (computed once: the jobs of a batch share this object)."""
        if self._identity is None:
            self._identity = {name: file_identity(f) for name, f in self.files.items()}
        return self._identity

    def check_unchanged(self) -> None:
        for f in self.files.values():
            f.check_unchanged()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
