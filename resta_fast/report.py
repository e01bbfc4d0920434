"""What an output directory says about itself: provenance, header metadata and ``resta_fast.json``.

``provenance`` is recorded both in every weight file's safetensors metadata
(so the same inputs and options give byte-identical weights) and in the report,
which adds the timestamp, the plan, the run's statistics, every file's sha256
and, when validated, the gate's verdict.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from resta_fast import __version__
from resta_fast.io.digest import sha256_file

if TYPE_CHECKING:
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.plan import Plan

REPORT_NAME = "resta_fast.json"
# Present in an output that was written but failed its validation gate.
VALIDATION_FAILED = "VALIDATION_FAILED"


def provenance(command: str, params: dict, inputs: dict[str, Checkpoint | None], hub: dict | None = None) -> dict:
    """Tool, version, command, parameters and every input's fingerprint, by role.

    ``hub`` (role -> ``io.hub.ResolvedInput``): inputs that came from the
    Hugging Face Hub also record ``hub: {repo_id, revision, commit}``; a
    local input's entry is its path and fingerprints only, as before.
    """
    hub = hub or {}

    def entry(role: str, ck: Checkpoint) -> dict:
        e = {"path": str(ck.path), "files": ck.fingerprint()}
        if role in hub:
            e["hub"] = hub[role].provenance()
        return e

    return {
        "tool": "resta_fast",
        "version": __version__,
        "command": command,
        "params": params,
        "inputs": {role: entry(role, ck) for role, ck in inputs.items() if ck is not None},
    }


def output_metadata(provenance: dict) -> dict[str, str]:
    """The safetensors ``__metadata__`` of every output weight file."""
    return {"format": "pt", "resta_fast": json.dumps(provenance, sort_keys=True)}


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
    from resta_fast.card import CARD_NAME, write_model_card
    from resta_fast.io.checkpoint import INDEX_NAME

    files = dict(stats.sha256)
    if ft.is_dir and (ft.root / INDEX_NAME).is_file():
        files[INDEX_NAME] = _write_index(tmp, plan, INDEX_NAME)
    for side in ft.side_files():
        shutil.copyfile(side, tmp / side.name)
        files[side.name] = sha256_file(tmp / side.name)
    report = {
        **provenance,
        # Only here, not in the weight files: same inputs -> byte-identical weights.
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
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
    if stats.nonfinite:
        plan.notes.append(
            f"{sum(stats.nonfinite.values())} non-finite output value(s) in "
            f"{len(stats.nonfinite)} tensor(s) (non-finite inputs or overflow), e.g. "
            f"{next(iter(stats.nonfinite))}; see stats.nonfinite_outputs"
        )
        report["plan"]["notes"] = plan.notes
    # The card before the report: the report lists the card's sha256, the card points at the report.
    files[CARD_NAME] = write_model_card(tmp, report, command_line=command_line)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def record_validation(tmp: Path, report: dict, verdict: dict, *, command_line: str | None = None) -> None:
    """Put the eval gate's verdict into the (not yet committed) output's report
    and its model card (``command_line`` as given to ``finish_output``); a
    failed output is kept but marked with a VALIDATION_FAILED file."""
    from resta_fast.card import CARD_NAME, write_model_card

    report["validation"] = verdict
    files = report.get("files")
    if isinstance(files, dict) and CARD_NAME in files:
        files[CARD_NAME] = write_model_card(tmp, report, command_line=command_line)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not verdict.get("passed", False):
        (tmp / VALIDATION_FAILED).write_text(verdict.get("reason", "") + "\n")
