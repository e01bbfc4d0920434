"""Safe LoRA (Hsu et al., NeurIPS 2024): project a LoRA update onto the alignment direction.

For every LoRA module on a weight W, V = W_aligned − W_unaligned is what
alignment changed in that weight, and Safe LoRA's projection is
C = V·Vᵀ / ‖V‖_F. A module whose projected update B' = C·B points away from
its own update, cos(vec(B'·A), vec(B·A)) ≤ T (rounded to 5 decimals as in the
authors' code, IBM/SafeLoRA), gets lora_B := B'. ``--num-layers K`` sets T to
the K-th smallest cosine (then ≤ T, so ties may project more, as published).

C is d_out × d_out (485 MB in fp32 for one 7B up_proj) and is never formed:
C·B = V·(Vᵀ·B) / ‖V‖_F costs O(d_out·d_in·r), and the cosine follows from r × r
Gram matrices, ⟨X·A, Y·A⟩_F = Σ (Xᵀ·Y) ⊙ (A·Aᵀ), with no d_out × d_in product.
Modules are scored one at a time; each pair of weights is read once.

Example:
    >>> import torch
    >>> v, b, a = torch.eye(3)[:, :2], torch.ones(3, 1), torch.ones(1, 2)
    >>> round(lora_cosine(a, b, projected_b(v, b)), 5)
    0.8165
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from resta_fast.errors import OptionError, RestaError
from resta_fast.io.names import prefix_mapping
from resta_fast.kernels.difference import difference_kernel

if TYPE_CHECKING:
    import torch

    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.lora import LoraFinetuned, LoraModule

DEFAULT_THRESHOLD = 0.5  # the paper's default
COS_DECIMALS = 5  # the authors round each cosine to 5 decimals before comparing


def projected_b(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """C·B = V·(Vᵀ·B) / ‖V‖_F in fp32, without forming C; None when V = 0.

    Args:
        v: V in the LoRA update's layout (d_out × d_in), fp32.
        b: lora_B (d_out × r), fp32.
    """
    norm = frobenius(v)
    if norm == 0:
        return None  # alignment did not touch this weight: there is no direction to project onto
    out = v @ (v.T @ b)
    out.div_(norm)
    return out


def frobenius(v: torch.Tensor, block: int = 1 << 15) -> float:
    """‖V‖_F: fp32 norms of ``block``-element runs, their squares summed in fp64.

    torch's fp32 norm of a whole 11008 × 4096 weight is 0.32% low (its fp32
    accumulation over 45M squares), which alone would put B' 3e-3 from the fp64
    value (benchmarks/bench_safelora.py module); over 32k elements its error is
    ~1e-7, and one vectorised call does every run (converting V to fp64 cost 2x).
    """
    import torch

    flat = (v if v.is_contiguous() else v.T).reshape(-1)  # a transposed view (Conv1D) without a copy
    whole = flat.numel() // block * block
    parts = torch.linalg.vector_norm(flat[:whole].view(-1, block), dim=1).double().square().sum()
    if whole < flat.numel():
        parts = parts + torch.linalg.vector_norm(flat[whole:].double()).square()
    return math.sqrt(float(parts))


def lora_cosine(a: torch.Tensor, b: torch.Tensor, b_proj: torch.Tensor) -> float:
    """cos(vec(B'·A), vec(B·A)) from r × r Gram matrices (computed in fp64; not rounded).

    A zero update (an untrained lora_B) has cosine 0, as torch's
    ``cosine_similarity`` gives it.
    """
    a64 = a.double()
    gram = a64 @ a64.T
    p64, b64 = b_proj.double(), b.double()

    def inner(x, y) -> float:
        return float(((x.T @ y) * gram).sum())

    denom = math.sqrt(max(inner(p64, p64), 0.0) * max(inner(b64, b64), 0.0))
    return 0.0 if denom == 0 else max(-1.0, min(1.0, inner(p64, b64) / denom))


def round_cos(cos: float) -> float:
    """The authors' ``numpy.round(cos, 5)`` (round half to even on the scaled value)."""
    import numpy as np

    return float(np.round(cos, COS_DECIMALS))


@dataclass
class ModuleScore:
    """One LoRA module's Safe LoRA cosine and whether it is projected."""

    module: str  # module name in the adapter
    target: str  # the weight it updates, in the aligned model
    lora_a: str  # adapter keys
    lora_b: str
    shape: list[int]  # the update's d_out × d_in
    rank: int
    cos: float | None  # rounded; None when V = 0 (never projected)
    projected: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def linear_modules(view: LoraFinetuned) -> list[LoraModule]:
    """The adapter's LoRA modules in the model's tensor order (each once: a tied
    mirror is the same module); embedding and bias LoRA are refused."""
    seen, mods = set(), []
    for name in view.location:
        mod = view.modules.get(name)
        if mod is None or mod.b in seen:
            continue
        if mod.kind != "linear":
            what = "lora_bias" if mod.kind == "bias" else "an embedding LoRA (lora_embedding_A/B)"
            raise RestaError(
                f"{view.adapter.path}: module {mod.module!r} is {what}; Safe LoRA projects "
                "linear LoRA layers only. Retrain without it, or use `resta-fast patch` on the "
                "adapter (RESTA)"
            )
        seen.add(mod.b)
        mods.append(mod)
    if not mods:
        raise RestaError(
            f"{view.adapter.path}: the adapter has no LoRA layers (only full tensors); Safe LoRA has nothing to project"
        )
    return mods


def _counterparts(targets: list[str], unaligned: Checkpoint, view: LoraFinetuned) -> dict[str, str]:
    """Aligned tensor name -> the unaligned model's name for it (same name, or another prefix)."""
    missing = [t for t in targets if t not in unaligned]
    mapping = prefix_mapping(missing, unaligned.location) if missing else {}
    names = {t: t if t in unaligned else mapping.get(t) for t in targets}
    absent = [t for t, u in names.items() if u is None]
    if absent:
        raise RestaError(
            f"unaligned {unaligned.path}: has no {absent[0]} (nor {len(absent) - 1} other LoRA "
            f"target(s) of {view.adapter.path}); pass the model --aligned was aligned from"
        )
    return names


def alignment_delta(
    aligned: Checkpoint, unaligned: Checkpoint, name: str, name_u: str, shape, kernel=None
) -> torch.Tensor:
    """V = fp32(W_aligned) − fp32(W_unaligned) for one weight, in a fresh buffer (the
    inputs' mappings are never written), with their pages released after.

    ``kernel``: ``kernels.difference.difference_kernel()``'s C++ kernel (4x faster than torch
    here, the same bits: docs/spec.md §2 with β = 1); None computes it with torch.
    """
    import numpy as np
    import torch

    a_info, u_info = aligned.info(name), unaligned.info(name_u)
    if tuple(u_info.shape) != tuple(a_info.shape):
        raise RestaError(
            f"{name}: aligned {aligned.path} has shape {list(a_info.shape)} but unaligned "
            f"{unaligned.path} has {list(u_info.shape)} ({name_u}); they must be the same "
            "architecture"
        )
    if kernel is not None:
        out = np.empty(math.prod(shape), np.float32)
        kernel.patch_arrays(out, None, aligned.array(name), unaligned.array(name_u))
        v = torch.from_numpy(out).view(shape)
    else:
        v = torch.empty(shape, dtype=torch.float32)
        v.copy_(aligned.tensor_view(name).view(shape))
        v.sub_(unaligned.tensor_view(name_u).view(shape))
    aligned.release(name, 0, a_info.nbytes)
    unaligned.release(name_u, 0, u_info.nbytes)
    return v


def score_modules(view: LoraFinetuned, unaligned: Checkpoint, *, on_module=None):
    """Score every LoRA module of ``view`` (an adapter read on the aligned model).

    Yields (ModuleScore, B' in fp32 or None), one module at a time; ``on_module``
    is called after each (progress).
    """
    aligned = view.base
    mods = linear_modules(view)
    counterpart = _counterparts([m.target for m in mods], unaligned, view)
    backend, kernel = difference_kernel()
    kernel = kernel if backend == "cpp" else None
    for mod in mods:
        a, b = view.lora_tensor(mod.a), view.lora_tensor(mod.b)
        w_shape = tuple(aligned.info(mod.target).shape)
        v = alignment_delta(aligned, unaligned, mod.target, counterpart[mod.target], w_shape, kernel)
        v = v.T if mod.transpose else v  # the update's layout: (B·A) is d_out × d_in
        b_proj = projected_b(v, b)
        del v
        cos = None if b_proj is None else round_cos(lora_cosine(a, b, b_proj))
        score = ModuleScore(mod.module, mod.target, mod.a, mod.b, [b.shape[0], a.shape[1]], a.shape[0], cos)
        yield score, b_proj
        if on_module is not None:
            on_module()


def check_selection(threshold: float | None, num_layers: int | None) -> None:
    """Exactly one of threshold (in [-1, 1]) and num_layers (>= 1)."""
    if (threshold is None) == (num_layers is None):
        raise OptionError("threshold", "give exactly one of {threshold} T and {num_layers} K")
    if threshold is not None and not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise OptionError("threshold", "{threshold} must be a cosine in [-1, 1], got {got}", got=threshold)
    if num_layers is not None and (type(num_layers) is not int or num_layers < 1):
        raise OptionError("num_layers", "{num_layers} must be an integer >= 1, got {got!r}", got=num_layers)


def select(scores: list[ModuleScore], *, threshold: float | None = None, num_layers: int | None = None) -> float:
    """Mark the modules to project (cos ≤ T) and return T.

    ``num_layers`` K: T is the K-th smallest cosine, as in the authors' code.
    Modules without a cosine (V = 0) are never projected.

    Example:
        >>> s = [ModuleScore("m", "w", "a", "b", [2, 2], 1, c) for c in (0.9, 0.2, 0.4)]
        >>> select(s, num_layers=2), [x.projected for x in s]
        (0.4, [False, True, True])
    """
    check_selection(threshold, num_layers)
    if num_layers is not None:
        defined = sorted(s.cos for s in scores if s.cos is not None)
        if num_layers > len(defined):
            unset = len(scores) - len(defined)
            why = f" ({unset} of them unchanged by alignment, V = 0)" if unset else ""
            raise OptionError(
                "num_layers",
                "{num_layers} {k} is more than the {n} LoRA module(s) that can be projected" + why,
                k=num_layers,
                n=len(defined),
            )
        threshold = defined[num_layers - 1]
    for s in scores:
        s.projected = s.cos is not None and s.cos <= threshold
    return threshold
