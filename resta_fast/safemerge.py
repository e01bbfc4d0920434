"""SafeMERGE (Djuhera et al., 2025): merge a safety adapter into the layers a fine-tune made unsafe.

Per LoRA layer, Safe LoRA's cosine of the fine-tune adapter (``safelora``)
decides: where cos < τ (default 0.35) the layer becomes a weighted merge of
the fine-tune adapter and a *safety adapter* (a LoRA safety-tuned from the same
base; weights default [0.8, 0.2]); elsewhere the fine-tune adapter is kept.

Two outputs, which differ on purpose:

- ``merge_adapter_space`` is the merge as published (aladinD/SafeMERGE, which
  calls peft's ``add_weighted_adapter`` per layer): A' = Σ √(wᵢsᵢ)·Aᵢ and
  B' = Σ √(wᵢsᵢ)·Bᵢ with lora_alpha = r. Its update B'·A' carries cross terms
  √(w₁s₁w₂s₂)·(B₁A₂ + B₂A₁), so it is *not* Σ wᵢ·ΔWᵢ; kept layers use weights
  [1, 0]. ``dare_linear`` thins every A and B, kept layers included, as published.
- ``weight_space_delta`` is the merge the method means, exactly:
  W + w₁·ΔW_ft + w₂·ΔW_safe on selected layers (each ΔW = s·B·A in fp32, with
  DARE from docs/spec.md §3's stream for ``dare_linear``), W + ΔW_ft elsewhere.

Example:
    >>> check_weights((0.8, 0.2)), check_tau(0.35)
    ((0.8, 0.2), 0.35)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from resta_fast import spec as S
from resta_fast.errors import OptionError, RestaError
from resta_fast.rng import tensor_seed
from resta_fast.safelora import MERGE
from resta_fast.spec import Option, Spec

if TYPE_CHECKING:
    import torch

    from resta_fast.lora import LoraFinetuned, LoraModule
    from resta_fast.safelora import ModuleScore

DEFAULT_TAU = 0.35
DEFAULT_WEIGHTS = (0.8, 0.2)
COMBINATIONS = ("linear", "dare_linear")
# The safety adapter's DARE stream: docs/spec.md §3 keyed by the tensor's name plus this suffix,
# so the two deltas of one layer never share a mask.
SAFETY_STREAM_SUFFIX = "#safety"


def check_tau(tau: float) -> float:
    """A cosine in [-1, 1] (the ``tau`` option's check), as a float."""
    return SAFEMERGE.get("tau").run_check(tau)


def check_weights(weights) -> tuple[float, float]:
    """Two finite numbers: (fine-tune weight, safety weight)."""
    try:
        w = tuple(float(x) for x in weights)
    except (TypeError, ValueError):
        w = ()
    if len(w) != 2 or not all(math.isfinite(x) for x in w):
        raise OptionError("weights", "{weights} takes two finite numbers (fine-tune, safety), got {got!r}", got=weights)
    return w


def _check_combination_name(combination: str) -> str:
    if combination not in COMBINATIONS:
        raise OptionError("combination", "{combination} must be linear or dare_linear, got {got!r}", got=combination)
    return combination


def check_combination(combination: str, density: float | None) -> float | None:
    """``density`` as the combination needs it: none for linear, a fraction in (0, 1] for dare_linear."""
    _check_combination_name(combination)
    if combination == "linear":
        if density is not None:
            raise OptionError("density", "{density} is for {combination} dare_linear")
        return None
    if density is None or not (math.isfinite(density) and 0 < density <= 1):
        raise OptionError(
            "density",
            "{combination} dare_linear needs {density} D, the fraction kept, in (0, 1]"
            + ("" if density is None else ", got {got}"),
            got=density,
        )
    return float(density)


def pair_modules(ft: LoraFinetuned, safety: LoraFinetuned, ft_mods: list[LoraModule]) -> dict[str, LoraModule]:
    """The safety adapter's module for each fine-tune module, by module name; the two
    adapters must target the same weights with the same shapes and hold no full tensors."""
    where = f"safety adapter {safety.adapter.path}"
    if safety.replaced:
        raise RestaError(
            f"{where}: holds full tensors (modules_to_save, e.g. {next(iter(safety.replaced))}); "
            "SafeMERGE merges LoRA layers only. Save the safety adapter without modules_to_save"
        )
    want = {m.target for m in ft_mods}
    have = {t for t, m in safety.modules.items() if m.kind == "linear"}
    if want != have or any(m.kind != "linear" for m in safety.modules.values()):
        extra, missing = sorted(have - want), sorted(want - have)
        detail = f"missing {missing[0]}" if missing else f"extra {extra[0]}" if extra else "non-linear LoRA"
        raise RestaError(
            f"{where}: targets other modules than fine-tune adapter {ft.adapter.path} ({detail}); "
            "both adapters must be trained on the same base with the same target_modules"
        )
    pairs = {}
    for m in ft_mods:
        s = safety.modules[m.target]
        for part, k_ft, k_s in (("lora_A", m.a, s.a), ("lora_B", m.b, s.b)):
            shape_ft = ft.adapter.file.tensors[k_ft].shape
            shape_s = safety.adapter.file.tensors[k_s].shape
            if shape_ft != shape_s:
                raise RestaError(
                    f"{where}: {k_s} is {list(shape_s)} but the fine-tune's {part} of {m.module} is "
                    f"{list(shape_ft)}; SafeMERGE needs adapters of the same rank and shapes"
                )
        if s.transpose != m.transpose:
            raise RestaError(f"{where}: fan_in_fan_out differs from fine-tune adapter {ft.adapter.path}")
        pairs[m.module] = s
    return pairs


def selected(scores: list[ModuleScore], tau: float) -> None:
    """Mark the layers to merge: cos < τ (strict, as published). A weight alignment left
    unchanged (V = 0) has the published projection C = 0, so cos 0."""
    for s in scores:
        if s.cos is None:
            s.cos = 0.0
        s.projected = s.cos < tau


def layer_weights(is_selected: bool, weights: tuple[float, float]) -> tuple[float, float]:
    return weights if is_selected else (1.0, 0.0)


def dare(t: torch.Tensor, p: float, seed: int, name: str) -> torch.Tensor:
    """docs/spec.md §2's DARE on a whole tensor ``t`` (flat index order = its stored layout):
    keep = u ≥ p, t1 = keep ? t·r : +0.0, r = fp32(1)/(fp32(1) − fp32(p))."""
    import torch

    r = np.float32(1) / (np.float32(1) - np.float32(p))
    u = _uniforms(tensor_seed(seed, name), t.numel()).view(t.shape)
    scaled = t * torch.tensor(r, dtype=torch.float32)
    return torch.where(u >= torch.tensor(p, dtype=torch.float32), scaled, torch.zeros((), dtype=torch.float32))


def _uniforms(seed: int, n: int) -> torch.Tensor:
    try:
        from resta_fast.kernels import cpp

        return cpp.uniform(seed, 0, n)  # native and bit-identical; the torch stream is slow on big tensors
    except Exception:  # noqa: BLE001 - the native kernel is optional
        from resta_fast.rng import uniform

        return uniform(seed, 0, n)


def merge_adapter_space(
    ft: LoraFinetuned,
    safety: LoraFinetuned,
    mod: LoraModule,
    smod: LoraModule,
    w: tuple[float, float],
    *,
    density: float | None,
    seed: int,
):
    """(A', B') of one layer, as peft's ``_generalized_task_arithmetic_weighted_adapter``
    computes them for weights ``w`` (cast to the fine-tune's lora_A dtype, as peft does)."""
    import torch

    from resta_fast.io.reader import torch_dtype

    scaled = [w[0] * mod.scaling, w[1] * smod.scaling]
    w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled])
    w_b = torch.tensor([math.sqrt(abs(x)) for x in scaled])
    out = []
    for weights, keys in ((w_a, (mod.a, smod.a)), (w_b, (mod.b, smod.b))):
        parts = [ft.lora_tensor(keys[0]), safety.lora_tensor(keys[1])]
        if density is not None:
            parts = [
                dare(parts[0], 1 - density, seed, keys[0]),
                dare(parts[1], 1 - density, seed, keys[1] + SAFETY_STREAM_SUFFIX),
            ]
        stacked = torch.stack(parts, dim=0)
        out.append((stacked * weights.view(2, 1, 1)).sum(dim=0))
    dtype = torch_dtype(ft.adapter.file.tensors[mod.a].dtype)
    return out[0].to(dtype), out[1].to(dtype)


def weight_space_delta(
    ft: LoraFinetuned,
    safety: LoraFinetuned,
    pairs: dict[str, LoraModule],
    chosen: set[str],
    weights: tuple[float, float],
    *,
    density: float | None,
    seed: int,
):
    """The ``delta(module)`` for ``LoraFinetuned``: w₁·ΔW_ft + w₂·ΔW_safe on the ``chosen``
    modules (names; DARE per delta when ``density``, seeded by the output tensor's name),
    ΔW_ft elsewhere; fp32, in B·A's layout. Only adapter tensors are read, so ``ft`` and
    ``safety`` may be views over any base."""

    def thinned(view: LoraFinetuned, m: LoraModule, name: str) -> torch.Tensor:
        d = view.lora_delta(m)
        if density is None:
            return d
        # The stream indexes the stored weight's layout: transpose there and back.
        return dare(d.T, 1 - density, seed, name).T if m.transpose else dare(d, 1 - density, seed, name)

    def delta(mod: LoraModule) -> torch.Tensor:
        if mod.module not in chosen:
            return ft.lora_delta(mod)
        out = thinned(ft, mod, mod.target)
        out.mul_(weights[0])
        other = thinned(safety, pairs[mod.module], mod.target + SAFETY_STREAM_SUFFIX)
        other.mul_(weights[1])
        out.add_(other)
        return out

    return delta


def _with_density(params: dict) -> list[str]:
    """The card gives the seed back only with dare_linear's density (it means nothing without)."""
    return ["--seed", str(params.get("seed", 0))] if params.get("density") is not None else []


# The options of `safemerge` (flags, API keywords, params, the card's command): written once, here.
SAFEMERGE = Spec(
    "safemerge",
    (
        Option(
            "tau",
            DEFAULT_TAU,
            "merge layers with cos < TAU (default 0.35)",
            check=lambda tau: float(S.cosine("tau")(tau)),  # recorded as a float, as it always was
            kind=float,
            record=S.as_given,
            reproduce=S.always("--tau", "tau"),
        ),
        Option(
            "weights",
            DEFAULT_WEIGHTS,
            "fine-tune and safety weights of a merged layer (default 0.8 0.2)",
            check=check_weights,
            each=S.finite("weights"),
            kind=float,
            nargs=2,
            metavar=("W1", "W2"),
            record=list,
            reproduce=S.always("--weights", "weights"),
        ),
        Option(
            "combination",
            "linear",
            "how a layer is merged (default linear)",
            check=_check_combination_name,
            choices=COMBINATIONS,
            record=S.as_given,
            reproduce=S.always("--combination", "combination"),
        ),
        Option(
            "density",
            None,
            "dare_linear: the fraction of each delta kept, in (0, 1]",
            check=S.fraction("density"),
            kind=float,
            metavar="D",
            record=S.as_given,
        ),
        Option(
            "seed",
            0,
            "dare_linear seed (docs/spec.md §3 stream; default 0)",
            check=S.seed("seed"),
            kind=int,
            record=S.as_given,
            reproduce=_with_density,
        ),
        MERGE,
    ),
)
