"""``resta-fast convert IN OUT``: a torch ``.bin`` checkpoint or PEFT adapter rewritten as safetensors.

A model is opened like any input (``io.checkpoint.Checkpoint`` reads ``.bin`` files with
``io.torch_bin``, pickle-free) and handed to the one executor (``executor``) with a plan that copies
every tensor (``plan.copy_plan``), so it gets what a patch gets: bounded memory, the output lock, the atomic
output directory, the fine-tune's config and tokenizer files, the model card and
``resta_fast.json``, which ``resta-fast verify OUT`` checks. Shards keep their layout under
transformers' safetensors names (``pytorch_model-00001-of-00002.bin`` ->
``model-00001-of-00002.safetensors``). An adapter directory (``adapter_model.bin``) is written
as ``adapter_model.safetensors`` by the adapter writer Safe LoRA uses (``executor.AdapterWrite``).

Nothing here converts what ``io.torch_bin`` refuses (the legacy format, compressed entries,
non-contiguous views): those need torch itself, see docs/bin-inputs.md.

Example:
    >>> report = convert("llama-ft-bin/", "llama-ft/")  # doctest: +SKIP
    >>> report["plan"]["summary"]["copy"]  # doctest: +SKIP
    291
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from resta_fast.api import Opener
from resta_fast.errors import RestaError
from resta_fast.executor import AdapterWrite, EngineWrite, Output, write_one
from resta_fast.io.torch_bin import TorchBinFile
from resta_fast.kernels import choose_backend
from resta_fast.lora import LoraAdapter, is_adapter
from resta_fast.pipeline.job import Inputs
from resta_fast.plan import copy_plan
from resta_fast.report import provenance, with_paths

COMMAND = "convert"


def convert(
    src,
    out,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    progress: bool = False,
    command_line: str | None = None,
    record_paths: bool = False,
) -> dict:
    """Write ``src`` (a ``.bin`` model directory or file, or an adapter directory) as safetensors into ``out``.

    Args:
        src: a model directory with ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` and its
            shards, a single ``.bin``/``.pt`` file, or a PEFT adapter directory with ``adapter_model.bin``.
        out: the output directory; refused when it exists, unless ``overwrite``.
        fsync: make the output durable before its final rename.
        command_line: the command as typed, for the model card.
        record_paths: record the input's local path in ``resta_fast.json`` (``api.execute``).
    Returns:
        The report, also written to ``out/resta_fast.json``.
    """
    src, out = Path(src), Path(out)
    if is_adapter(src):
        return _convert_adapter(
            src, out, overwrite=overwrite, fsync=fsync, command_line=command_line, record_paths=record_paths
        )
    return _convert_model(
        src,
        out,
        overwrite=overwrite,
        fsync=fsync,
        progress=progress,
        command_line=command_line,
        record_paths=record_paths,
    )


def _already(src: Path) -> RestaError:
    return RestaError(f"convert {src}: is safetensors already; nothing to convert (every command reads it as it is)")


def _convert_model(
    src: Path, out: Path, *, overwrite: bool, fsync: bool, progress: bool, command_line, record_paths: bool
) -> dict:
    with ExitStack() as stack:
        ck = Opener(stack)(src, "input")
        if not any(isinstance(f, TorchBinFile) for f in ck.files.values()):
            raise _already(src)
        checkpoints = {"input": ck}
        backend_name, kernel = choose_backend("auto", "cpu")  # a copy plan never calls it; the engine wants one
        prov = provenance(COMMAND, {}, checkpoints)
        output = Output(
            out,
            EngineWrite(copy_plan(ck), Inputs(ck), kernel, backend_name, "cpu"),
            with_paths(prov, checkpoints) if record_paths else prov,
            [src],
            command=COMMAND,
            overwrite=overwrite,
            extra={"output": "converted"},
            command_line=command_line,
            bar=f"resta-fast -> {out.name}" if progress else None,
        )
        return write_one(output, fsync=fsync)


def _convert_adapter(src: Path, out: Path, *, overwrite: bool, fsync: bool, command_line, record_paths: bool) -> dict:
    adapter = LoraAdapter(src)
    try:
        if not isinstance(adapter.file, TorchBinFile):
            raise _already(src)
        prov = provenance(COMMAND, {}, {"adapter": adapter})
        prov = with_paths(prov, {"adapter": adapter}) if record_paths else prov
    finally:
        adapter.close()
    output = Output(
        out,
        AdapterWrite(src),
        prov,
        [src],
        command=COMMAND,
        overwrite=overwrite,
        extra={"output": "adapter"},
        command_line=command_line,
    )
    return write_one(output, fsync=fsync)
