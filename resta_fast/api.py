"""The public Python API: prepare() and execute(), and patch() / make_vector() built on them.

``prepare`` is the one preparation step of every entry point (patch, vector,
batch, verify): inputs opened once, roles resolved, the plan, the backend, the
provenance. ``execute`` hands a prepared patch to the one executor
(``executor``: claim, write through the streaming engine, finish, validate, commit).

Example:
    >>> from resta_fast import api
    >>> report = api.patch("ft/", "out/", aligned="chat/", unaligned="shadow/", beta=0.5)  # doctest: +SKIP
    >>> report["plan"]["summary"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from resta_fast.errors import OptionError
from resta_fast.executor import EngineWrite, Output, Validator, write_one
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.kernels import choose_backend
from resta_fast.kernels.difference import difference_kernel
from resta_fast.lora import LoraFinetuned
from resta_fast.options import MAX_SEED, PATCH, VECTOR, PatchOptions, check_device_spelling
from resta_fast.pipeline.job import Inputs
from resta_fast.plan import Plan, build_plan
from resta_fast.report import (
    REPORT_NAME,
    VALIDATION_FAILED,
    finish_output,
    output_bytes,
    output_metadata,
    provenance,
    record_validation,
    with_paths,
)
from resta_fast.roles import Roles, resolve_roles, vector_roles

__all__ = [
    "MAX_SEED",
    "REPORT_NAME",
    "VALIDATION_FAILED",
    "Opener",
    "PatchOptions",
    "PreparedPatch",
    "execute",
    "finish_output",
    "make_vector",
    "open_roles",
    "output_metadata",
    "patch",
    "plan_patch",
    "prepare",
    "prepare_vector",
    "record_validation",
    "resolve_device",
]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a cuda device must be visible."""
    check_device_spelling(device)
    if device == "cpu":
        return device  # no torch needed to decide
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError("device", "{device} {got}: no CUDA GPU is visible; use {device} cpu", got=device)
    return device


class Opener:
    """Checkpoints by path, each opened once and closed with ``stack``: inputs
    shared by several roles, or by the jobs of a batch group, are one object
    (read once per chunk by the engine)."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.cache: dict[str, Checkpoint] = {}

    def __call__(self, path, role: str) -> Checkpoint | None:
        if path is None:
            return None
        key = os.fspath(path)
        if key not in self.cache:
            ck = Checkpoint(path, role=role)
            self.stack.callback(ck.close)
            self.cache[key] = ck
        return self.cache[key]

    def lora(self, adapter, base: Checkpoint, **kw) -> LoraFinetuned:
        """A LoRA fine-tune merged into ``base`` in-stream (one per job: it holds the adapter);
        ``kw`` go to ``LoraFinetuned`` (``replace``, ``delta``, ``base_flag``)."""
        ft = LoraFinetuned(adapter, base, **kw)
        self.stack.callback(ft.close)
        return ft


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def open_roles(roles: Roles, opener: Opener, *, dare: bool) -> tuple[dict[str, Checkpoint | None], Inputs]:
    """Open the inputs of ``roles``: ({role: checkpoint} as the provenance records them, engine Inputs).

    The DARE base that is the aligned model (or the LoRA base) is that same
    object, and so is a LoRA base that is the aligned model.
    """
    al = opener(roles.aligned, "aligned")
    lora_base = None
    if roles.lora:
        # Merged LoRA tensors read the base; sharing the aligned model's mmap when they are one.
        lora_base = al if _same(roles.base, roles.aligned) else opener(roles.base, "base")
        ft = opener.lora(roles.finetuned, lora_base)
    else:
        ft = opener(roles.finetuned, "finetuned")
    un = opener(roles.unaligned, "unaligned")
    vec = opener(roles.vector, "vector")
    dbase = (
        al
        if _same(roles.dare_base, roles.aligned)
        else lora_base
        if roles.lora and _same(roles.dare_base, roles.base)
        else opener(roles.dare_base, "dare base")
    )
    dbase = dbase if dare else None
    checkpoints = {
        "finetuned": ft,
        "aligned": al,
        "unaligned": un,
        "vector": vec,
        "dare_base": dbase,
        "base": lora_base,
    }
    return checkpoints, Inputs(ft, al, un, vec, dbase)


def plan_patch(inputs: Inputs, options: PatchOptions) -> Plan:
    """The plan of a patch of ``inputs`` with ``options`` (what ``prepare`` and ``verify`` build)."""
    plan = build_plan(
        inputs.finetuned,
        aligned=inputs.aligned if inputs.vector is None else None,
        unaligned=inputs.unaligned,
        vector=inputs.vector,
        dare_base=inputs.dare_base,
        beta=options.beta,
        include=options.include,
        exclude=options.exclude,
        beta_rules=options.beta_rules,
        dtype=options.out_dtype,
    )
    if isinstance(inputs.finetuned, LoraFinetuned):
        plan.notes.insert(0, inputs.finetuned.summary())
    return plan


@dataclass
class PreparedPatch:
    """A patch ready to run: inputs open, roles resolved, plan built, backend chosen.

    Use it as a context manager (or call ``close``) to close the inputs it
    opened; inputs of a shared ``Opener`` are closed with the opener's stack.
    ``kernel`` is None when prepared with ``here=False`` (checked for another
    machine: Ray, Slurm).
    """

    command: str
    options: PatchOptions
    roles: Roles
    plan: Plan
    inputs: Inputs
    checkpoints: dict[str, Checkpoint | None]
    provenance: dict
    input_paths: list[Path]
    device: str
    backend_name: str
    kernel: ModuleType | None
    stack: ExitStack | None = None

    @property
    def out_bytes(self) -> int:
        """Bytes of tensor data the output will hold."""
        return output_bytes(self.plan)

    def writing(self) -> EngineWrite:
        """How the executor writes this patch's tensors: the engine, from the plan."""
        return EngineWrite(
            self.plan, self.inputs, self.kernel, self.backend_name, self.device, self.options.dare, self.options.seed
        )

    def recorded_provenance(self, record_paths: bool = False) -> dict:
        """The provenance the output records; ``record_paths``: with each input's local path (``report.with_paths``)."""
        return with_paths(self.provenance, self.checkpoints) if record_paths else self.provenance

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()

    def __enter__(self) -> PreparedPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _own_stack(opener: Opener | None):
    """(opener, the stack the caller will own or None); closes what was opened if preparing fails."""
    if opener is not None:
        yield opener, None
        return
    stack = ExitStack()
    try:
        yield Opener(stack), stack
    except BaseException:
        stack.close()
        raise


def prepare(
    finetuned,
    *,
    aligned=None,
    unaligned=None,
    vector=None,
    base=None,
    dare_base=None,
    options: PatchOptions | None = None,
    opener: Opener | None = None,
    here: bool = True,
    resolver=None,
) -> PreparedPatch:
    """Open the inputs, resolve their roles, build the plan, choose the backend.

    Every input may be a local path or a Hugging Face Hub id (``ORG/NAME[@REV]``,
    ``hf://ORG/NAME[@REV]``; an existing local path wins): see ``io.hub``.

    Args:
        finetuned: fine-tuned model (HF directory or .safetensors file), or a
            PEFT LoRA adapter directory, merged in fp32 into ``base`` in-stream.
        aligned, unaligned: the pair defining V = aligned − unaligned; or
        vector: a precomputed V checkpoint (``make_vector``).
        base: the model a LoRA adapter was trained on (default: aligned).
        dare_base: DARE base (default: the LoRA base, else aligned).
        options: PatchOptions (default: all defaults).
        opener: share opened checkpoints with other prepared patches (a batch
            group); its stack closes them. None: the PreparedPatch owns its inputs.
        here: it runs on this machine: check the device exists and load the
            backend. False (checking for another machine) leaves ``kernel`` None.
        resolver: an ``io.hub.Resolver`` shared with other prepared patches
            (a batch: each distinct Hub id resolved once); None: resolve here.
    Returns:
        A PreparedPatch (a context manager closing its inputs).

    Example:
        >>> with prepare("ft", aligned="chat", unaligned="shadow", options=PatchOptions(beta=0.5)) as p:
        ...     print(p.plan.format_table())  # doctest: +SKIP
    """
    options = options if options is not None else PatchOptions()
    device = resolve_device(options.device) if here else options.device
    roles = resolve_roles(
        finetuned,
        aligned=aligned,
        unaligned=unaligned,
        vector=vector,
        base=base,
        dare_base=dare_base,
        dare=options.dare is not None,
        resolver=resolver,
    )
    with _own_stack(opener) as (opener, stack):
        checkpoints, inputs = open_roles(roles, opener, dare=options.dare is not None)
        plan = plan_patch(inputs, options)
        backend_name, kernel = options.backend, None
        if here:
            backend_name, kernel = choose_backend(options.backend, device)
            if device.startswith("cuda") and backend_name != "triton":
                raise OptionError(
                    "backend",
                    "{device} {dev} runs the triton backend; {backend} {name} is CPU-only "
                    "(use {backend} triton or auto, or {device} cpu)",
                    dev=device,
                    name=backend_name,
                )
        return PreparedPatch(
            "patch",
            options,
            roles,
            plan,
            inputs,
            checkpoints,
            provenance("patch", options.params(), checkpoints, roles.hub),
            roles.paths(),
            device,
            backend_name,
            kernel,
            stack,
        )


@VECTOR.keywords
def prepare_vector(aligned, unaligned, *, opener: Opener | None = None, resolver=None, **options) -> PreparedPatch:
    """``prepare`` for the safety vector V = aligned − unaligned (see ``make_vector``); inputs as ``prepare``'s,
    ``options`` the ``options.VECTOR`` spec's (dtype, include, exclude)."""
    kept, problems = VECTOR.check(options)
    if problems:
        raise problems[0]
    options = PatchOptions(**kept)
    roles = vector_roles(aligned, unaligned, resolver=resolver)
    aligned, unaligned = roles.aligned, roles.unaligned
    with _own_stack(opener) as (opener, stack):
        al = opener(aligned, "aligned")
        un = opener(unaligned, "unaligned")
        plan = build_plan(
            al, aligned=al, unaligned=un, include=options.include, exclude=options.exclude, dtype=options.out_dtype
        )
        dropped = [t.name for t in plan.tensors() if t.action != "patch"]
        for f in plan.files:
            f.tensors = [t for t in f.tensors if t.action == "patch"]
            for t in f.tensors:
                t.out_dtype, t.beta, t.reason = options.out_dtype, 1.0, "aligned − unaligned"
        plan.files = [f for f in plan.files if f.tensors]
        if dropped:
            plan.notes.append(f"{len(dropped)} tensor(s) not in the vector (non-float or missing), e.g. {dropped[0]}")
        params = VECTOR.params(options.values())
        checkpoints = {"aligned": al, "unaligned": un}
        backend_name, kernel = difference_kernel()
        return PreparedPatch(
            "vector",
            options,
            roles,
            plan,
            Inputs(al, al, un),
            checkpoints,
            provenance("vector", params, checkpoints, roles.hub),
            [Path(aligned), Path(unaligned)],
            "cpu",
            backend_name,
            kernel,
            stack,
        )


def execute(
    prepared: PreparedPatch,
    out,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    progress: bool = False,
    validate: Validator | None = None,
    device_cache=None,
    command_line: str | None = None,
    record_paths: bool = False,
) -> dict:
    """Run a prepared patch into the atomic output directory ``out`` and write its report.

    Args:
        prepared: from ``prepare`` or ``prepare_vector`` (with ``here=True``).
        out: output directory (must not exist unless ``overwrite``).
        fsync: make the output durable before the final rename.
        validate: ``callable(model_dir) -> {"passed", "reason", ...}`` run on the
            finished output before its rename (``resta_fast.eval.make_validator``);
            the verdict goes into the report, and a failed output is kept but
            marked (VALIDATION_FAILED).
        device_cache: a device cache shared by runs over the same inputs (GPU).
        command_line: the command as typed, for the model card's "how to
            reproduce" (the CLI passes it; shown only with ``record_paths``, as it
            names local paths); otherwise the card rebuilds one.
        record_paths: also record each input's absolute local path in
            ``resta_fast.json`` (never in the weights). Off: no file of the output
            holds a local path, a user or host name, or a file time.
    Returns:
        The report dict (also written to ``out/resta_fast.json``); the output
        also gets its model card, ``out/README.md`` (``card.render_model_card``).

    Example:
        >>> with prepare("ft", vector="v") as p:  # doctest: +SKIP
        ...     execute(p, "restored")
    """
    if prepared.kernel is None:
        raise ValueError("execute needs a patch prepared with here=True (it has no kernel)")
    if validate is not None and not callable(validate):
        raise TypeError(
            "validate takes a callable(model_dir) -> verdict; build one from evaluation options "
            "with resta_fast.eval.make_validator"
        )
    out = Path(out)
    options = prepared.options
    output = Output(
        out,
        prepared.writing(),
        prepared.recorded_provenance(record_paths),
        prepared.input_paths,
        command=prepared.provenance.get("command", "patch"),
        overwrite=overwrite,
        validate=validate,
        command_line=command_line,
        bar=f"resta-fast -> {out.name}" if progress else None,
    )
    return write_one(
        output,
        fsync=fsync,
        threads=options.threads,
        chunk_elems=options.chunk_elems,
        cache=device_cache,
        pool_bytes=options.gpu_pool_bytes,
        staging=None if options.staging == "auto" else options.staging,
    )


@PATCH.keywords
def patch(
    finetuned,
    out,
    *,
    aligned=None,
    unaligned=None,
    vector=None,
    base=None,
    dare_base=None,
    overwrite: bool = False,
    fsync: bool = True,
    dry_run: bool = False,
    progress: bool = False,
    validate: Validator | None = None,
    device_cache=None,
    command_line: str | None = None,
    record_paths: bool = False,
    **options,
) -> dict:
    """Realign ``finetuned`` with RESTA and write the result to ``out`` (``prepare`` + ``execute``).

    Args:
        finetuned: fine-tuned model (HF directory or .safetensors file), or a
            PEFT LoRA adapter directory, merged in fp32 into ``base`` in-stream.
            Every input may also be a Hugging Face Hub id, ``ORG/NAME[@REV]`` or
            ``hf://ORG/NAME[@REV]`` (an existing local path wins; see ``io.hub``).
        base: the model a LoRA adapter was trained on (default: aligned); the
            output takes its layout and dtypes, and it is DARE's default base.
        out: output directory (created atomically; must not exist unless overwrite).
        aligned, unaligned: the pair defining V = aligned − unaligned; or
        vector: a precomputed V checkpoint (``make_vector``).
        dare_base: DARE base (default: aligned).
        options: every ``PatchOptions`` keyword (the ``options.PATCH`` spec: beta, dare,
            seed, include, exclude, beta_rules, dtype, backend, device, threads, staging,
            gpu_pool_bytes, chunk_elems), each with the spec's default.
        fsync: make the output durable before the final rename.
        dry_run: only build and return the plan.
        validate: ``callable(model_dir) -> verdict`` evaluating the output before
            its rename (``resta_fast.eval.make_validator``); recorded in
            ``report["validation"]``.
        device_cache: a device cache shared across calls on the same inputs.
        command_line: the command as typed, for the model card (see ``execute``).
        record_paths: record the inputs' local paths in ``resta_fast.json`` (see ``execute``).
    Returns:
        The report dict (also written to ``out/resta_fast.json``).

    Example:
        >>> patch("ft", "restored", aligned="chat", unaligned="shadow", beta=0.5)  # doctest: +SKIP
    """
    options = PatchOptions(**options)
    inputs = {"aligned": aligned, "unaligned": unaligned, "vector": vector, "base": base, "dare_base": dare_base}
    if dry_run:
        resolve_device(options.device)
        with prepare(finetuned, **inputs, options=options, here=False) as prepared:
            return {"dry_run": True, "plan": prepared.plan.to_json(), "plan_text": prepared.plan.format_table()}
    with prepare(finetuned, **inputs, options=options) as prepared:
        return execute(
            prepared,
            out,
            overwrite=overwrite,
            fsync=fsync,
            progress=progress,
            validate=validate,
            device_cache=device_cache,
            command_line=command_line,
            record_paths=record_paths,
        )


@VECTOR.keywords
def make_vector(
    aligned,
    unaligned,
    out,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    progress: bool = False,
    command_line: str | None = None,
    record_paths: bool = False,
    **options,
) -> dict:
    """Write the safety vector V = aligned − unaligned as a checkpoint.

    fp32 (the default) makes patching with V bit-identical to patching with the
    pair. Tensors that cannot be differenced (non-float, missing) are left out.
    ``options``: the ``options.VECTOR`` spec's (dtype, include, exclude).

    Example:
        >>> make_vector("chat", "shadow", "safety_vector")  # doctest: +SKIP
    """
    with prepare_vector(aligned, unaligned, **options) as prepared:
        return execute(
            prepared,
            out,
            overwrite=overwrite,
            fsync=fsync,
            progress=progress,
            command_line=command_line,
            record_paths=record_paths,
        )
