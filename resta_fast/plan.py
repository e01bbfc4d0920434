"""Which tensors to patch and how (docs/spec.md §4): the plan, built before any I/O.

The plan matches tensors by name across the fine-tune, the aligned/unaligned
pair (or a precomputed vector) and the DARE base, applies include/exclude and
per-pattern β rules, handles extra vocabulary rows and tied embeddings, and
fixes the output layout (the fine-tune's files, in the fine-tune's order).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from resta_fast.errors import OptionError, RestaError
from resta_fast.io.checkpoint import EMBED_SUFFIXES, LM_HEAD_SUFFIXES, Checkpoint
from resta_fast.io.names import prefix_mapping  # also importable from here, its home before io/names.py
from resta_fast.io.reader import DTYPES, FLOAT_DTYPES, KERNEL_DTYPES
from resta_fast.io.source import TensorSource
from resta_fast.io.torch_bin import safetensors_name

# BetaRule and parse_dtype live with the other options; re-exported for their users here.
from resta_fast.options import DTYPE_ALIASES, BetaRule, compile_pattern, parse_dtype  # noqa: F401


@dataclass
class TensorPlan:
    """What happens to one output tensor."""

    name: str
    action: str  # "patch" or "copy"
    reason: str
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    beta: float | None = None
    patched_elems: int = 0  # leading elements patched; the rest copied (extra vocab rows)
    seed_name: str | None = None  # name whose DARE stream is used (tied weights share one)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class OutputFile:
    name: str
    tensors: list[TensorPlan]


@dataclass
class Plan:
    """The whole patch, printable with --dry-run and saved in the report."""

    files: list[OutputFile]
    notes: list[str] = field(default_factory=list)
    mode: str = "pair"  # "pair" (A, U), "vector" (V), or "merge" (a LoRA merge, nothing patched)
    dare: bool = False

    def tensors(self):
        for f in self.files:
            yield from f.tensors

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for t in self.tensors():
            counts[t.action] = counts.get(t.action, 0) + 1
        return {"tensors": sum(counts.values()), **counts, "files": len(self.files)}

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "dare": self.dare,
            "summary": self.summary(),
            "notes": self.notes,
            "files": [{"name": f.name, "tensors": [asdict(t) for t in f.tensors]} for f in self.files],
        }

    def format_table(self) -> str:
        """Human-readable plan for --dry-run."""
        lines = [f"{'action':6}  {'beta':>6}  {'dtype':11}  {'shape':20}  name  (reason)"]
        for t in self.tensors():
            beta = "" if t.beta is None else f"{t.beta:g}"
            dtype = t.in_dtype if t.in_dtype == t.out_dtype else f"{t.in_dtype}->{t.out_dtype}"
            lines.append(
                f"{t.action:6}  {beta:>6}  {dtype:11}  {str(list(t.shape)):20}  {t.name}"
                + (f"  ({t.reason})" if t.reason else "")
            )
        s = self.summary()
        lines.append(
            f"{s['tensors']} tensors in {s['files']} file(s): {s.get('patch', 0)} patched, {s.get('copy', 0)} copied"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _is_vocab_tensor(name: str) -> bool:
    return name.endswith(EMBED_SUFFIXES + LM_HEAD_SUFFIXES)


def _match_source_names(finetuned, role: str, ck, notes: list[str]) -> None:
    """Give ``ck`` aliases for fine-tune names it stores under another prefix or,
    when it ties its LM head to its embedding, without an lm_head tensor."""
    want = [n for f in finetuned.files.values() for n, i in f.tensors.items() if i.dtype in KERNEL_DTYPES]
    missing = [n for n in want if n not in ck]
    if not missing:
        return
    aliases = prefix_mapping(missing, ck.location)
    if aliases:
        first = next(iter(aliases))
        notes.append(
            f"{role} stores {len(aliases)} tensor(s) under other names: mapped by prefix, "
            f"e.g. finetuned {first} = {role} {aliases[first]}"
        )
    embed = next((n for n in ck.location if n.endswith(EMBED_SUFFIXES)), None)
    if (
        embed
        and ck.config.get("tie_word_embeddings", False)
        and not any(n.endswith(LM_HEAD_SUFFIXES) for n in ck.location)
    ):
        for n in missing:
            if n.endswith(LM_HEAD_SUFFIXES) and n not in aliases:
                aliases[n] = embed
                notes.append(f"{role} ties its LM head to {embed} (no {n} on disk): used {embed} for {n}")
    if aliases:
        ck.add_aliases(aliases)
    if want and not any(n in ck for n in want):
        raise RestaError(
            f"{role} {ck.path} shares no tensor names with finetuned {finetuned.path} "
            f"(finetuned has {', '.join(want[:3])}; {role} has {', '.join(list(ck.location)[:3])}), "
            "even allowing for a different prefix. Are they the same architecture? Rename the tensors "
            "or pass matching models"
        )


def build_plan(
    finetuned: TensorSource,
    *,
    aligned: Checkpoint | None = None,
    unaligned: Checkpoint | None = None,
    vector: Checkpoint | None = None,
    dare_base: Checkpoint | None = None,
    beta: float = 1.0,
    include=(),
    exclude=(),
    beta_rules=(),
    dtype: str | None = None,
) -> Plan:
    """Decide, for every tensor of the fine-tune, whether and how it is patched.

    Args:
        finetuned: the fine-tune; its tensors, files and order define the output.
        aligned, unaligned: the pair whose difference is the safety vector, or
        vector: a precomputed V (then aligned/unaligned are not used for V).
        dare_base: DARE's base (None: no DARE).
        include/exclude: regexes (re.search) over tensor names.
        beta_rules: BetaRule list; the first matching rule's β wins.
        dtype: output dtype name (``BF16``...) or None for the fine-tune's.
    Returns:
        A Plan. Raises RestaError on shape disagreements (all of them listed).
    """
    if (vector is None) == (aligned is None or unaligned is None):
        raise OptionError("vector", "give either {aligned} and {unaligned}, or {vector} (not both)")
    includes = [compile_pattern(p, "include") for p in include]
    excludes = [compile_pattern(p, "exclude") for p in exclude]
    rules = [(compile_pattern(r.pattern, "beta_rules"), r.beta) for r in beta_rules]
    sources = [("vector", vector)] if vector is not None else [("aligned", aligned), ("unaligned", unaligned)]
    if dare_base is not None:
        sources.append(("dare base", dare_base))
    for role, ck in [("finetuned", finetuned)] + sources:
        quant = ck.quantization()
        if quant:
            raise RestaError(
                f"{role} {ck.path}: {quant}. RESTA needs unquantized BF16/FP16/FP32 "
                "weights (arithmetic on quantized integers would be silently wrong); "
                "pass the unquantized model, or dequantize and save it first"
            )
    notes: list[str] = []
    for role, ck in sources:
        _match_source_names(finetuned, role, ck, notes)
    tied = finetuned.tied_embeddings()
    errors: list[str] = []
    missing: dict[str, list[str]] = {}
    mixed_dtypes = set()
    files = []
    for fname, sfile in finetuned.files.items():
        tensors = []
        for name, info in sfile.tensors.items():
            # A LoRA fine-tune hands merged tensors over as exact fp32; they keep the base's dtype.
            stored = finetuned.stored_dtype(name)
            out_dtype = dtype if (dtype and info.dtype in KERNEL_DTYPES) else stored

            def copy(reason, name=name, info=info, out_dtype=out_dtype, tensors=tensors):
                tensors.append(TensorPlan(name, "copy", reason, info.shape, info.dtype, out_dtype))

            if info.dtype not in KERNEL_DTYPES:
                kind = "float" if info.dtype in FLOAT_DTYPES else "non-float"
                copy(f"{kind} dtype {info.dtype} is not patched")
                continue
            if includes and not any(p.search(name) for p in includes):
                copy("not matched by --include")
                continue
            if any(p.search(name) for p in excludes):
                copy("matched by --exclude")
                continue
            absent = [role for role, ck in sources if name not in ck]
            if absent:
                for role in absent:
                    missing.setdefault(role, []).append(name)
                copy(f"missing from {' and '.join(absent)}")
                continue
            shapes = {role: ck.info(name).shape for role, ck in sources}
            bad_dtypes = [
                f"{role} {ck.info(name).dtype}" for role, ck in sources if ck.info(name).dtype not in KERNEL_DTYPES
            ]
            if bad_dtypes:
                errors.append(
                    f"{name}: finetuned is {info.dtype} but {', '.join(bad_dtypes)}; "
                    "a float tensor must be BF16/F16/F32 in every input"
                )
                continue
            if any(ck.info(name).dtype != stored for _, ck in sources):
                mixed_dtypes.add(name)
            ref_shape = next(iter(shapes.values()))
            if any(s != ref_shape for s in shapes.values()):
                errors.append(
                    f"{name}: inputs disagree on shape: finetuned {list(info.shape)}, "
                    + ", ".join(f"{role} {list(s)}" for role, s in shapes.items())
                )
                continue
            patched = info.numel
            reason = ""
            if info.shape != ref_shape:
                extra_rows = (
                    len(info.shape) == 2
                    and len(ref_shape) == 2
                    and info.shape[1] == ref_shape[1]
                    and info.shape[0] > ref_shape[0]
                    and _is_vocab_tensor(name)
                )
                if not extra_rows:
                    errors.append(
                        f"{name}: finetuned shape {list(info.shape)} vs "
                        f"{sources[0][0]} {list(ref_shape)}; shapes must be equal (only "
                        "embedding/LM-head tensors may have extra vocabulary rows)"
                    )
                    continue
                patched = ref_shape[0] * ref_shape[1]
                reason = f"rows {ref_shape[0]}..{info.shape[0] - 1} are new vocabulary: kept from the fine-tune"
            if finetuned.is_merged(name):
                reason = (reason + "; " if reason else "") + "LoRA merged in fp32"
            tensor_beta = next((b for p, b in rules if p.search(name)), beta)
            seed_name = name
            if tied and name == tied[1]:
                seed_name = tied[0]
                reason = (reason + "; " if reason else "") + f"tied to {tied[0]} (same DARE stream)"
            tensors.append(
                TensorPlan(
                    name,
                    "patch",
                    reason,
                    info.shape,
                    info.dtype,
                    out_dtype,
                    beta=tensor_beta,
                    patched_elems=patched,
                    seed_name=seed_name,
                )
            )
        files.append(OutputFile(safetensors_name(fname), tensors))  # a .bin input: its safetensors name
    if errors:
        raise RestaError(
            f"cannot patch {finetuned.path}: {len(errors)} tensor(s) disagree:\n  "
            + "\n  ".join(errors[:20])
            + ("\n  ..." if len(errors) > 20 else "")
        )
    for role, names in missing.items():
        notes.append(
            f"{len(names)} tensor(s) missing from {role}, copied unpatched from the fine-tune "
            f"(e.g. {', '.join(names[:3])})"
        )
    if mixed_dtypes:
        notes.append(
            f"{len(mixed_dtypes)} tensor(s) have different dtypes across inputs "
            f"(e.g. {sorted(mixed_dtypes)[0]}); computed in fp32, written in the output dtype"
        )
    if tied:
        notes.append(f"tied embeddings: {tied[1]} uses {tied[0]}'s DARE stream so they stay equal")
    plan = Plan(files, notes, mode="vector" if vector is not None else "pair", dare=dare_base is not None)
    if not any(t.action == "patch" for t in plan.tensors()):
        plan.notes.append(
            "no tensor is patched: check --include/--exclude and that the inputs are the same architecture"
        )
    return plan


def copy_plan(finetuned: TensorSource) -> Plan:
    """Every tensor of ``finetuned`` copied into the output, a merged LoRA tensor
    rounded once from fp32 to its stored dtype: the plan of a LoRA merge (Safe
    LoRA, SafeMERGE ``--merge``) with no safety vector added."""
    files = []
    for fname, sfile in finetuned.files.items():
        tensors = []
        for name, info in sfile.tensors.items():
            merged = finetuned.is_merged(name)
            tensors.append(
                TensorPlan(
                    name,
                    "copy",
                    "LoRA merged in fp32" if merged else "",
                    info.shape,
                    info.dtype,
                    finetuned.stored_dtype(name),
                )
            )
        files.append(OutputFile(safetensors_name(fname), tensors))  # a .bin input: its safetensors name
    return Plan(files, mode="merge")


def dtype_itemsize(name: str) -> int:
    return DTYPES[name][1]
