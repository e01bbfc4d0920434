"""An output against its own report, without its inputs: the report, the digests, the headers.

``read_report`` loads ``resta_fast.json``; ``check_validation`` turns a recorded
safety verdict into a check; ``check_hashes`` re-hashes every recorded file;
``check_headers`` re-reads every safetensors header with our reader (metadata
format "pt", provenance equal to the report's, tensors laid out as the recorded
plan says). Nothing here imports torch or recomputes a value.

Example:
    >>> c = Check("sha256")
    >>> c.fail("model.safetensors: recorded but missing")
    >>> c.ok, c.problems
    (False, ['model.safetensors: recorded but missing'])
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.errors import CheckpointError
from resta_fast.io.checkpoint import INDEX_NAME, Checkpoint
from resta_fast.io.digest import sha256_file
from resta_fast.report import REPORT_NAME


@dataclass
class Check:
    """One line of the verdict: a named check, its summary, and what failed."""

    name: str
    ok: bool = True
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


def read_report(out: Path) -> tuple[Check, dict | None]:
    """The ``report`` check and ``out``'s resta_fast.json (None when it is missing or unreadable)."""
    c = Check("report")
    report = None
    try:
        loaded = json.loads((out / REPORT_NAME).read_text())
        if not isinstance(loaded, dict):  # `[]` is JSON too: fail the check, and check nothing else against it
            raise ValueError("not a JSON object")
        report = loaded
        c.detail = f"{REPORT_NAME}: {report.get('tool')} {report.get('version')}, command {report.get('command')}"
    except FileNotFoundError:
        c.fail(f"{out / REPORT_NAME} is missing: this is not a finished resta-fast output")
    except (ValueError, OSError, RecursionError) as exc:
        c.fail(f"{out / REPORT_NAME} is unreadable ({exc})")
    return c, report


def check_validation(report: dict) -> Check | None:
    """The safety verdict ``patch --validate-prompts`` recorded; None when there is none."""
    validation = report.get("validation")
    if not isinstance(validation, dict):
        return None
    c = Check("validation", detail="the recorded safety validation passed")
    if not validation.get("passed", False):
        c.fail(
            f"patch --validate-prompts marked this output as failed: {validation.get('reason') or 'no reason recorded'}"
        )
        c.detail = "the recorded safety validation failed"
    return c


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and "\x00" not in name


def check_hashes(out: Path, report: dict) -> Check:
    """Every recorded file exists and has its recorded sha256; no unrecorded weights."""
    c = Check("sha256")
    files = report.get("files")
    if not isinstance(files, dict) or not files:
        c.fail(f"{REPORT_NAME} records no files")
        return c
    present = {}
    for name, digest in sorted(files.items()):
        if not _plain_name(name):
            c.fail(f"{name!r}: not a plain file name; {REPORT_NAME} was tampered with")
        elif not (out / name).is_file():
            c.fail(f"{name}: recorded but missing")
        else:
            present[name] = digest
    # hashlib releases the GIL on large updates: shards hash in parallel.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        found = dict(zip(present, pool.map(lambda n: sha256_file(out / n), present), strict=True))
    for name, digest in present.items():
        if found[name] != digest:
            c.fail(f"{name}: sha256 {found[name][:16]}... but {REPORT_NAME} records {str(digest)[:16]}...")
    extra = sorted(
        p.name
        for p in out.iterdir()
        if p.name != REPORT_NAME and p.name not in files and (p.name.endswith(".safetensors") or p.name == INDEX_NAME)
    )
    for name in extra:
        c.fail(f"{name}: weight file not recorded in {REPORT_NAME}; loaders would read it")
    c.detail = f"{len(files)} files match {REPORT_NAME}" if c.ok else f"{len(c.problems)} problem(s)"
    return c


def recorded_plan(report: dict) -> dict[str, list[dict]]:
    """file name -> the plan rows (``TensorPlan`` as JSON) the report records for it.

    Example:
        >>> recorded_plan({"plan": {"files": [{"name": "model.safetensors", "tensors": []}]}})
        {'model.safetensors': []}
    """
    plan = report.get("plan") or {}
    return {f["name"]: f["tensors"] for f in plan.get("files", [])}


def check_headers(out: Path, report: dict) -> tuple[Check, Checkpoint | None]:
    """Open the output with our reader and compare it with the recorded plan."""
    c = Check("headers")
    try:
        ckpt = Checkpoint(out, role="output")
    except CheckpointError as exc:
        c.fail(str(exc))
        return c, None
    recorded = recorded_plan(report)
    provenance_keys = ("tool", "version", "command", "params", "inputs")
    want_prov = {k: report.get(k) for k in provenance_keys}
    if sorted(ckpt.files) != sorted(recorded):
        c.fail(f"weight files {sorted(ckpt.files)} but the recorded plan has {sorted(recorded)}")
    for fname, f in ckpt.files.items():
        if f.metadata.get("format") != "pt":
            c.fail(f"{fname}: metadata format is {f.metadata.get('format')!r}, expected 'pt'")
        try:
            prov = json.loads(f.metadata.get("resta_fast", "null"))
        except ValueError:
            prov = None
        if not isinstance(prov, dict) or {k: prov.get(k) for k in provenance_keys} != want_prov:
            c.fail(f"{fname}: provenance in the header differs from {REPORT_NAME}")
        tensors = recorded.get(fname)
        if tensors is None:
            continue
        got = [(i.name, list(i.shape), i.dtype) for i in f.tensors.values()]
        want = [(t["name"], list(t["shape"]), t["out_dtype"]) for t in tensors]
        if got != want:
            diff = next(
                ((g, w) for g, w in zip(got, want, strict=False) if g != w), (got[len(want) :], want[len(got) :])
            )
            c.fail(
                f"{fname}: tensors differ from the recorded plan (first difference: "
                f"file has {diff[0]}, plan says {diff[1]})"
            )
    c.detail = (
        f"{len(ckpt.files)} safetensors file(s) valid, format=pt, laid out as recorded"
        if c.ok
        else f"{len(c.problems)} problem(s)"
    )
    return c, ckpt
