"""PEFT LoRA fine-tunes merged in-stream (docs/spec.md §1, §4).

A LoRA fine-tune is an adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``) plus the base model it was trained on.
``LoraFinetuned`` presents the two as one virtual checkpoint that the plan and
the streaming pipeline use exactly like a full fine-tune:

- a targeted weight W reads as the exact fp32 value W + s·(B @ A) (torch
  matmul, the same operation order as ``peft``'s ``merge_and_unload``),
  materialised one tensor at a time, so memory is bounded by the largest
  targeted tensor (twice it for transposed layouts), never the model;
- ``modules_to_save`` (and saved embedding) tensors from the adapter replace
  the base's;
- every other tensor is the base's zero-copy view.

Merged tensors are handed to the kernel in fp32 and rounded once, to the base's
dtype, when the RESTA output is written (``stored_dtype``), so a merge with
β = 0 equals ``peft`` merging into the same dtype.

Example:
    >>> base = Checkpoint("llama-chat", role="base")          # doctest: +SKIP
    >>> ft = LoraFinetuned("my-adapter", base)                 # doctest: +SKIP
    >>> ft.tensor_view("model.layers.0.self_attn.q_proj.weight").dtype  # doctest: +SKIP
    torch.float32
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resta_fast.errors import RestaError
from resta_fast.io import torch_bin
from resta_fast.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter  # noqa: F401 - is_adapter re-exported
from resta_fast.io.checkpoint import EMBED_SUFFIXES, LM_HEAD_SUFFIXES, SIDE_FILE_PATTERNS, Checkpoint
from resta_fast.io.identity import config_identity, file_identity
from resta_fast.io.names import prefix_mapping
from resta_fast.io.reader import KERNEL_DTYPES, TensorInfo

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

# Key prefixes peft puts in front of the wrapped model's module names.
_KEY_PREFIXES = ("base_model.model.", "base_model.")
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)"
    r"|lora_embedding_(?P<eab>A|B)(?:\.(?P<eadapter>[^.]+))?)$"
)
# Adapter parts whose merge is not W + s·BA: refuse rather than write a wrong model.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) rescales each merged column by a learned magnitude",
    "lora_E": "AdaLoRA stores an SVD-style adapter (lora_E)",
    "trainable_tokens_delta": "trainable_token_indices replaces individual embedding rows",
    "token_adapter": "trainable_token_indices replaces individual embedding rows",
}
# Config switches that change the merge or the architecture.
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora=true)",
    "layer_replication": "layer_replication (the merged model has more layers than the base)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "trainable_token_indices": "trainable_token_indices",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
}


def _pattern_key(patterns, module: str) -> str | None:
    """peft's ``get_pattern_key``: the first pattern matching a dotted suffix of ``module``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraModule:
    """One targeted base tensor and how its adapter delta is computed."""

    module: str  # module name inside the adapter (prefixes stripped)
    target: str  # base tensor the delta is added to
    a: str  # adapter key of A (r × in) or lora_embedding_A (r × vocab)
    b: str  # adapter key of B (out × r) or lora_embedding_B (dim × r)
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (a Python float, as peft)
    transpose: bool  # delta is (B @ A)ᵀ: fan_in_fan_out (GPT-2 Conv1D) or an embedding
    kind: str = "linear"  # "linear" or "embedding"
    bias: str | None = None  # adapter key of lora_B.bias (lora_bias=true)


class LoraAdapter:
    """A parsed, validated PEFT LoRA adapter directory (no base model needed).

    Example:
        >>> LoraAdapter("my-adapter").config["r"]  # doctest: +SKIP
        8
    """

    def __init__(self, path):
        self.path = Path(path)
        cfg_path = self.path / ADAPTER_CONFIG
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise RestaError(
                f"{cfg_path}: cannot read the adapter config ({exc}); re-save the adapter with peft's save_pretrained"
            ) from None
        if not isinstance(self.config, dict):
            raise RestaError(f"{cfg_path}: expected a JSON object")
        self._check_config(cfg_path)
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            weights = self.path / torch_bin.ADAPTER_NAME  # read without running its pickle (io/torch_bin.py)
        if not weights.is_file():
            raise RestaError(
                f"{self.path}: no {ADAPTER_WEIGHTS} or {torch_bin.ADAPTER_NAME}; expected a PEFT adapter saved "
                "with save_pretrained"
            )
        self.file = torch_bin.open_weight_file(weights)
        self._identity: dict | None = None  # fingerprint(), once
        self.r = self._positive_int("r")
        self.alpha = self.config.get("lora_alpha", 8)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise RestaError(f"{cfg_path}: lora_alpha must be a number, got {self.alpha!r}")
        self.rank_pattern = self._pattern("rank_pattern")
        self.alpha_pattern = self._pattern("alpha_pattern")
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))

    def _check_config(self, cfg_path: Path) -> None:
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise RestaError(
                f"{cfg_path}: peft_type {peft_type} is not supported; only LoRA adapters "
                "can be merged in-stream. Merge it with peft (merge_and_unload), save the "
                "full model, and pass that as --finetuned"
            )
        for key, what in _UNSUPPORTED_CONFIG.items():
            if self.config.get(key):
                raise RestaError(
                    f"{cfg_path}: {what} is not supported: its merge is not W + s·(B@A), "
                    "so an in-stream merge would be silently wrong. Merge it with peft "
                    "(merge_and_unload), save the full model, and pass that as --finetuned"
                )

    def _positive_int(self, key: str) -> int:
        value = self.config.get(key, 8)
        if type(value) is not int or value <= 0:
            raise RestaError(f"{self.path / ADAPTER_CONFIG}: {key} must be a positive integer, got {value!r}")
        return value

    def _pattern(self, key: str) -> dict:
        value = self.config.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            raise RestaError(f"{self.path / ADAPTER_CONFIG}: {key} must map module patterns to numbers")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RestaError(
                    f"{self.path / ADAPTER_CONFIG}: {key} pattern {pattern!r} is not a valid regular expression ({exc})"
                ) from None
        return value

    def fingerprint(self) -> dict:
        """The adapter's identity from its content: the weights file's ``io.identity.file_identity``
        and the full sha256 of its config."""
        if self._identity is None:
            self._identity = {
                self.file.path.name: file_identity(self.file),
                ADAPTER_CONFIG: config_identity(self.path / ADAPTER_CONFIG),
            }
        return self._identity

    def check_unchanged(self) -> None:
        self.file.check_unchanged()

    def close(self) -> None:
        self.file.close()

    def scaling(self, module: str) -> tuple[int, float]:
        """(rank, scale) for ``module``, resolving rank_pattern/alpha_pattern like peft."""
        rk = _pattern_key(self.rank_pattern, module)
        ak = _pattern_key(self.alpha_pattern, module)
        r = self.rank_pattern[rk] if rk is not None else self.r
        alpha = self.alpha_pattern[ak] if ak is not None else self.alpha
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _full_tensor_target(rel: str) -> tuple[str | None, int]:
    """(base tensor name, priority) of a full tensor saved in an adapter.

    peft saves ``modules_to_save`` as ``X.weight``, or, when it also saves
    embedding layers, as ``X.modules_to_save[.adapter].weight`` next to
    ``X.original_module.weight`` (the untrained copy, ignored); LoRA-targeted
    embeddings come with ``X.base_layer.weight``, the W their delta adds to.
    """
    parts = rel.split(".")
    if "original_module" in parts:
        return None, -1
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        return ".".join(parts[:i] + parts[-1:]), 2
    if "base_layer" in parts:
        return ".".join(p for p in parts if p != "base_layer"), 0
    return rel, 1


def _strip_prefix(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


class _VirtualFile:
    """The plan's view of one output file: tensor infos in the base's order."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]):
        self.path = path
        self.tensors = tensors


class LoraFinetuned:
    """A base model plus a LoRA adapter, read as the merged fine-tune.

    A ``io.source.TensorSource`` like Checkpoint; the output takes the base's
    file layout and names.

    Args:
        adapter: PEFT adapter directory.
        base: the Checkpoint the adapter was trained on.

    Example:
        >>> ft = LoraFinetuned("adapter", Checkpoint("base"))  # doctest: +SKIP
        >>> plan = build_plan(ft, aligned=al, unaligned=un)    # doctest: +SKIP
    """

    def __init__(
        self, adapter, base: Checkpoint, role: str = "finetuned", *, replace=None, delta=None, base_flag: str = "--base"
    ):
        self.role = role
        self.base_flag = base_flag  # how the user named the base, for errors
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
        # Realignment methods merge a changed adapter without rewriting it first:
        # ``replace`` maps adapter keys to new tensors (Safe LoRA's projected B), and
        # ``delta(module)`` computes a module's fp32 delta itself (SafeMERGE's weighted sum).
        self.replacements = dict(replace or {})
        self._delta = delta if delta is not None else self.lora_delta
        self.base = base
        self.path = self.adapter.path
        self.root = base.root
        self.is_dir = base.is_dir
        self.config = base.config
        self.index_metadata = base.index_metadata
        self._tmp: Path | None = None
        quant = base.quantization()
        if quant:
            raise RestaError(
                f"base {base.path}: {quant}; a LoRA adapter cannot be merged exactly into "
                "quantized weights. Pass the unquantized (bf16/fp16/fp32) model the "
                f"quantized one was made from as {base_flag}"
            )
        self.modules: dict[str, LoraModule] = {}
        self.replaced: dict[str, str] = {}  # base tensor -> adapter key holding its full new value
        self._parse()
        self._mirror_tied()
        self.location = dict(base.location)
        self.files: dict[str, _VirtualFile] = {}
        for fname, sfile in base.files.items():
            self.files[fname] = _VirtualFile(sfile.path, {n: self.info(n) for n in sfile.tensors})

    # --- parsing ---------------------------------------------------------------

    def _parse(self) -> None:
        ad = self.adapter
        keys = list(ad.file.tensors)
        pairs: dict[str, dict[str, str]] = {}
        full: dict[str, tuple[str, int]] = {}  # target -> (adapter key, priority)
        for key in keys:
            rel = _strip_prefix(key)
            for marker, why in _UNSUPPORTED_KEYS.items():
                if f".{marker}" in rel or rel.startswith(marker):
                    raise RestaError(
                        f"{ad.file.path}: tensor {key!r}: {why}; an in-stream merge would "
                        "be wrong. Merge it with peft (merge_and_unload), save the full "
                        "model, and pass that as --finetuned"
                    )
            m = _LORA_KEY.match(rel)
            if m:
                slot = f"{m['ab']}.{m['param']}" if m["ab"] else f"emb{m['eab']}"
                pairs.setdefault(m["module"], {})[slot] = key
            elif "lora_" in rel:
                raise RestaError(
                    f"{ad.file.path}: tensor {key!r} is a LoRA part resta_fast does not "
                    "know; merge the adapter with peft and pass the full model instead"
                )
            else:
                target, rank = _full_tensor_target(rel)
                if target is not None and rank > full.get(target, (None, -1))[1]:
                    full[target] = (key, rank)
        self._map_names(pairs, {t: k for t, (k, _) in full.items()})

    def _map_names(self, pairs: dict, full: dict) -> None:
        base = self.base
        wanted = [f"{m}.weight" for m in pairs] + list(full)
        # A tied model may store only the embedding; its lm_head is that tensor.
        tied_embed = (
            next((n for n in base.location if n.endswith(EMBED_SUFFIXES)), None)
            if base.config.get("tie_word_embeddings", False)
            else None
        )

        def is_tied_head(name: str) -> bool:
            return tied_embed is not None and name.endswith(LM_HEAD_SUFFIXES)

        missing = [n for n in wanted if n not in base and not is_tied_head(n)]
        mapping = prefix_mapping(missing, set(base.location)) if missing else {}

        def resolve(name: str) -> str | None:
            if name in base:
                return name
            if name in mapping:
                return mapping[name]
            return tied_embed if is_tied_head(name) else None

        unmatched = [n for n in wanted if resolve(n) is None]
        if unmatched:
            raise RestaError(
                f"{self.adapter.path}: {len(unmatched)} adapter module(s) match no tensor of base "
                f"{base.path} (e.g. adapter {', '.join(unmatched[:3])}; base has "
                f"{', '.join(list(base.location)[:3])}). Pass the model the adapter was trained on as "
                f"{self.base_flag}"
            )
        for name, key in full.items():
            if name not in base and is_tied_head(name):
                if any(resolve(n) == tied_embed and not is_tied_head(n) for n in full):
                    continue  # both sides saved (ensure_weight_tying): transformers re-ties to the embedding
                raise RestaError(
                    f"{self.adapter.path}: the adapter replaces {name} (modules_to_save) but the base "
                    f"ties it to {tied_embed}; transformers re-ties them on load and would drop it. "
                    "Save both in modules_to_save, or untie the base (tie_word_embeddings false) "
                    "before training"
                )
            # modules_to_save replace a tensor; a saved ``base_layer`` embedding
            # (possibly resized) is the W its LoRA adds to: both read from the adapter.
            self.replaced[resolve(name)] = key
        for module, slots in pairs.items():
            self._add_module(module, slots, resolve(f"{module}.weight"), resolve)
        if not self.modules and not self.replaced:
            raise RestaError(f"{self.adapter.path}: the adapter holds no LoRA weights; nothing to merge")

    def _add_module(self, module: str, slots: dict, target: str, resolve) -> None:
        ad = self.adapter
        where = f"{ad.file.path}: module {module!r}"
        if "embA" in slots or "embB" in slots:
            if set(slots) != {"embA", "embB"}:
                raise RestaError(f"{where}: needs both lora_embedding_A and lora_embedding_B")
            kind, a_key, b_key, bias = "embedding", slots["embA"], slots["embB"], None
        else:
            if "A.weight" not in slots or "B.weight" not in slots:
                raise RestaError(f"{where}: needs both lora_A.weight and lora_B.weight; the adapter file is incomplete")
            kind, a_key, b_key, bias = "linear", slots["A.weight"], slots["B.weight"], slots.get("B.bias")
        a_info, b_info = ad.file.tensors[a_key], ad.file.tensors[b_key]
        w_shape = self._base_info(target).shape
        if len(a_info.shape) != 2 or len(b_info.shape) != 2:
            raise RestaError(
                f"{where}: LoRA A/B of shape {list(a_info.shape)}/{list(b_info.shape)} "
                "(convolution LoRA) is not supported; merge with peft and pass the full model"
            )
        for key in (a_key, b_key) + ((bias,) if bias else ()):
            if ad.file.tensors[key].dtype not in KERNEL_DTYPES:
                raise RestaError(
                    f"{ad.file.path}: tensor {key!r} has dtype "
                    f"{ad.file.tensors[key].dtype}; LoRA weights must be BF16/F16/F32"
                )
        r_cfg, scaling = ad.scaling(module)
        r = a_info.shape[0]
        if b_info.shape[1] != r:
            raise RestaError(f"{where}: lora A has rank {r} but B {list(b_info.shape)}; the adapter file is corrupt")
        if r != r_cfg:
            raise RestaError(
                f"{where}: rank {r} in the weights but {r_cfg} from r/rank_pattern in "
                f"{ADAPTER_CONFIG}; the scale alpha/r would be wrong. Fix the config"
            )
        delta_shape = (b_info.shape[0], a_info.shape[1])
        if kind == "embedding":
            transpose = True
            if w_shape != delta_shape[::-1]:
                raise RestaError(
                    f"{where}: embedding LoRA gives a {list(delta_shape[::-1])} delta but {target} is "
                    f"{list(w_shape)}; this embedding layout is not supported. Merge with peft "
                    "(merge_and_unload) and pass the full model"
                )
        else:
            transpose = ad.fan_in_fan_out
            want = delta_shape[::-1] if transpose else delta_shape
            if w_shape != want:
                hint = (
                    " (set fan_in_fan_out to match the layer: true for GPT-2 Conv1D)"
                    if w_shape == (delta_shape if transpose else delta_shape[::-1])
                    else ""
                )
                raise RestaError(
                    f"{where}: LoRA delta {list(want)} does not fit {target} "
                    f"{list(w_shape)}{hint}; is {self.base_flag} the model the adapter "
                    "was trained on?"
                )
        if self._base_info(target).dtype not in KERNEL_DTYPES:
            raise RestaError(
                f"base {self.base.path}: tensor {target} is {self._base_info(target).dtype}; "
                "LoRA can only be merged into BF16/F16/F32 weights (quantized base?). Pass "
                f"the unquantized base model as {self.base_flag}"
            )
        if bias is not None:
            bias_target = resolve(f"{module}.bias")
            if bias_target is None:
                raise RestaError(f"{where}: lora_bias needs a bias in the base, but the base has no {module}.bias")
        if target in self.modules:
            raise RestaError(f"{where}: a second LoRA on {target}; the adapter is inconsistent")
        self.modules[target] = LoraModule(module, target, a_key, b_key, scaling, transpose, kind, bias)
        if bias is not None:
            self.modules[bias_target] = LoraModule(module, bias_target, a_key, b_key, scaling, False, "bias", bias)

    def _mirror_tied(self) -> None:
        """Tied embed/lm_head share one parameter: a LoRA delta on one changes both."""
        tied = self.base.tied_embeddings()
        if not tied:
            return
        changed = [n for n in tied if n in self.modules or n in self.replaced]
        if len(changed) != 1:
            return
        (src,) = changed
        other = tied[1] if src == tied[0] else tied[0]
        if src in self.replaced and src not in self.modules:
            raise RestaError(
                f"{self.adapter.path}: the adapter replaces {src} (modules_to_save) but the base ties it "
                f"to {other}; transformers re-ties them on load and would drop one. Save both in "
                "modules_to_save, or untie the base (tie_word_embeddings false) before training"
            )
        if self.base.info(src).shape != self.base.info(other).shape:
            return
        mod = self.modules[src]
        self.modules[other] = LoraModule(
            mod.module, other, mod.a, mod.b, mod.scaling, mod.transpose, mod.kind, mod.bias
        )
        if src in self.replaced:
            self.replaced[other] = self.replaced[src]

    # --- Checkpoint interface ---------------------------------------------------

    def _base_info(self, name: str) -> TensorInfo:
        key = self.replaced.get(name)
        return self.adapter.file.tensors[key] if key else self.base.info(name)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def names(self) -> list[str]:
        return list(self.location)

    def info(self, name: str) -> TensorInfo:
        """Merged tensors report F32 (what tensor_view returns); see stored_dtype."""
        if name in self.modules:
            shape = self._base_info(name).shape
            numel = math.prod(shape)
            return TensorInfo(name, "F32", shape, 0, numel * 4)
        return self._base_info(name)

    def stored_dtype(self, name: str) -> str:
        """The dtype the output keeps for ``name``: the base's (merged values are rounded once)."""
        return self.base.info(name).dtype

    def is_merged(self, name: str) -> bool:
        return name in self.modules

    def file_of(self, name: str) -> None:
        """None: the engine reads every tensor through ``array`` (merged ones live in memory)."""
        return None

    def tensor_view(self, name: str) -> torch.Tensor:
        """Flat view: merged fp32 for LoRA targets, else the base's (or adapter's) stored tensor."""
        if name in self.modules:
            return self._merge(self.modules[name])
        key = self.replaced.get(name)
        if key is not None:
            return self.adapter.file.view(key)
        return self.base.tensor_view(name)

    def array(self, name: str):
        """``tensor_view`` as a numpy array (BF16 as uint16 bits), for the engine's host side."""
        if name in self.modules:
            return self._merge(self.modules[name]).numpy()
        key = self.replaced.get(name)
        if key is not None:
            return self.adapter.file.array(key)
        return self.base.array(name)

    def _weight(self, name: str) -> torch.Tensor:
        info = self._base_info(name)
        key = self.replaced.get(name)
        flat = self.adapter.file.view(key) if key else self.base.tensor_view(name)
        return flat.view(info.shape)

    def _merge(self, mod: LoraModule) -> torch.Tensor:
        """W + s·(B@A) in fp32, op for op as peft's get_delta_weight + merge."""
        import torch  # merging is torch's fp32 matmul, op for op as peft

        ad = self.adapter.file
        w = self._weight(mod.target)
        if mod.kind == "bias":
            merged = ad.view(mod.bias).float() * mod.scaling
            merged.add_(w.float())
            return merged.reshape(-1)
        delta = self._delta(mod)
        if mod.transpose:
            # A fresh buffer: an fp32 base's ``.float()`` would alias the mmap, and
            # the aligned model may be read from that same mapping.
            merged = torch.empty(w.shape, dtype=torch.float32)
            merged.copy_(w)
            merged.add_(delta.T)
        else:
            # fp32 addition is commutative bit for bit, so adding W in place
            # equals peft's W + delta without a second full-size buffer.
            merged = delta.add_(w)
        del delta
        self._release_base(mod.target)
        return merged.reshape(-1)

    def lora_tensor(self, key: str) -> torch.Tensor:
        """An adapter tensor (or its replacement) in fp32, in its stored shape."""
        ad = self.adapter.file
        t = self.replacements.get(key)
        t = ad.view(key).view(ad.tensors[key].shape) if t is None else t
        return t.float()

    def lora_delta(self, mod: LoraModule) -> torch.Tensor:
        """s·(B@A) in fp32, op for op as peft's get_delta_weight (B@A's layout: out × in)."""
        delta = self.lora_tensor(mod.b) @ self.lora_tensor(mod.a)
        delta.mul_(mod.scaling)
        return delta

    def _release_base(self, name: str) -> None:
        if name not in self.replaced:
            info = self.base.info(name)
            self.base.release(name, 0, info.nbytes)

    def prefetch(self, name: str, byte_lo: int, byte_hi: int) -> None:
        if name not in self.modules and name not in self.replaced:
            self.base.prefetch(name, byte_lo, byte_hi)

    def release(self, name: str, byte_lo: int, byte_hi: int) -> None:
        if name not in self.modules and name not in self.replaced:
            self.base.release(name, byte_lo, byte_hi)

    def tied_embeddings(self) -> tuple[str, str] | None:
        return self.base.tied_embeddings()

    def quantization(self) -> str | None:
        return None  # the base was checked when the adapter was attached

    def side_files(self) -> list[Path]:
        """The base's config files, with tokenizer files from the adapter directory when it has
        them (added tokens), and config.json's vocab_size fixed when the adapter resized it."""
        files = {p.name: p for p in self.base.side_files()}
        for n in SIDE_FILE_PATTERNS:
            if n != "config.json" and (self.adapter.path / n).is_file():
                files[n] = self.adapter.path / n
        vocab = self._resized_vocab()
        if vocab is not None and "config.json" in files:
            cfg = dict(self.base.config)
            cfg["vocab_size"] = vocab
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="resta-lora-"))
            (self._tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            files["config.json"] = self._tmp / "config.json"
        return list(files.values())

    def _resized_vocab(self) -> int | None:
        vocab = self.base.config.get("vocab_size")
        for name in self.replaced:
            if name.endswith(EMBED_SUFFIXES):
                rows = self._base_info(name).shape[0]
                if isinstance(vocab, int) and rows != vocab:
                    return rows
        return None

    def summary(self) -> str:
        """One line for the plan notes (the inputs by their directories' names: notes are published)."""
        kinds = {}
        for m in self.modules.values():
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        mode = "rsLoRA" if self.adapter.use_rslora else "LoRA"
        full = [n for n in self.replaced if n not in self.modules]
        extra = f"; {len(full)} full tensor(s) from the adapter" if full else ""
        return (
            f"{mode} adapter {self.adapter.path.name} merged in fp32 into base {Path(self.base.path).name} "
            f"({what} tensor(s){extra}); merged tensors are written in the base's dtype"
        )

    def fingerprint(self) -> dict:
        own = {f"adapter/{k}": v for k, v in self.adapter.fingerprint().items()}
        own.update({f"base/{k}": v for k, v in self.base.fingerprint().items()})
        return own

    def check_unchanged(self) -> None:
        self.adapter.file.check_unchanged()
        self.base.check_unchanged()

    def close(self) -> None:
        self.adapter.file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
