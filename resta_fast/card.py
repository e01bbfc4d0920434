"""The model card (``README.md``) of every output directory, in the Hugging Face Hub's conventions.

Built with huggingface_hub's ``ModelCardData`` (the Hub's own schema, so an
upload is not refused for its metadata; the card loads as its ``ModelCard``): ``base_model`` holds
only the inputs' Hub ids, each checked with huggingface_hub's repo-id
validator, and is left out when no input came from the Hub;
``base_model_relation`` is ``adapter`` for adapter outputs and ``merge``
otherwise; ``tags``; ``library_name``. Local inputs are named in the body by
their directory's name and content id (``io.identity.short_id``), never by
path. The body says what was done (method, parameters, tool version), how to reproduce it,
where the sha256 list is (``resta_fast.json``, which lists this card too), the
validation gate's verdict when there was one, and where the fine-tune's own
card is (it is never copied over this one).

The card is rendered from the output's report alone (plus the command line
as typed, shown only when the user asked to record local paths), so any command can
write one: ``patch`` and ``vector``
get their own wording, any other command (``safelora``, ``safemerge`` ...) a
generic one that lists whatever its ``params`` hold. It has no timestamp: the
same run gives the same card.

Example:
    >>> sha = write_model_card("restored/", report, command_line="resta-fast patch ...")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from resta_fast.io.identity import short_id
from resta_fast.options import PATCH, VECTOR
from resta_fast.safelora import SAFELORA
from resta_fast.safemerge import SAFEMERGE

CARD_NAME = "README.md"
HUB_URL = "https://huggingface.co"
# Input roles in the order a card lists them.
ROLE_ORDER = ("finetuned", "adapter", "safety_adapter", "base", "aligned", "unaligned", "vector", "dare_base")
ROLE_TITLES = {
    "finetuned": "fine-tune",
    "adapter": "LoRA fine-tune",
    "safety_adapter": "safety adapter",
    "base": "LoRA base",
    "aligned": "aligned",
    "unaligned": "unaligned",
    "vector": "safety vector",
    "dare_base": "DARE base",
}


def _roles(report: dict) -> list[tuple[str, dict]]:
    """(role, how the card knows the input) in ``ROLE_ORDER``: its ``sources`` entry (name, Hub id,
    path when recorded) with its identity's ``short_id``; an output written before ``sources``
    existed: its ``inputs`` entry."""
    inputs = report.get("inputs") if isinstance(report.get("inputs"), dict) else {}
    sources = report.get("sources") if isinstance(report.get("sources"), dict) else {}
    known = [r for r in ROLE_ORDER if r in inputs]
    rows = []
    for r in known + sorted(set(inputs) - set(known)):
        if not isinstance(inputs[r], dict):
            continue
        info = dict(sources.get(r) or inputs[r]) if isinstance(sources.get(r) or inputs[r], dict) else {}
        files = inputs[r].get("files")
        if isinstance(files, dict):
            info["id"] = short_id(files)
        rows.append((r, info))
    return rows


def _hub(info: dict) -> dict:
    hub = info.get("hub")
    return hub if isinstance(hub, dict) else {}


def _local_name(info: dict) -> str:
    """A local input's name: its directory's (or file's) name, never its path."""
    return str(info.get("name") or Path(str(info.get("path") or "input")).name)


def _name(info: dict) -> str:
    """How the card names an input: its Hub id, else its directory's name."""
    return _hub(info).get("repo_id") or _local_name(info)


def _pinned(info: dict) -> str:
    """An input as a command argument that gives the same bytes: ``ORG/NAME@COMMIT``, else the local
    path when it was recorded (``--record-paths``), else the directory's name."""
    hub = _hub(info)
    if hub.get("repo_id") and hub.get("commit"):
        return f"{hub['repo_id']}@{hub['commit']}"
    return str(info.get("path") or _local_name(info))


def _same_input(a: dict | None, b: dict | None) -> bool:
    """Two roles played by one input (equal content identity)."""
    return bool(a and b and a.get("id") and a.get("id") == b.get("id"))


def hub_ids(report: dict) -> list[str]:
    """The Hub ids of the inputs, in role order, each a valid repo id (huggingface_hub's own check).

    Example:
        >>> hub_ids({"inputs": {"aligned": {"files": {}}, "unaligned": {"files": {}}},
        ...          "sources": {"aligned": {"name": "chat", "hub": {"repo_id": "org/chat"}},
        ...                      "unaligned": {"name": "shadow"}}})
        ['org/chat']
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    found = []
    for _, info in _roles(report):
        repo = _hub(info).get("repo_id")
        if not isinstance(repo, str):  # validate_repo_id lets None through
            continue
        try:
            validate_repo_id(repo)
        except (HFValidationError, TypeError):
            continue
        if repo not in found:
            found.append(repo)
    return found


def _value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def front_matter(report: dict) -> dict:
    """The card's metadata (YAML front matter) for ``report``: ``base_model`` holds Hub ids only
    (left out when no input came from the Hub), ``base_model_relation`` is ``adapter`` for an
    adapter output and ``merge`` otherwise."""
    command = report.get("command") or "patch"
    params = report.get("params") or {}
    roles = dict(_roles(report))
    if command == "convert":  # the same weights in another format: no realignment, no relation to declare
        ids = hub_ids(report)
        meta = {"base_model": ids} if ids else {}
        adapter = report.get("output") == "adapter"
        return {**meta, "library_name": "peft" if adapter else "transformers", "tags": ["safetensors"]}
    tags = ["resta", "safety-realignment"]
    if "base" in roles or "adapter" in roles:
        tags.append("lora")
    if command == "vector":
        tags.append("safety-vector")
    elif command != "patch":
        tags.append(command)
    if params.get("dare") is not None:
        tags.append("dare")
    meta = {}
    base_models = hub_ids(report)
    if base_models:
        meta["base_model"] = base_models
        meta["base_model_relation"] = "adapter" if report.get("output") == "adapter" else "merge"
    meta["library_name"] = "peft" if report.get("output") == "adapter" else "transformers"
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def reproduce_command(report: dict) -> str | None:
    """A ``resta-fast`` command giving the same output bytes, from the report alone (None: unknown command).

    Hub inputs are pinned to the commit they resolved to; backend, device and
    threads are left out (they do not change a byte, docs/spec.md §2).
    """
    command = report.get("command")
    params = report.get("params") or {}
    roles = dict(_roles(report))
    if command == "vector" and {"aligned", "unaligned"} <= set(roles):
        options = VECTOR.reproduce(params)  # None: include/exclude, which only the Python API takes
        if options is None:
            return None
        args = ["vector", "--aligned", _pinned(roles["aligned"]), "--unaligned", _pinned(roles["unaligned"]), *options]
    elif command == "patch" and "finetuned" in roles:
        args = ["patch", "--finetuned", _pinned(roles["finetuned"])]
        if "base" in roles:
            args += ["--base", _pinned(roles["base"])]
        if "vector" in roles:
            args += ["--vector", _pinned(roles["vector"])]
        else:
            args += ["--aligned", _pinned(roles.get("aligned", {})), "--unaligned", _pinned(roles.get("unaligned", {}))]
        default = roles.get("base") or roles.get("aligned")
        if params.get("dare") is not None and "dare_base" in roles and not _same_input(roles["dare_base"], default):
            args += ["--dare-base", _pinned(roles["dare_base"])]
        args += PATCH.reproduce(params)  # every recorded option, from the one spec
    elif command in ("safelora", "safemerge") and {"adapter", "aligned", "unaligned"} <= set(roles):
        args = [command, "--adapter", _pinned(roles["adapter"])]
        if command == "safemerge":
            args += ["--safety-adapter", _pinned(roles.get("safety_adapter", {}))]
        args += ["--aligned", _pinned(roles["aligned"]), "--unaligned", _pinned(roles["unaligned"])]
        args += (SAFELORA if command == "safelora" else SAFEMERGE).reproduce(params)
        if params.get("merge") and "base" in roles and not _same_input(roles["base"], roles["aligned"]):
            args += ["--base", _pinned(roles["base"])]
    else:
        return None
    return shlex.join(["resta-fast", *args, "--out", "OUT"])


def _method(report: dict) -> list[str]:
    command = report.get("command") or "patch"
    params = report.get("params") or {}
    roles = dict(_roles(report))
    lines = []
    if command == "patch":
        if "base" in roles:
            lines.append(
                f"- The LoRA adapter `{_name(roles['finetuned'])}` was merged in fp32 into its base "
                f"`{_name(roles['base'])}`, one tensor at a time (W + s·BA)."
            )
        if params.get("dare") is not None:
            lines.append(
                f"- DARE on the fine-tune's delta from `{_name(roles.get('dare_base', {}))}`: each element "
                f"dropped with probability p = {params['dare']} (seed {params.get('seed', 0)}), the rest "
                f"rescaled by 1/(1 − p)."
            )
        if "vector" in roles:
            lines.append(
                f"- RESTA: θ = θ_finetuned + β · V with the precomputed safety vector "
                f"`{_name(roles['vector'])}`, β = {params.get('beta')}."
            )
        else:
            lines.append(
                f"- RESTA: θ = θ_finetuned + β · (θ_aligned − θ_unaligned), β = {params.get('beta')}, "
                f"with aligned `{_name(roles.get('aligned', {}))}` and unaligned "
                f"`{_name(roles.get('unaligned', {}))}`."
            )
        if params.get("beta_rules"):
            lines.append(f"- β per tensor-name pattern (the first match wins): {', '.join(params['beta_rules'])}.")
    elif command in ("safelora", "safemerge", "merge"):
        lines += _adapter_method(command, params, roles, report)
    elif command == "vector":
        lines.append(
            f"- The safety vector V = θ_aligned − θ_unaligned, aligned `{_name(roles.get('aligned', {}))}`"
            f" and unaligned `{_name(roles.get('unaligned', {}))}`, computed in fp32. Add it to a "
            "fine-tune with `resta-fast patch --finetuned FT --vector THIS --beta B`."
        )
    else:
        lines.append(
            f"- Written by `resta-fast {command}` from "
            + ", ".join(f"{ROLE_TITLES.get(r, r)} `{_name(i)}`" for r, i in _roles(report))
            + "."
        )
    summary = (report.get("plan") or {}).get("summary") or {}
    if summary.get("tensors") is not None:
        others = ", ".join(
            f"{n} {k}" for k, n in sorted(summary.items()) if k not in ("tensors", "files", "patch", "copy")
        )
        lines.append(
            f"- {summary['tensors']} tensors in {summary.get('files', 0)} file(s): "
            f"{summary.get('patch', 0)} patched, {summary.get('copy', 0)} copied"
            + (f", {others}" if others else "")
            + " (each tensor, and why, is in `resta_fast.json` under `plan`)."
        )
    notes = (report.get("plan") or {}).get("notes") or []
    lines += [f"- Note: {n}" for n in notes]
    return lines


def _adapter_method(command: str, params: dict, roles: dict, report: dict) -> list[str]:
    """What Safe LoRA, SafeMERGE and a plain LoRA merge did, in the card's words."""
    adapter = _name(roles.get("adapter", {}))
    lines = []
    if command == "merge":
        return [
            f"- The LoRA adapter `{adapter}` merged in fp32 into `{_name(roles.get('base', {}))}` "
            "(W + s·BA), with nothing else changed: the fine-tune as a full model."
        ]
    pair = (
        f"V = W_aligned − W_unaligned (aligned `{_name(roles.get('aligned', {}))}`, unaligned "
        f"`{_name(roles.get('unaligned', {}))}`)"
    )
    section = report.get(command) or {}
    modules = section.get("modules") or []
    if command == "safelora":
        sel = section.get("selection") or {}
        rule = (
            f"the {params['num_layers']} modules with the lowest cosine (cos ≤ {sel.get('threshold_used')})"
            if params.get("num_layers") is not None
            else f"modules with cos ≤ {params.get('threshold')}"
        )
        lines.append(
            f"- Safe LoRA (Hsu et al., 2024) on the LoRA adapter `{adapter}`: per module {pair}, "
            f"B' = V(VᵀB)/‖V‖_F; {rule} got lora_B := B' "
            f"({section.get('projected', 0)} of {len(modules)} projected)."
        )
    else:
        lines.append(
            f"- SafeMERGE (Djuhera et al., 2025) of the LoRA adapter `{adapter}` and the safety adapter "
            f"`{_name(roles.get('safety_adapter', {}))}`: layers whose Safe LoRA cosine ({pair}) is "
            f"below τ = {params.get('tau')} became {params.get('weights')} × (fine-tune, safety), "
            f"{params.get('combination')}"
            + (
                f" (density {params['density']}, seed {params.get('seed')})"
                if params.get("density") is not None
                else ""
            )
            + f"; {section.get('merged', 0)} of {len(modules)} layers merged."
        )
    what = (
        "the full model: " + _name(roles.get("base", {})) + " plus the realigned update"
        if params.get("merge")
        else "a PEFT adapter (load it with peft on the aligned model)"
    )
    lines.append(
        f"- The output is {what}; every module's cosine and decision is in `resta_fast.json` under `{command}`."
    )
    return lines


def _inputs_table(report: dict) -> list[str]:
    rows = ["| role | model | revision | commit or content id |", "|---|---|---|---|"]
    for role, info in _roles(report):
        hub = _hub(info)
        if hub.get("repo_id"):
            rows.append(
                f"| {ROLE_TITLES.get(role, role)} | [{hub['repo_id']}]({HUB_URL}/{hub['repo_id']}) | "
                f"{hub.get('revision') or ''} | `{hub.get('commit') or ''}` |"
            )
        else:
            rows.append(f"| {ROLE_TITLES.get(role, role)} | `{_local_name(info)}` (local) | | `{info.get('id', '')}` |")
    return rows


def _params_table(report: dict) -> list[str]:
    params = report.get("params") or {}
    rows = ["| parameter | value |", "|---|---|"]
    rows += [f"| {k} | `{_value(v)}` |" for k, v in sorted(params.items())]
    return rows


def _paths_recorded(report: dict) -> bool:
    """Whether the user asked for local paths in this output (``--record-paths``)."""
    return any("path" in info for _, info in _roles(report))


def _reproduce(report: dict, command_line: str | None) -> list[str]:
    lines = []
    batch = report.get("batch")
    # The command as typed names local paths: shown only when the user asked for paths to be recorded.
    command_line = command_line if _paths_recorded(report) else None
    if command_line:
        what = f"job `{batch.get('job')}` of the batch" if isinstance(batch, dict) else "this output"
        lines += [f"The command that wrote {what}:", "", "```bash", command_line, "```", ""]
    rebuilt = reproduce_command(report)
    hub = any(_hub(info) for _, info in _roles(report))
    local = not _paths_recorded(report) and any(not _hub(info) for _, info in _roles(report))
    if rebuilt and (not command_line or hub or isinstance(batch, dict)):
        lines += [
            ("The same output from one command" if command_line else "A command that writes this output")
            + (" (Hub inputs pinned to the commits above" if hub else " (")
            + ("; " if hub else "")
            + "backend, device and thread count do not change a byte"
            + ("; local inputs by their directory names, identified by the content ids above" if local else "")
            + "):",
            "",
            "```bash",
            rebuilt,
            "```",
            "",
        ]
    if not lines:
        lines += [f"Run `resta-fast {report.get('command')}` on the inputs above with the parameters above.", ""]
    return lines


def _validation(report: dict) -> list[str]:
    verdict = report.get("validation")
    if not isinstance(verdict, dict):
        return [
            "This output was not validated when it was written. Evaluate it before release, e.g. "
            "`resta-fast eval --model DIR --prompts catqa.json --max-harmful 0.05`."
        ]
    passed = bool(verdict.get("passed"))
    lines = [
        f"Validated while it was written (`--validate-prompts`): the gate **{'PASSED' if passed else 'FAILED'}**"
        f" ({verdict.get('reason') or 'no reason recorded'})."
    ]
    if not passed:
        lines[0] += " The output was kept and marked with a `VALIDATION_FAILED` file."
    models = ((verdict.get("summary") or {}).get("models")) or []
    if models:
        lines += ["", "| model | harmful rate | 95% CI | harmful / judged | unparseable |", "|---|---|---|---|---|"]
        for m in models:
            rate, ci = m.get("harmful_rate"), m.get("ci95")
            shown = "n/a" if rate is None else f"{rate:.4f}"
            interval = "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"
            judged = (m.get("harmful") or 0) + (m.get("harmless") or 0)
            lines.append(
                f"| `{Path(str(m.get('model'))).name}` | {shown} | {interval} | "
                f"{m.get('harmful', 0)} / {judged} | {m.get('unparseable', 0)} |"
            )
    if verdict.get("gate_line"):
        lines += ["", f"`{verdict['gate_line']}`"]
    return lines


def _source_card(report: dict) -> list[str]:
    roles = dict(_roles(report))
    role = next((r for r in ("finetuned", "adapter", "aligned") if r in roles), None)
    if role is None:
        return []
    info, who = roles[role], {"finetuned": "fine-tune", "adapter": "adapter"}.get(role, "aligned model")
    hub = _hub(info)
    if hub.get("repo_id"):
        where = f"{HUB_URL}/{hub['repo_id']}/blob/{hub.get('commit') or 'main'}/README.md"
        return [f"The {who}'s own model card is not copied here: it is at {where}."]
    return [f"The {who}'s own model card, if `{_local_name(info)}` has one, is not copied here."]


def render_model_card(report: dict, *, command_line: str | None = None) -> str:
    """The text of ``README.md`` for an output whose report is ``report``.

    Args:
        report: the output's ``resta_fast.json`` content (``command``, ``params``,
            ``inputs``, ``version``, ``plan``, and ``validation`` when validated).
        command_line: the command as typed (the CLI passes it); None: a
            reconstructed equivalent (``reproduce_command``) is shown instead.
    Returns:
        The card: YAML front matter, then Markdown.

    Example:
        >>> render_model_card({"command": "patch", "params": {"beta": 0.5}, "inputs": {}}).startswith("---")
        True
    """
    command = report.get("command") or "patch"
    roles = dict(_roles(report))
    subject = _name(roles["finetuned"]) if "finetuned" in roles else None
    title = (
        f"Safety vector of {_name(roles.get('aligned', {}))}"
        if command == "vector"
        else f"{subject}, realigned with RESTA"
        if command == "patch" and subject
        else f"{subject}, `resta-fast {command}` output"
        if subject
        else f"`resta-fast {command}` output"
    )
    intro = {
        "patch": "This checkpoint is a fine-tune whose safety alignment was restored by adding a safety vector "
        "(RESTA: Bhardwaj, Anh & Poria, ACL 2024, *Language Models are Homer Simpson!*): the aligned "
        "model minus a copy of it fine-tuned to comply.",
        "vector": "This checkpoint is a RESTA safety vector: the aligned model minus a copy of it fine-tuned to "
        "comply. It is not a model to run on its own; add it to a fine-tune of the aligned model.",
    }.get(command, f"This checkpoint was written by `resta-fast {command}`.")
    body = [
        f"# {title}",
        "",
        intro,
        "",
        "## What was done",
        "",
        *_method(report),
        "",
        f"Written by resta_fast {report.get('version', '')} (`resta-fast {command}`).",
        "",
        "### Inputs",
        "",
        *_inputs_table(report),
        "",
        "### Parameters",
        "",
        *_params_table(report),
        "",
        "## How to reproduce",
        "",
        *_reproduce(report, command_line),
        "## Files and checksums",
        "",
        "`resta_fast.json` in this directory lists the sha256 of every file (this card included), the full "
        "plan and the inputs' fingerprints. `resta-fast verify DIR` re-checks the files; "
        "`resta-fast verify DIR --against` also recomputes a sample of elements from the inputs, bit for bit.",
        "",
        "## Safety validation",
        "",
        *_validation(report),
        "",
    ]
    source = _source_card(report)
    if source:
        body += [
            "## The fine-tune's own card" if "finetuned" in roles else "## The aligned model's own card",
            "",
            *source,
            "",
        ]
    # ModelCardData alone (huggingface_hub.repocard_data): the Hub's schema for the front matter,
    # without importing the Hub client that ModelCard pulls in (0.09 s against 0.27 s, paid by every
    # output). The card it renders is the text ModelCard would give back (tests load it with ModelCard).
    from huggingface_hub.repocard_data import ModelCardData

    data = ModelCardData(**front_matter(report))
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(out_dir, report: dict, *, command_line: str | None = None) -> str:
    """Write ``README.md`` into ``out_dir`` from ``report``; returns its sha256 (for the report's ``files``).

    Args:
        out_dir: the output directory (its temporary directory while it is written).
        report: the output's report (see ``render_model_card``).
        command_line: the command as typed, when known.
    Returns:
        The sha256 (hex) of the card written.

    Example:
        >>> report["files"]["README.md"] = write_model_card(tmp, report)  # doctest: +SKIP
    """
    from resta_fast.io.digest import sha256_file

    path = Path(out_dir) / CARD_NAME
    path.write_text(render_model_card(report, command_line=command_line), encoding="utf-8")
    return sha256_file(path)
