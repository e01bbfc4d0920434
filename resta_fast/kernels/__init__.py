"""Kernel backends and how one is chosen.

Every backend exposes the same two functions over flat, contiguous torch tensors
(bf16/fp16/fp32 each, any mix; all of one length):

``patch_into(out, f, a, u=None, b=None, *, beta, p=0.0, seed=0, offset=0, threads=None)``
    out = round(F + β(A − U)), or with ``b`` (DARE base) the DARE form of docs/spec.md §2.
    ``u=None`` means ``a`` holds a precomputed safety vector V. ``seed`` is the
    already-mixed per-tensor seed (``rng.tensor_seed``); ``offset`` is the flat
    index of element 0 of this chunk within the whole tensor. Returns the number
    of non-finite outputs when the backend counts them in-kernel, else None.

``convert_into(out, x)``
    dtype conversion with docs/spec.md §2's rounding (for copied tensors when --dtype
    asks for another output dtype).

Backends: ``torch`` (reference, always there), ``cpp`` (native, CPU), ``triton``
(GPU, or the interpreter with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from resta_fast.errors import RestaError

BACKENDS = ("cpp", "triton", "torch")
_MODULES = {
    "torch": "resta_fast.kernels.reference",
    "cpp": "resta_fast.kernels.cpp",
    "triton": "resta_fast.kernels.triton_patch",
}
_warned_fallback = False


class BackendUnavailable(RestaError):
    """A backend asked for by name cannot run here; the message says why."""


def load_backend(name: str) -> ModuleType:
    """Import backend ``name`` and check it can run; raise BackendUnavailable."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module = importlib.import_module(_MODULES[name])
    check = getattr(module, "check_available", None)
    if check is not None:
        check()
    return module


def backend_status() -> dict[str, str]:
    """For ``env``: 'ok' or the reason each backend cannot run."""
    status = {}
    for name in BACKENDS:
        try:
            load_backend(name)
            status[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not swallowed
            status[name] = f"unavailable: {exc}"
    return status


def choose_backend(name: str = "auto", device: str = "cpu") -> tuple[str, ModuleType]:
    """Resolve ``auto`` to the fastest backend for ``device``.

    An explicit name raises the original load error; ``auto`` falls back to the
    next backend and warns once.
    """
    global _warned_fallback
    if name != "auto":
        return name, load_backend(name)
    order = ["triton", "torch"] if device.startswith("cuda") else ["cpp", "torch"]
    for candidate in order:
        try:
            return candidate, load_backend(candidate)
        except Exception as exc:  # noqa: BLE001 - auto mode falls back by design
            if not _warned_fallback:
                warnings.warn(
                    f"resta_fast: {candidate} backend unavailable ({exc}); falling back to {order[-1]}", stacklevel=2
                )
                _warned_fallback = True
    raise AssertionError("unreachable: torch backend always loads")
