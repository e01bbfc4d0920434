"""What an output directory says about itself: provenance, header metadata and ``resta_fast.json``.

``provenance`` is recorded both in every weight file's safetensors metadata
(its ``HEADER_KEYS``: the same input bytes and options give byte-identical
weights on any machine) and in the report, which adds where the inputs came
from (``sources``), the timestamp, the plan, the run's statistics, every file's
sha256 and, when validated, the gate's verdict. No file of an output holds a
local path, a user or host name or a file time unless ``with_paths`` was asked for.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING

from resta_fast import __version__
from resta_fast.io.digest import sha256_file
from resta_fast.io.identity import origin
from resta_fast.io.public import copy_public, public_verdict

if TYPE_CHECKING:
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.plan import Plan

REPORT_NAME = "resta_fast.json"
# Present in an output that was written but failed its validation gate.
VALIDATION_FAILED = "VALIDATION_FAILED"


# What every weight file's header records: content only, so equal inputs give equal bytes anywhere.
HEADER_KEYS = ("tool", "version", "command", "params", "inputs")


def provenance(command: str, params: dict, inputs: dict[str, Checkpoint | None], hub: dict | None = None) -> dict:
    """Tool, version, command, parameters and every input's identity, by role; and where each came from.

    ``inputs[role]`` is ``{"files": <io.identity of its content>}``: the same
    bytes anywhere give the same record. ``sources[role]`` (``io.identity.origin``)
    says where it came from: its directory's name, and ``hub: {repo_id, revision,
    commit}`` for an input from the Hugging Face Hub (``hub``: role ->
    ``io.hub.ResolvedInput``). Only the ``HEADER_KEYS`` go into the weight files;
    ``sources`` is in ``resta_fast.json`` and the card.
    """
    hub = hub or {}
    present = {role: ck for role, ck in inputs.items() if ck is not None}
    return {
        "tool": "resta_fast",
        "version": __version__,
        "command": command,
        "params": params,
        "inputs": {role: {"files": ck.fingerprint()} for role, ck in present.items()},
        "sources": {role: origin(ck.path, hub.get(role)) for role, ck in present.items()},
    }


def with_paths(provenance: dict, inputs: dict[str, Checkpoint | None]) -> dict:
    """``provenance`` whose ``sources`` also hold each input's absolute local path (``--record-paths``).

    Example:
        >>> with_paths({"sources": {"aligned": {"name": "chat"}}}, {"aligned": None})["sources"]
        {'aligned': {'name': 'chat'}}
    """
    sources = {role: dict(entry) for role, entry in (provenance.get("sources") or {}).items()}
    for role, ck in inputs.items():
        if ck is not None and role in sources:
            sources[role]["path"] = str(Path(ck.path).absolute())
    return {**provenance, "sources": sources}


def output_metadata(provenance: dict) -> dict[str, str]:
    """The safetensors ``__metadata__`` of every output weight file (the ``HEADER_KEYS`` of ``provenance``)."""
    header = {k: provenance[k] for k in HEADER_KEYS if k in provenance}
    return {"format": "pt", "resta_fast": json.dumps(header, sort_keys=True)}


def _itemsize(dtype_name: str) -> int:
    from resta_fast.io.reader import DTYPES

    return DTYPES[dtype_name][1]


def output_bytes(plan: Plan) -> int:
    """Bytes of tensor data the plan writes."""
    return sum(t.numel * _itemsize(t.out_dtype) for t in plan.tensors())


def _write_index(tmp: Path, plan: Plan, index_name: str) -> str:
    weight_map = {t.name: f.name for f in plan.files for t in f.tensors}
    text = json.dumps({"metadata": {"total_size": output_bytes(plan)}, "weight_map": weight_map}, indent=2) + "\n"
    (tmp / index_name).write_text(text)
    return sha256_file(tmp / index_name)


def finish_output(
    tmp: Path,
    plan: Plan,
    ft: Checkpoint,
    stats,
    provenance: dict,
    *,
    backend_name: str,
    device: str,
    fsync: bool,
    extra: dict | None = None,
    command_line: str | None = None,
) -> dict:
    """Complete an output directory whose weight files are written: index, the
    fine-tune's side files, the model card (``README.md``, ``card.write_model_card``)
    and ``resta_fast.json`` (with every file's sha256, the card's included).

    ``command_line``: the command as typed, for the card's "how to reproduce"
    (None: the card shows an equivalent command rebuilt from the report).
    Returns the report dict (``extra`` keys are added to it).
    """
    from resta_fast.io.checkpoint import INDEX_NAME
    from resta_fast.io.torch_bin import INDEX_NAME as BIN_INDEX_NAME

    files = dict(stats.sha256)
    # A sharded input, safetensors or .bin (its index names .bin shards): the output's index names its own.
    if ft.is_dir and ((ft.root / INDEX_NAME).is_file() or (ft.root / BIN_INDEX_NAME).is_file()):
        files[INDEX_NAME] = _write_index(tmp, plan, INDEX_NAME)
    for side in ft.side_files():
        copy_public(side, tmp / side.name)
        files[side.name] = sha256_file(tmp / side.name)
    body = {
        "backend": backend_name,
        "device": device,
        "fsync": fsync,
        "plan": plan.to_json(),
        "stats": {
            "seconds": round(stats.seconds, 3),
            "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written,
            # where the time went, per pipeline stage (overlapping; see pipeline/)
            "busy_seconds": {k: round(v, 6) for k, v in sorted(getattr(stats, "busy", {}).items())},
            "nonfinite_outputs": stats.nonfinite,
        },
        "files": files,
        **(extra or {}),
    }
    report = new_report(provenance, body)
    if stats.nonfinite:
        plan.notes.append(
            f"{sum(stats.nonfinite.values())} non-finite output value(s) in "
            f"{len(stats.nonfinite)} tensor(s) (non-finite inputs or overflow), e.g. "
            f"{next(iter(stats.nonfinite))}; see stats.nonfinite_outputs"
        )
        report["plan"]["notes"] = plan.notes
    write_report(tmp, report, command_line=command_line)
    return report


def finish_adapter_output(
    tmp: Path,
    files: dict[str, str],
    provenance: dict,
    *,
    fsync: bool,
    extra: dict | None = None,
    command_line: str | None = None,
) -> dict:
    """Complete an adapter output whose files are written (``io.adapter_writer``): its model card and
    ``resta_fast.json``; ``files`` ({name: sha256}) gets the card's. Returns the report dict."""
    report = new_report(provenance, {"output": "adapter", "fsync": fsync, **(extra or {}), "files": files})
    write_report(tmp, report, command_line=command_line)
    return report


def _now() -> str:
    """The time an output is made, UTC to the second: the one clock any output reads."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_report(provenance: dict, body: dict) -> dict:
    """An output's report: ``provenance``, then ``created`` (stamped here and nowhere else: only the
    report records it, never the weight files, so the same inputs give byte-identical weights), then ``body``.

    Example:
        >>> sorted(new_report({"command": "patch"}, {"files": {}}))
        ['command', 'created', 'files']
    """
    return {**provenance, "created": _now(), **body}


def write_report(tmp: Path, report: dict, *, command_line: str | None = None) -> None:
    """The model card, then ``resta_fast.json``: the report lists the card's sha256 (in ``report["files"]``),
    the card points at the report. ``command_line``: the command as typed, for the card's "how to reproduce"."""
    from resta_fast.card import CARD_NAME, write_model_card

    report["files"][CARD_NAME] = write_model_card(tmp, report, command_line=command_line)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def record_validation(tmp: Path, report: dict, verdict: dict, *, command_line: str | None = None) -> None:
    """Put the eval gate's verdict into the (not yet committed) output's report
    and its model card (``command_line`` as given to ``finish_output``); a
    failed output is kept but marked with a VALIDATION_FAILED file."""
    from resta_fast.card import CARD_NAME, write_model_card

    verdict = public_verdict(verdict, tmp)
    report["validation"] = verdict
    files = report.get("files")
    if isinstance(files, dict) and CARD_NAME in files:
        files[CARD_NAME] = write_model_card(tmp, report, command_line=command_line)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not verdict.get("passed", False):
        (tmp / VALIDATION_FAILED).write_text(verdict.get("reason", "") + "\n")
