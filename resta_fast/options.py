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

import dataclasses
import re
from dataclasses import dataclass

from resta_fast import spec as S
from resta_fast.errors import OptionError
from resta_fast.kernels import BACKENDS

# Input roles were decided here before roles.py; still importable from here (a plain re-export:
# roles imports nothing of options, so this is no circle).
from resta_fast.roles import ROLE_KINDS, Roles, resolve_roles  # noqa: F401
from resta_fast.spec import MAX_SEED, Option, Spec  # noqa: F401 (MAX_SEED is still imported from here)

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


_shown = S.shown


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


def check_device_spelling(device: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; whether it exists here is ``api.resolve_device``'s check."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise OptionError("device", "{device} {got}: expected auto, cpu, cuda or cuda:N", got=_shown(device))
    return device


def _strings(name: str):
    """A repeatable option's value as a tuple of strings: one string, or a list of them (None: none)."""

    def normalize(value):
        value = (value,) if isinstance(value, str) else (() if value is None else value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise OptionError(name, "{" + name + "} must be a string or a list of strings, got {got}", got=repr(value))
        return tuple(value)

    return normalize


def _regexes(name: str):
    def check(value):
        patterns = _strings(name)(value)
        for pattern in patterns:
            compile_pattern(pattern, name)
        return patterns

    return check


def _beta_rules(value) -> tuple[BetaRule, ...]:
    if isinstance(value, dict):  # {REGEX: BETA} is the same as ["REGEX=BETA", ...] (a manifest's mapping)
        value = [f"{k}={v}" for k, v in value.items()]
    value = (value,) if isinstance(value, (str, BetaRule)) else (() if value is None else value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(r, (str, BetaRule)) for r in value):
        raise OptionError(
            "beta_rules",
            "{beta_rules} must be a list of 'REGEX=BETA' or a mapping {{REGEX: BETA}}, got {got}",
            got=repr(value),
        )
    return tuple(r if isinstance(r, BetaRule) else BetaRule.parse(r) for r in value)


def _dtype(value):
    parse_dtype(value)
    return value  # kept as spelled; ``out_dtype`` (and the record) is the safetensors name


def _with_dare(flag: str):
    """The card gives the seed back only with DARE (it means nothing without)."""
    return lambda params: [flag, str(params.get("seed", 0))] if params.get("dare") is not None else []


# The flag spelling of a recorded dtype (the card gives --dtype back as a user types it).
DTYPE_FLAGS = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# Every option of `patch` (and of a batch job) that is not an input path: the one list the flags,
# the manifest keys, the API keywords, the provenance's params and the card's command come from.
PATCH = Spec(
    "patch",
    (
        Option(
            "beta",
            1.0,
            "scale of the safety vector (default 1.0)",
            check=S.finite("beta"),
            kind=float,
            record=S.as_given,
            reproduce=S.always("--beta", "beta"),
        ),
        Option(
            "dare",
            None,
            "DARE drop probability for the fine-tune delta",
            check=S.probability("dare"),
            kind=float,
            metavar="P",
            record=S.as_given,
        ),
        Option(
            "seed",
            0,
            "DARE seed (default 0)",
            check=S.seed("seed"),
            kind=int,
            record=S.as_given,
            reproduce=_with_dare("--seed"),
        ),
        Option(
            "include",
            (),
            "patch only tensors matching (repeatable)",
            check=_regexes("include"),
            metavar="REGEX",
            repeat=True,
            parse_time=False,
            record=list,
        ),
        Option(
            "exclude",
            (),
            "never patch tensors matching (repeatable)",
            check=_regexes("exclude"),
            metavar="REGEX",
            repeat=True,
            parse_time=False,
            record=list,
        ),
        Option(
            "beta_rules",
            (),
            "per-pattern beta; the first matching rule wins (repeatable)",
            check=_beta_rules,
            flag="--beta-rule",
            metavar="REGEX=BETA",
            repeat=True,
            parse_time=False,
            record=lambda rules: [f"{r.pattern}={r.beta}" for r in rules],
        ),
        Option(
            "dtype",
            None,
            "output dtype (bfloat16, float16, float32; default: fine-tune's)",
            check=_dtype,
            parse_time=False,
            record=parse_dtype,
            reproduce=lambda p: ["--dtype", DTYPE_FLAGS.get(p["dtype"], p["dtype"])] if p.get("dtype") else [],
        ),
        Option("backend", "auto", "", check=S.one_of("backend", BACKEND_CHOICES), choices=BACKEND_CHOICES),
        Option(
            "device",
            "cpu",
            "cpu, cuda, cuda:N or auto (default cpu)",
            check=check_device_spelling,
            parse_time=False,
        ),
        Option(
            "threads",
            None,
            "CPU kernel threads (default: all cores but the writer's)",
            check=S.count("threads"),
            kind=int,
            manifest=None,  # a batch's run setting (batch.manifest.BATCH), not a job's
        ),
        Option(
            "staging",
            "auto",
            "how inputs are read: mmap (zero-copy; the CPU default, measured faster), read (reader "
            "threads pread into reusable buffers, so an input truncated mid-run is a clean error; "
            "the GPU default)",
            check=S.one_of("staging", STAGING_CHOICES),
            choices=STAGING_CHOICES,
            manifest=None,
        ),
        Option(
            "gpu_pool_bytes",
            None,
            "pinned host (and device) staging memory for --device cuda (default 256)",
            check=S.count("gpu_pool_bytes"),
            kind=int,
            flag="--gpu-pool-mb",
            metavar="MB",
            manifest=None,
            cli_default=256,
            to_api=lambda mib: mib << 20,
        ),
        Option("chunk_elems", None, "", check=S.count("chunk_elems"), kind=int, flag="", manifest=None),
    ),
)


class PatchOptions:
    """How to patch: every option of ``patch`` that is not an input path (the ``PATCH`` spec).

    Values are kept as given (``beta=1`` stays an int: it is recorded in the
    provenance, and so in the weight files' headers, exactly as passed).
    Construction checks every option and raises the first ``OptionError``;
    ``problems_of`` lists them all. An unknown keyword is a TypeError.

    Options: beta, dare (None: no DARE), seed, include, exclude, beta_rules
    (``"REGEX=BETA"`` strings or BetaRule; the first match wins), dtype (None: the
    fine-tune's), backend (auto | cpp | triton | torch), device (auto | cpu | cuda[:N]),
    threads, staging (auto | mmap | read), gpu_pool_bytes, chunk_elems; each one's
    ``help`` is in ``PATCH``.

    Example:
        >>> PatchOptions(beta_rules=["mlp=0.3"]).beta_rules
        (BetaRule(pattern='mlp', beta=0.3),)
    """

    spec = PATCH

    def __init__(self, **values):
        kept, problems = self.spec.check(values)
        if problems:
            raise problems[0]
        self.__dict__.update(kept)

    @classmethod
    def problems_of(cls, **values) -> list[OptionError]:
        """Every problem of ``PatchOptions(**values)``, which raises only the first
        (the manifest loader lists them all). Empty: the values are valid."""
        return cls.spec.check(values)[1]

    @property
    def out_dtype(self) -> str | None:
        """``dtype`` as a safetensors name (BF16 ...)."""
        return parse_dtype(self.dtype)

    def values(self) -> dict:
        return {name: getattr(self, name) for name in self.spec.names()}

    def params(self) -> dict:
        """The ``params`` of a patch's provenance: recorded in every output weight
        file's header, so the same options give byte-identical files."""
        return self.spec.params(self.values())

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.values() == self.values()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.values().items())})"


# The options of `vector`: patch's own dtype (exact fp32 by default), include and exclude (the
# Python API's knobs: a vector written with them is not patch's whole V, and the card says so).
VECTOR = Spec(
    "vector",
    (
        dataclasses.replace(PATCH.get("dtype"), default="float32", help="float32 (default, exact) or bfloat16"),
        dataclasses.replace(PATCH.get("include"), flag=""),
        dataclasses.replace(PATCH.get("exclude"), flag=""),
    ),
)
