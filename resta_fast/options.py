"""Everything about a patch that is an option rather than an input path, checked in one place.

``PatchOptions`` is what ``api.prepare`` takes; the CLI builds it from flags and
the batch manifest from its keys. Its checks raise ``OptionError`` in the
library's words (``beta``); the CLI renders them as flags (``--beta``), the
manifest loader under the job that set them. Which input path plays which role
is ``roles.resolve_roles``'s question (re-exported here, where it was first).
Nothing here opens a checkpoint, reads a file or imports torch.

Example:
    >>> PatchOptions(beta=0.5, dare=0.3, seed=1).params()["dare"]
    0.3
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields

from resta_fast.errors import OptionError
from resta_fast.kernels import BACKENDS

# Input roles were decided here before roles.py; still importable from here (a plain re-export:
# roles imports nothing of options, so this is no circle).
from resta_fast.roles import ROLE_KINDS, Roles, resolve_roles  # noqa: F401

MAX_SEED = 2**64 - 1
# The safetensors names themselves too (f16, f32): a recorded plan's dtype parses back.
DTYPE_ALIASES = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "f16": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "f32": "F32",
}
BACKEND_CHOICES = ("auto", *BACKENDS)
STAGING_CHOICES = ("auto", "mmap", "read")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


def _shown(value) -> str:
    """A value as an error shows it: numbers plainly (the CLI's ``got inf``), the rest quoted."""
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def parse_dtype(name: str | None) -> str | None:
    """User dtype spelling (``bfloat16``, ``fp16`` ...) -> safetensors name."""
    if name is None:
        return None
    key = name.lower() if isinstance(name, str) else None
    if key not in DTYPE_ALIASES:
        raise OptionError("dtype", "{dtype} {name!r} is not supported; choose bfloat16, float16 or float32", name=name)
    return DTYPE_ALIASES[key]


def compile_pattern(pattern: str, option: str) -> re.Pattern:
    """``re.compile`` a user regex of ``option`` (include, exclude, beta_rules)."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise OptionError(
            option, "{" + option + "} {pattern!r} is not a valid regular expression ({exc})", pattern=pattern, exc=exc
        ) from None


@dataclass
class BetaRule:
    """Tensors whose name matches ``pattern`` (re.search) get ``beta``."""

    pattern: str
    beta: float

    @classmethod
    def parse(cls, text: str) -> BetaRule:
        """Parse ``'REGEX=0.3'`` (the last '=' splits, so the regex may contain '=')."""
        pattern, sep, value = text.rpartition("=") if isinstance(text, str) else ("", "", "")
        try:
            beta = float(value)
        except ValueError:
            beta = None
        if not sep or not pattern or beta is None:
            raise OptionError("beta_rules", "{beta_rules} {text!r}: expected REGEX=BETA, e.g. 'mlp\\.=0.3'", text=text)
        compile_pattern(pattern, "beta_rules")
        return cls(pattern, beta)


def check_device_spelling(device: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether it exists here is ``api.resolve_device``'s check."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise OptionError("device", "{device} {got}: expected auto, cpu, cuda or cuda:N", got=_shown(device))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_count(v) -> bool:
    return v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1)


@dataclass
class PatchOptions:
    """How to patch: every option of ``patch`` that is not an input path.

    Values are kept as given (``beta=1`` stays an int: it is recorded in the
    provenance, and so in the weight files' headers, exactly as passed).
    Construction checks every field and raises the first ``OptionError``;
    ``problems_of`` lists them all.

    Args:
        beta: scale of the safety vector; beta_rules: ``"REGEX=BETA"`` strings
            or BetaRule (the first matching rule wins).
        dare: DARE drop probability (None: no DARE); seed: DARE seed.
        include, exclude: regexes over tensor names.
        dtype: output dtype (``bfloat16``, ``float16``, ``float32``; None: the fine-tune's).
        backend: auto | cpp | triton | torch; device: auto | cpu | cuda | cuda:N.
        threads: CPU kernel threads (None: all cores but the writer's); chunk_elems: elements per
            chunk (None: the engine's default); gpu_pool_bytes: pinned staging
            memory for a GPU (None: the engine's default).
        staging: how inputs are read: ``mmap`` (zero-copy views), ``read`` (pread
            into reusable buffers: an input truncated mid-run is a clean error)
            or ``auto`` (mmap on the CPU, where it measured faster; read on a GPU).

    Example:
        >>> PatchOptions(beta_rules=["mlp=0.3"]).beta_rules
        (BetaRule(pattern='mlp', beta=0.3),)
    """

    beta: float = 1.0
    dare: float | None = None
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    beta_rules: tuple[BetaRule, ...] = ()
    dtype: str | None = None
    backend: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    chunk_elems: int | None = None
    gpu_pool_bytes: int | None = None
    staging: str = "auto"
    out_dtype: str | None = field(init=False, default=None)  # dtype as a safetensors name (BF16 ...)

    def __post_init__(self):
        problems = self._check()
        if problems:
            raise problems[0]

    @classmethod
    def problems_of(cls, **values) -> list[OptionError]:
        """Every problem of ``PatchOptions(**values)``, which raises only the first
        (the manifest loader lists them all). Empty: the values are valid."""
        opts = cls.__new__(cls)
        for f in fields(cls):
            setattr(opts, f.name, values.pop(f.name, f.default) if f.init else f.default)
        if values:
            raise TypeError(f"unknown PatchOptions field(s): {', '.join(values)}")
        return opts._check()

    def _check(self) -> list[OptionError]:
        for key in ("include", "exclude", "beta_rules"):
            value = getattr(self, key)
            setattr(self, key, (value,) if isinstance(value, str) else tuple(value or ()))
        found: list[OptionError] = []
        if not _is_real(self.beta) or not math.isfinite(self.beta):
            found.append(OptionError("beta", "{beta} must be a finite number, got {got}", got=_shown(self.beta)))
        if self.dare is not None and (not _is_real(self.dare) or not 0.0 <= self.dare < 1.0):
            found.append(
                OptionError("dare", "{dare} must be a drop probability in [0, 1), got {got}", got=_shown(self.dare))
            )
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            found.append(
                OptionError("seed", "{seed} must be an integer in [0, 2**64), got {got}", got=_shown(self.seed))
            )
        rules = []
        for rule in self.beta_rules:
            try:
                rules.append(rule if isinstance(rule, BetaRule) else BetaRule.parse(rule))
            except OptionError as exc:
                found.append(exc)
        self.beta_rules = tuple(rules) if len(rules) == len(self.beta_rules) else self.beta_rules
        try:
            self.out_dtype = parse_dtype(self.dtype)
        except OptionError as exc:
            found.append(exc)
        try:
            check_device_spelling(self.device)
        except OptionError as exc:
            found.append(exc)
        for key in ("include", "exclude"):
            for pattern in getattr(self, key):
                try:
                    compile_pattern(pattern, key)
                except OptionError as exc:
                    found.append(exc)
        if self.backend not in BACKEND_CHOICES:
            found.append(
                OptionError(
                    "backend",
                    "{backend} must be one of " + ", ".join(BACKEND_CHOICES) + ", got {got}",
                    got=_shown(self.backend),
                )
            )
        if self.staging not in STAGING_CHOICES:
            found.append(
                OptionError(
                    "staging",
                    "{staging} must be one of " + ", ".join(STAGING_CHOICES) + ", got {got}",
                    got=_shown(self.staging),
                )
            )
        for key in ("threads", "chunk_elems"):
            if not _is_count(getattr(self, key)):
                found.append(
                    OptionError(key, "{" + key + "} must be an integer >= 1, got {got}", got=_shown(getattr(self, key)))
                )
        return found

    def params(self) -> dict:
        """The ``params`` of a patch's provenance: recorded in every output weight
        file's header, so the same options give byte-identical files."""
        return {
            "beta": self.beta,
            "dare": self.dare,
            "seed": self.seed,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "beta_rules": [f"{r.pattern}={r.beta}" for r in self.beta_rules],
            "dtype": self.out_dtype,
        }
