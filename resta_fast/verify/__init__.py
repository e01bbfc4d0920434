"""`resta-fast verify OUT`: prove an output is what its resta_fast.json says it is.

Without inputs it re-hashes every file recorded in ``resta_fast.json`` and
re-validates every safetensors header with our reader (``checks``: no torch, and
nothing of the recomputation is imported). With ``--against`` it also opens the
inputs and checks their fingerprints (``inputs``), rebuilds the plan from the
recorded parameters (``against``), and recomputes a seeded random sample of
output elements, comparing them bit for bit (``samples``): with the C++ kernel
on numpy gathers (no torch) where it is built, else with the torch reference
arithmetic. The CLI's flags, exit codes and printed form are in ``verify_cli``.

Example:
    $ resta-fast verify restored/ --against ft/ chat/ shadow/ --samples 10000
    ok    sha256: 4 files match resta_fast.json
    ...
    PASS
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.verify.checks import check_hashes, check_headers, check_validation, read_report

__all__ = ["hub_sources", "verify"]


def verify(
    out,
    against: list[str] | None = None,
    *,
    dare_base: str | None = None,
    base: str | None = None,
    samples: int = 10000,
    seed: int = 0,
) -> dict:
    """Check an output directory against its resta_fast.json (and its inputs).

    Args:
        out: a directory written by ``patch`` or ``vector``.
        against: None (hashes and headers only), [] (recompute from the input
            paths recorded in resta_fast.json), or the input paths in the order
            the command took them (finetuned, aligned, unaligned / finetuned,
            vector / aligned, unaligned).
        dare_base: the DARE base, when it was not the aligned model.
        base: the model a LoRA adapter was merged into, when it was not the aligned model.
        samples, seed: how many output elements to recompute, and which.
    Returns:
        ``{"out", "ok", "checks": [{"name", "ok", "detail", "problems"}]}``.

    Example (skipped as a doctest: it needs a patched output and its inputs on disk):
        >>> verify("restored", ["ft", "chat", "shadow"])["ok"]  # doctest: +SKIP
        True
    """
    out = Path(out)
    if not out.is_dir():
        raise RestaError(f"verify {out}: not a directory; give the output directory of `patch`")
    report_check, report = read_report(out)
    checks = [report_check]
    if report is not None:
        validation = check_validation(report)
        if validation is not None:  # patch --validate-prompts recorded a safety verdict
            checks.append(validation)
        checks.append(check_hashes(out, report))
        header_check, out_ckpt = check_headers(out, report)
        checks.append(header_check)
        try:
            if against is not None and out_ckpt is not None:
                # Imported here: hashes and headers alone need none of the inputs' machinery.
                from resta_fast.verify.against import check_against

                checks += check_against(out_ckpt, report, list(against), dare_base, samples, seed, base)
        finally:
            if out_ckpt is not None:
                out_ckpt.close()
    result = {"out": str(out), "ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
    sources = hub_sources(report) if report is not None else {}
    if sources:
        result["hub_inputs"] = sources
    return result


def hub_sources(report: dict) -> dict[str, dict]:
    """role -> {repo_id, revision, commit} of the inputs an output's report says came from the Hub.

    Example:
        >>> hub_sources({"sources": {"aligned": {"name": "chat", "hub": {"repo_id": "org/chat"}},
        ...                          "unaligned": {"name": "shadow"}}})
        {'aligned': {'repo_id': 'org/chat'}}
    """
    found = {}
    for key in ("inputs", "sources"):  # an output written before `sources` kept `hub` in `inputs`
        entries = report.get(key) if isinstance(report.get(key), dict) else {}
        for role, info in entries.items():
            if isinstance(info, dict) and isinstance(info.get("hub"), dict):
                found[role] = info["hub"]
    return found
