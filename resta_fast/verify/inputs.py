"""The inputs an output was made from: their paths, opened as ``patch`` opened them, and their fingerprints.

Verify's own part is reading the record: ``input_paths`` maps ``--against``'s
positional paths (or, with none, the paths ``resta_fast.json`` records) to the
roles of the command that made the output, gives the inputs ``--against`` does
not list (a LoRA base, a DARE base) the path the record implies, and fetches a
recorded Hub input whose cache snapshot is gone again at its recorded commit.
The rest is the one preparation step of every entry point: for a patch,
``options.resolve_roles`` resolves Hub ids and decides the roles, and
``api.open_roles`` opens them through ``api.Opener`` (an input playing two roles
is one object), exactly as ``patch`` did.

Example:
    >>> input_paths({"command": "vector", "inputs": {"aligned": {"path": "chat"},
    ...                                             "unaligned": {"path": "shadow"}}}, [], None)
    {'aligned': 'chat', 'unaligned': 'shadow'}
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from resta_fast.errors import RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.hub import resolve_input
from resta_fast.options import ROLE_KINDS, resolve_roles
from resta_fast.report import REPORT_NAME
from resta_fast.verify.checks import Check


def _default_from(
    role: str, paths: dict, recorded: dict, explicit: str | None, explicit_inputs: bool, flag: str
) -> str:
    """Path of an input that --against does not list (DARE base, LoRA base)."""
    if explicit:
        return explicit
    if recorded.get(role) and recorded.get(role) == recorded.get("aligned") and "aligned" in paths:
        return paths["aligned"]  # the default: the aligned model
    if recorded.get(role) and not explicit_inputs:
        return recorded[role]
    raise RestaError(
        f"verify --against: this output used a separate {role.replace('_', ' ')} model; pass it with {flag}"
    )


def input_paths(report: dict, against: list[str], dare_base: str | None, base: str | None = None) -> dict[str, str]:
    """role -> path of the inputs to recompute from.

    Hub ids given for a patch's inputs are left to ``open_inputs`` (``resolve_roles``);
    a vector's two inputs have no roles to resolve, so their Hub ids are resolved here.
    """
    command = report.get("command")
    params = report.get("params") or {}
    recorded = {role: info.get("path") for role, info in (report.get("inputs") or {}).items()}
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
                f"verify --against: {REPORT_NAME} records no path for {', '.join(missing)}; "
                "give the input paths explicitly"
            )
        paths = {r: recorded[r] for r in roles}
    if command == "patch" and "base" in recorded:  # a LoRA adapter merged into its base
        paths["base"] = _default_from("base", paths, recorded, base, bool(against), "--base")
    if command == "patch" and params.get("dare") is not None:
        if not dare_base and recorded.get("dare_base") and recorded.get("dare_base") == recorded.get("base"):
            paths["dare_base"] = paths["base"]
        else:
            paths["dare_base"] = _default_from("dare_base", paths, recorded, dare_base, bool(against), "--dare-base")
    paths = {role: _refetched(report, role, path, recorded) for role, path in paths.items()}
    if command == "vector":
        return {role: _resolved(path, role) if path != recorded.get(role) else path for role, path in paths.items()}
    return paths


def _refetched(report: dict, role: str, path: str, recorded: dict) -> str:
    """``path`` as recorded stays as it is (a local path stays one, even if it is gone), except a
    recorded Hub input whose cache snapshot is gone: ``hf://REPO@COMMIT``, to fetch it again there."""
    hub = ((report.get("inputs") or {}).get(role) or {}).get("hub") or {}
    if path == recorded.get(role) and hub.get("repo_id") and hub.get("commit") and not os.path.lexists(path):
        return f"hf://{hub['repo_id']}@{hub['commit']}"
    return path


def _resolved(path: str, role: str) -> str:
    """A Hub id as its cache snapshot (``io.hub.resolve_input``, as ``resolve_roles`` resolves it)."""
    found = resolve_input(path, role.replace("_", " "), kind=ROLE_KINDS.get(role, "model"))
    return str(found.path) if found.is_hub else path


def open_inputs(paths: dict[str, str], params: dict, command: str, stack: ExitStack) -> dict[str, Checkpoint]:
    """Open each role's input as ``patch`` did (``api.open_roles``: a DARE or LoRA
    base that is the aligned model is that same object); role -> Checkpoint."""
    from resta_fast import api

    opener = api.Opener(stack)
    if command == "vector":
        return {role: opener(paths[role], role) for role in ("aligned", "unaligned")}
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
    for name, fp in found.items():
        # mtime is recorded for the record only: a copied but identical input still verifies.
        same = {k: v for k, v in fp.items() if k != "mtime_ns"} == {
            k: v for k, v in recorded[name].items() if k != "mtime_ns"
        }
        if not same:
            c.fail(f"{role} {ck.path}: {name}: size or header differs from the input the run read")
