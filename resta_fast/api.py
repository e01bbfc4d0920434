"""The public Python API: patch(), make_vector().

Example:
    >>> from resta_fast import api
    >>> report = api.patch("ft/", "out/", aligned="chat/", unaligned="shadow/", beta=0.5)  # doctest: +SKIP
    >>> report["plan"]["summary"]
"""

from __future__ import annotations

import datetime
import json
import math
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from resta_fast import __version__
from resta_fast.errors import RestaError
from resta_fast.io.checkpoint import INDEX_NAME, Checkpoint
from resta_fast.io.lock import OutputLock, clean_stale_temps
from resta_fast.io.writer import AtomicOutputDir, _write_error, check_output_location
from resta_fast.kernels import choose_backend
from resta_fast.kernels.reference import store
from resta_fast.lora import LoraFinetuned, is_adapter
from resta_fast.pipeline.cpu import DEFAULT_CHUNK_ELEMS, Inputs, run_plan
from resta_fast.pipeline.interrupt import raise_if_interrupted, tensor_boundary_signals
from resta_fast.pipeline.stream import sha256_file
from resta_fast.plan import BetaRule, Plan, build_plan, parse_dtype

REPORT_NAME = "resta_fast.json"
# Present in an output that was written but failed --validate-prompts' gate.
VALIDATION_FAILED = "VALIDATION_FAILED"
MAX_SEED = 2**64 - 1


def _check_params(beta: float, dare: float | None, seed: int) -> None:
    if not math.isfinite(beta):
        raise RestaError(f"--beta must be a finite number, got {beta}")
    if dare is not None and not 0.0 <= dare < 1.0:
        raise RestaError(f"--dare must be a drop probability in [0, 1), got {dare}")
    if not 0 <= seed <= MAX_SEED:
        raise RestaError(f"--seed must be an integer in [0, 2**64), got {seed}")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise RestaError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RestaError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return device


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not enabled, dynamic_ncols=True, leave=False)
    count = [0]

    def update(nbytes: int, name: str) -> None:
        count[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{count[0]} tensors", refresh=False)
        raise_if_interrupted()  # every pipeline reports each finished tensor here
    return bar, update


@contextmanager
def _output_guard(out: Path, input_paths: list[Path], overwrite: bool, command: str):
    """Own ``out`` for one run: lock it, re-check it, clear dead runs' leftovers.

    Also defers Ctrl-C to tensor boundaries, and turns an OSError from the
    body (disk full while copying side files or writing the report) into
    one clean RestaError after the temp output has been removed.
    """
    # Signals first: a Ctrl-C while the lock is being taken must not leave its file behind.
    with tensor_boundary_signals(), OutputLock(out, command=command):
        check_output_location(out, input_paths, overwrite)  # again: the lock makes it authoritative
        clean_stale_temps(out)
        try:
            yield
        except OSError as exc:
            # filename2 is the destination when shutil.copyfile fails.
            raise _write_error(Path(exc.filename2 or exc.filename or out), exc) from None


def _execute(plan: Plan, inputs: Inputs, out: Path, *, kernel, backend_name: str, device: str,
             beta: float, dare: float | None, seed: int, provenance: dict, threads: int | None,
             overwrite: bool, fsync: bool, progress: bool, chunk_elems: int,
             input_paths: list[Path], gpu_pool_bytes: int | None = None,
             validate=None, device_cache=None) -> dict:
    """Run a plan into an atomic output directory and write its report.

    ``validate`` (optional callable(model_dir) -> {"passed", ...}) evaluates the
    finished output before it is renamed into place; the verdict is recorded in
    the report, and a failed output is kept but marked (VALIDATION_FAILED).
    """
    check_output_location(out, input_paths, overwrite)
    metadata = output_metadata(provenance)
    total = sum(t.numel * _itemsize(t.out_dtype) for t in plan.tensors())
    bar, update = _progress_bar(total, progress, f"resta-fast -> {out.name}")
    with _output_guard(out, input_paths, overwrite, provenance.get("command", "patch")), \
            AtomicOutputDir(out, overwrite=overwrite, fsync=fsync) as outdir, bar:
        if device.startswith("cuda"):
            from resta_fast.pipeline.gpu import DEFAULT_POOL_BYTES, run_plan_gpu
            stats = run_plan_gpu(plan, inputs, outdir.tmp, kernel=kernel, beta=beta, dare=dare,
                                 seed=seed, metadata=metadata, device=device, progress=update,
                                 pool_bytes=gpu_pool_bytes or DEFAULT_POOL_BYTES, cache=device_cache)
        else:
            stats = run_plan(plan, inputs, outdir.tmp, kernel=kernel, beta=beta, dare=dare, seed=seed,
                             metadata=metadata, threads=threads, chunk_elems=chunk_elems,
                             progress=update)
        report = finish_output(outdir.tmp, plan, inputs.finetuned, stats, provenance,
                               backend_name=backend_name, device=device, fsync=fsync)
        if validate is not None:
            record_validation(outdir.tmp, report, validate(outdir.tmp))
        raise_if_interrupted()  # Ctrl-C after the last tensor: still no output
        outdir.commit()
    report["out"] = str(out)
    return report


def output_metadata(provenance: dict) -> dict[str, str]:
    """The safetensors ``__metadata__`` of every output weight file."""
    return {"format": "pt", "resta_fast": json.dumps(provenance, sort_keys=True)}


def finish_output(tmp: Path, plan: Plan, ft: Checkpoint, stats, provenance: dict, *, backend_name: str,
                  device: str, fsync: bool, extra: dict | None = None) -> dict:
    """Complete an output directory whose weight files are written: index, the
    fine-tune's side files, and ``resta_fast.json`` (with every file's sha256).

    Returns the report dict (``extra`` keys are added to it).
    """
    files = dict(stats.sha256)
    if ft.is_dir and (ft.root / INDEX_NAME).is_file():
        files[INDEX_NAME] = _write_index(tmp, plan)
    for side in ft.side_files():
        shutil.copyfile(side, tmp / side.name)
        files[side.name] = sha256_file(tmp / side.name)
    report = {
        **provenance,
        # Only here, not in the weight files: same inputs -> byte-identical weights.
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": backend_name, "device": device, "fsync": fsync,
        "plan": plan.to_json(),
        "stats": {"seconds": round(stats.seconds, 3), "bytes_read": stats.bytes_read,
                  "bytes_written": stats.bytes_written,
                  # where the time went, per pipeline stage (overlapping; see pipeline/stream.py)
                  "busy_seconds": {k: round(v, 6) for k, v in sorted(getattr(stats, "busy", {}).items())},
                  "nonfinite_outputs": stats.nonfinite},
        "files": files,
        **(extra or {}),
    }
    if stats.nonfinite:
        plan.notes.append(f"{sum(stats.nonfinite.values())} non-finite output value(s) in "
                          f"{len(stats.nonfinite)} tensor(s) (non-finite inputs or overflow), e.g. "
                          f"{next(iter(stats.nonfinite))}; see stats.nonfinite_outputs")
        report["plan"]["notes"] = plan.notes
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _itemsize(dtype_name: str) -> int:
    from resta_fast.io.reader import DTYPES
    return DTYPES[dtype_name][1]


def _write_index(tmp: Path, plan: Plan) -> str:
    weight_map = {t.name: f.name for f in plan.files for t in f.tensors}
    total = sum(t.numel * _itemsize(t.out_dtype) for t in plan.tensors())
    text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    (tmp / INDEX_NAME).write_text(text)
    return sha256_file(tmp / INDEX_NAME)


def _open(stack: ExitStack, path, role: str) -> Checkpoint | None:
    if path is None:
        return None
    ck = Checkpoint(path, role=role)
    stack.callback(ck.close)
    return ck


def patch_params(beta: float, dare: float | None, seed: int, include, exclude, rules: list[BetaRule],
                 out_dtype: str | None) -> dict:
    """The ``params`` of a patch's provenance (batch uses it too: same params,
    same header metadata, identical files)."""
    return {"beta": beta, "dare": dare, "seed": seed, "include": list(include),
            "exclude": list(exclude), "beta_rules": [f"{r.pattern}={r.beta}" for r in rules],
            "dtype": out_dtype}


def _provenance(command: str, params: dict, inputs: dict[str, Checkpoint | None]) -> dict:
    return {
        "tool": "resta_fast", "version": __version__, "command": command,
        "params": params,
        "inputs": {role: {"path": str(ck.path), "files": ck.fingerprint()}
                   for role, ck in inputs.items() if ck is not None},
    }


def patch(finetuned, out, *, aligned=None, unaligned=None, vector=None, beta: float = 1.0,
          dare: float | None = None, seed: int = 0, dare_base=None, include=(), exclude=(),
          beta_rules=(), dtype: str | None = None, backend: str = "auto", device: str = "cpu",
          threads: int | None = None, overwrite: bool = False, fsync: bool = True,
          dry_run: bool = False, progress: bool = False,
          chunk_elems: int = DEFAULT_CHUNK_ELEMS, gpu_pool_bytes: int | None = None,
          base=None, validate: dict | None = None, device_cache=None) -> dict:
    """Realign ``finetuned`` with RESTA and write the result to ``out``.

    Args:
        finetuned: fine-tuned model (HF directory or .safetensors file), or a
            PEFT LoRA adapter directory, merged in fp32 into ``base`` in-stream.
        base: the model a LoRA adapter was trained on (default: aligned); the
            output takes its layout and dtypes, and it is DARE's default base.
        out: output directory (created atomically; must not exist unless overwrite).
        aligned, unaligned: the pair defining V = aligned − unaligned; or
        vector: a precomputed V checkpoint (``make_vector``).
        beta: scale of V; beta_rules: ``["REGEX=0.3", ...]`` or BetaRule list.
        dare: DARE drop probability p (None: no DARE); seed: DARE seed;
        dare_base: DARE base (default: aligned).
        include/exclude: regexes over tensor names.
        dtype: output dtype (``bfloat16``/``float16``/``float32``; default fine-tune's).
        backend: auto | cpp | triton | torch; device: cpu | cuda[:N] | auto.
        fsync: make the output durable before the final rename.
        dry_run: only build and return the plan.
        gpu_pool_bytes: pinned host (and device) staging memory for --device cuda.
        validate: keyword arguments for ``resta_fast.eval.validate_checkpoint``
            (``prompts``, ``max_harmful``, ``utility``, ``max_utility_drop`` ...):
            evaluate the output (the fine-tune is the utility reference) and
            record the verdict in ``report["validation"]``.
        device_cache: a ``pipeline.gpu.DeviceCache`` shared across calls (batch
            mode) so shared inputs stay in GPU memory between fine-tunes.
    Returns:
        The report dict (also written to ``out/resta_fast.json``).

    Example:
        >>> patch("ft", "restored", aligned="chat", unaligned="shadow", beta=0.5)  # doctest: +SKIP
    """
    _check_params(beta, dare, seed)
    rules = [r if isinstance(r, BetaRule) else BetaRule.parse(r) for r in beta_rules]
    out_dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if vector is not None and unaligned is not None:
        raise RestaError("give either --aligned and --unaligned, or --vector (not both)")
    lora = is_adapter(finetuned)
    if base is not None and not lora:
        raise RestaError(f"--base is only for LoRA adapters, and {finetuned} has no adapter_config.json; "
                         "drop --base for a full fine-tune")
    if lora and base is None:
        if aligned is None:
            raise RestaError(f"{finetuned} is a LoRA adapter: pass --base, the model it was trained on "
                             "(with --vector there is no --aligned to default to)")
        base = aligned
    if dare is not None and dare_base is None:
        if aligned is None and base is None:
            raise RestaError("--dare needs the model the fine-tune started from: pass --dare-base "
                             "(or --aligned)")
        dare_base = base if lora else aligned
    with ExitStack() as stack:
        al = _open(stack, aligned, "aligned")
        lora_base = None
        if lora:
            # Merged LoRA tensors read the base; sharing the aligned model's mmap when they are one.
            lora_base = al if _same(base, aligned) else _open(stack, base, "base")
            ft = LoraFinetuned(finetuned, lora_base)
            stack.callback(ft.close)
        else:
            ft = _open(stack, finetuned, "finetuned")
        un = _open(stack, unaligned, "unaligned")
        vec = _open(stack, vector, "vector")
        base_path = base
        base = al if (dare_base is not None and aligned is not None
                      and Path(dare_base).resolve() == Path(aligned).resolve()) \
            else lora_base if lora and _same(dare_base, base_path) \
            else _open(stack, dare_base, "dare base")
        plan = build_plan(ft, aligned=al if vec is None else None, unaligned=un, vector=vec,
                          dare_base=base if dare is not None else None, beta=beta, include=include,
                          exclude=exclude, beta_rules=rules, dtype=out_dtype)
        if lora:
            plan.notes.insert(0, ft.summary())
        if dry_run:
            return {"dry_run": True, "plan": plan.to_json(), "plan_text": plan.format_table()}
        backend_name, kernel = choose_backend(backend, device)
        if device.startswith("cuda") and backend_name != "triton":
            raise RestaError(f"--device {device} runs the triton backend; --backend {backend_name} "
                             "is CPU-only (use --backend triton or auto, or --device cpu)")
        params = patch_params(beta, dare, seed, include, exclude, rules, out_dtype)
        roles = {"finetuned": ft, "aligned": al, "unaligned": un, "vector": vec,
                 "dare_base": base if dare is not None else None, "base": lora_base}
        inputs = Inputs(ft, al, un, vec, base if dare is not None else None)
        return _execute(plan, inputs, Path(out), kernel=kernel, backend_name=backend_name,
                        device=device, beta=beta, dare=dare, seed=seed,
                        provenance=_provenance("patch", params, roles), threads=threads,
                        overwrite=overwrite, fsync=fsync, progress=progress, chunk_elems=chunk_elems,
                        gpu_pool_bytes=gpu_pool_bytes,
                        validate=validator(validate, None if lora else finetuned), device_cache=device_cache,
                        input_paths=[Path(p) for p in (finetuned, aligned, unaligned, vector, dare_base,
                                                       base_path if lora else None) if p is not None])


def record_validation(tmp: Path, report: dict, verdict: dict) -> None:
    """Put the eval gate's verdict into the (not yet committed) output's report;
    a failed output is kept but marked with a VALIDATION_FAILED file."""
    report["validation"] = verdict
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not verdict.get("passed", False):
        (tmp / VALIDATION_FAILED).write_text(verdict.get("reason", "") + "\n")


def validator(options: dict | None, reference):
    """A callable(model_dir) running the eval gate, or None."""
    if not options:
        return None
    from resta_fast.eval import validate_checkpoint
    options = dict(options)
    options.setdefault("reference", reference)
    if options.get("max_utility_drop") is not None and not (options.get("utility") or options.get("perplexity")):
        raise RestaError("--max-utility-drop needs --validate-utility or --validate-perplexity")
    return lambda model_dir: validate_checkpoint(model_dir, **options)


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


class _DifferenceKernel:
    """Kernel adapter for make_vector: out = round(fp32(A) − fp32(U)), F unused."""

    @staticmethod
    def patch_into(out, f, a, u=None, b=None, **_):
        store(out, a.float() - u.float())

    @staticmethod
    def convert_into(out, x):
        raise AssertionError("make_vector copies no tensors")


def make_vector(aligned, unaligned, out, *, dtype: str = "float32", include=(), exclude=(),
                overwrite: bool = False, fsync: bool = True, progress: bool = False) -> dict:
    """Write the safety vector V = aligned − unaligned as a checkpoint.

    fp32 (the default) makes patching with V bit-identical to patching with the
    pair. Tensors that cannot be differenced (non-float, missing) are left out.

    Example:
        >>> make_vector("chat", "shadow", "safety_vector")  # doctest: +SKIP
    """
    out_dtype = parse_dtype(dtype)
    with ExitStack() as stack:
        al = _open(stack, aligned, "aligned")
        un = _open(stack, unaligned, "unaligned")
        plan = build_plan(al, aligned=al, unaligned=un, include=include, exclude=exclude,
                          dtype=out_dtype)
        dropped = [t.name for t in plan.tensors() if t.action != "patch"]
        for f in plan.files:
            f.tensors = [t for t in f.tensors if t.action == "patch"]
            for t in f.tensors:
                t.out_dtype, t.beta, t.reason = out_dtype, 1.0, "aligned − unaligned"
        plan.files = [f for f in plan.files if f.tensors]
        if dropped:
            plan.notes.append(f"{len(dropped)} tensor(s) not in the vector (non-float or missing), "
                              f"e.g. {dropped[0]}")
        params = {"dtype": out_dtype, "include": list(include), "exclude": list(exclude)}
        return _execute(plan, Inputs(al, al, un), Path(out), kernel=_DifferenceKernel,
                        backend_name="torch", device="cpu", beta=1.0, dare=None, seed=0,
                        provenance=_provenance("vector", params, {"aligned": al, "unaligned": un}),
                        threads=None, overwrite=overwrite, fsync=fsync, progress=progress,
                        chunk_elems=DEFAULT_CHUNK_ELEMS,
                        input_paths=[Path(aligned), Path(unaligned)])
