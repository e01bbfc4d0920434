"""The inputs an output was made from: their paths, opened as ``patch`` opened them, and their fingerprints.

Verify's own part is reading the record: ``input_paths`` maps ``--against``'s
positional paths (or, with none, what ``resta_fast.json`` records: a Hub input
pinned to its commit, a local path only when the output was written with
``--record-paths``) to the roles of the command that made the output, and gives
the inputs ``--against`` does not list (a LoRA base, a DARE base) the path the
record implies: an input whose recorded content identity equals the aligned
model's is the aligned model given. Inputs are compared by content
(``io.identity``), never by path or file time.
The rest is the one resolve step of every entry point (``resolve``, ``roles``):
``roles.resolve_roles`` for a patch's inputs and ``roles.vector_roles`` for a
vector's resolve Hub ids and decide the roles as ``patch`` and ``vector`` did,
and ``api.open_roles`` opens them through ``api.Opener`` (an input playing two
roles is one object), exactly as ``patch`` did.

Example:
    >>> input_paths({"command": "vector", "inputs": {"aligned": {}, "unaligned": {}},
    ...              "sources": {"aligned": {"path": "chat"}, "unaligned": {"path": "shadow"}}}, [], None)
    {'aligned': 'chat', 'unaligned': 'shadow'}
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from resta_fast.errors import RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.identity import changed_files, same
from resta_fast.report import REPORT_NAME
from resta_fast.roles import resolve_roles, vector_roles
from resta_fast.verify.checks import Check


def recorded_paths(report: dict) -> dict[str, str | None]:
    """role -> the local path the output recorded (only with ``--record-paths``; an output written
    before paths left the record has one in ``inputs``), or its Hub id pinned to its commit
    (``hf://REPO@COMMIT``), or None.

    Example:
        >>> recorded_paths({"inputs": {"aligned": {}, "unaligned": {}},
        ...                 "sources": {"aligned": {"hub": {"repo_id": "org/chat", "commit": "c" * 40}},
        ...                             "unaligned": {"name": "shadow"}}})["unaligned"] is None
        True
    """
    inputs = report.get("inputs") if isinstance(report.get("inputs"), dict) else {}
    sources = report.get("sources") if isinstance(report.get("sources"), dict) else {}
    found = {}
    for role, info in inputs.items():
        src = sources.get(role) if isinstance(sources.get(role), dict) else {}
        old = info if isinstance(info, dict) else {}
        path = src.get("path") or old.get("path")
        hub = src.get("hub") or old.get("hub") or {}
        if path and os.path.lexists(path):
            found[role] = path
        elif hub.get("repo_id") and hub.get("commit"):
            found[role] = f"hf://{hub['repo_id']}@{hub['commit']}"
        else:
            found[role] = path
    return found


def _same_content(report: dict, role: str, other: str) -> bool:
    inputs = report.get("inputs") or {}
    a, b = (inputs.get(r) or {} for r in (role, other))
    return bool(a.get("files")) and same(a["files"], b.get("files"))


def _default_from(
    report: dict, role: str, paths: dict, recorded: dict, explicit: str | None, explicit_inputs: bool, flag: str
) -> str:
    """Path of an input that --against does not list (DARE base, LoRA base)."""
    if explicit:
        return explicit
    if _same_content(report, role, "aligned") and "aligned" in paths:
        return paths["aligned"]  # the default: the aligned model
    if recorded.get(role) and not explicit_inputs:
        return recorded[role]
    raise RestaError(
        f"verify --against: this output used a separate {role.replace('_', ' ')} model; pass it with {flag}"
    )


def input_paths(report: dict, against: list[str], dare_base: str | None, base: str | None = None) -> dict[str, str]:
    """role -> path (or Hub id) of the inputs to recompute from; ``open_inputs`` resolves them."""
    command = report.get("command")
    params = report.get("params") or {}
    recorded = recorded_paths(report)
    if command == "vector":
        roles = ["aligned", "unaligned"]
    elif command == "patch":
        mode = (report.get("plan") or {}).get("mode")
        roles = ["finetuned", "vector"] if mode == "vector" else ["finetuned", "aligned", "unaligned"]
    else:
        raise RestaError(
            f"verify --against: cannot recompute outputs of command {command!r} "
            "(only patch and vector); hashes and headers were still checked"
        )
    if against:
        if len(against) != len(roles):
            raise RestaError(
                f"verify --against: this output was made by `{command}` from "
                f"{', '.join(roles).upper()}; give those {len(roles)} paths in that order "
                f"(got {len(against)})"
            )
        paths = dict(zip(roles, against, strict=True))
    else:
        missing = [r for r in roles if not recorded.get(r)]
        if missing:
            raise RestaError(
                f"verify --against: {REPORT_NAME} records no path for {', '.join(missing)}; give the input paths "
                "explicitly (local paths are recorded only with --record-paths)"
            )
        paths = {r: recorded[r] for r in roles}
    if command == "patch" and "base" in recorded:  # a LoRA adapter merged into its base
        paths["base"] = _default_from(report, "base", paths, recorded, base, bool(against), "--base")
    if command == "patch" and params.get("dare") is not None:
        if not dare_base and "base" in paths and _same_content(report, "dare_base", "base"):
            paths["dare_base"] = paths["base"]
        else:
            paths["dare_base"] = _default_from(
                report, "dare_base", paths, recorded, dare_base, bool(against), "--dare-base"
            )
    return paths


def open_inputs(paths: dict[str, str], params: dict, command: str, stack: ExitStack) -> dict[str, Checkpoint]:
    """Open each role's input as ``patch`` did (``api.open_roles``: a DARE or LoRA
    base that is the aligned model is that same object); role -> Checkpoint."""
    from resta_fast import api

    opener = api.Opener(stack)
    if command == "vector":
        roles = vector_roles(paths["aligned"], paths["unaligned"])
        return {role: opener(getattr(roles, role), role) for role in ("aligned", "unaligned")}
    dare = params.get("dare") is not None
    roles = resolve_roles(
        paths["finetuned"],
        aligned=paths.get("aligned"),
        unaligned=paths.get("unaligned"),
        vector=paths.get("vector"),
        base=paths.get("base"),
        dare_base=paths.get("dare_base"),
        dare=dare,
    )
    cks, _ = api.open_roles(roles, opener, dare=dare)
    return {role: ck for role, ck in cks.items() if ck is not None}


def check_fingerprints(report: dict, cks: dict[str, Checkpoint]) -> Check:
    """The ``inputs`` check: every opened input has the files and headers the run read."""
    c = Check("inputs")
    for role, ck in cks.items():
        _input_fingerprints(report, role, ck, c)
    c.detail = f"fingerprints of {', '.join(cks)} match" if c.ok else f"{len(c.problems)} problem(s)"
    return c


def _input_fingerprints(report: dict, role: str, ck: Checkpoint, c: Check) -> None:
    recorded = ((report.get("inputs") or {}).get(role) or {}).get("files")
    if not isinstance(recorded, dict):
        c.fail(f"{role}: no fingerprint recorded in {REPORT_NAME}")
        return
    found = ck.fingerprint()
    if sorted(found) != sorted(recorded):
        c.fail(f"{role} {ck.path}: files {sorted(found)} but the run read {sorted(recorded)}")
        return
    # Content only (io.identity): a moved, copied or touched but identical input still verifies.
    for name in changed_files(recorded, found):
        c.fail(
            f"{role} {ck.path}: {name}: its content differs from the input the run read "
            "(size, header or sampled data); pass the input the output was made from"
        )
