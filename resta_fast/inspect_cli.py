"""`resta-fast inspect`: what is in a checkpoint, and what a patch would do, before any I/O.

One model: architecture, dtypes, tensor and parameter counts, shards, tied
weights, vocabulary size, quantization (or, for a PEFT adapter, its LoRA
settings). Several models (fine-tune first, then aligned and unaligned, or
flags): also the ``--dry-run`` plan, grouped by layer pattern so a 700-tensor
model reads as a dozen lines.

Example:
    resta-fast inspect ft/ chat/ shadow/
    resta-fast inspect my-adapter/ --base llama-chat/ --vector v/ --json
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import ExitStack
from pathlib import Path

from resta_fast.errors import RestaError, cli_flag
from resta_fast.options import PATCH

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
# The patch options inspect plans with, as patch has them (flags, checks, keywords).
PLAN = PATCH.subset(("beta", "include", "exclude", "beta_rules", "dtype"))


def describe_model(path) -> dict:
    """Summary of one HF model directory / .safetensors file, or a PEFT adapter.

    Example:
        >>> describe_model("llama-chat")["parameters"]  # doctest: +SKIP
        6738415616
    """
    from resta_fast.io.adapter import is_adapter
    from resta_fast.io.checkpoint import EMBED_SUFFIXES, LM_HEAD_SUFFIXES, Checkpoint

    if is_adapter(path):
        return _describe_adapter(Path(path))
    ck = Checkpoint(path, role="model")
    try:
        cfg = ck.config
        dtypes: dict[str, int] = {}
        params = 0
        for name in ck.location:
            info = ck.info(name)
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
            params += info.numel
        embed = next((n for n in ck.location if n.endswith(EMBED_SUFFIXES)), None)
        head = next((n for n in ck.location if n.endswith(LM_HEAD_SUFFIXES)), None)
        tie = cfg.get("tie_word_embeddings")
        if tie and head is None:
            tied = f"yes ({embed} only on disk; lm_head is loaded from it)"
        elif tie:
            tied = f"yes ({embed} and {head} both on disk)"
        elif tie is None and head is None:
            tied = "unknown (no tie_word_embeddings in config)"
        else:
            tied = "no"
        no_format = [f for f, sf in ck.files.items() if sf.metadata.get("format") != "pt"]
        return {
            "path": str(ck.path),
            "kind": "model",
            "architecture": (cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0],
            "model_type": cfg.get("model_type"),
            "config_dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
            "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
            "tensors": len(ck.location),
            "parameters": params,
            "files": list(ck.files),
            "layers": cfg.get("num_hidden_layers"),
            "tied_embeddings": tied,
            "vocab_size": cfg.get("vocab_size"),
            "embedding_rows": ck.info(embed).shape[0] if embed else None,
            "quantization": ck.quantization(),
            "missing_format_metadata": no_format,
            "side_files": [p.name for p in ck.side_files()],
        }
    finally:
        ck.close()


def _describe_adapter(path: Path) -> dict:
    from resta_fast.lora import LoraAdapter

    ad = LoraAdapter(path)
    try:
        modules = {re.sub(r"\.lora_(embedding_)?[AB](\..*)?$", "", k) for k in ad.file.tensors if ".lora_" in k}
        full = [k for k in ad.file.tensors if ".lora_" not in k and "original_module" not in k]
        return {
            "path": str(path),
            "kind": "lora adapter",
            "base_model_name_or_path": ad.config.get("base_model_name_or_path"),
            "r": ad.r,
            "lora_alpha": ad.alpha,
            "use_rslora": ad.use_rslora,
            "fan_in_fan_out": ad.fan_in_fan_out,
            "rank_pattern": ad.rank_pattern,
            "alpha_pattern": ad.alpha_pattern,
            "target_modules": ad.config.get("target_modules"),
            "modules_to_save": ad.config.get("modules_to_save"),
            "lora_modules": len(modules),
            "full_tensors": len(full),
            "adapter_parameters": sum(i.numel for i in ad.file.tensors.values()),
            "files": [ad.file.path.name],  # adapter_model.safetensors, or adapter_model.bin
        }
    finally:
        ad.file.close()


def group_plan(plan) -> list[dict]:
    """Plan tensors grouped by layer pattern (layer indices -> ``*``), in file order."""
    groups: dict[tuple, dict] = {}
    for t in plan.tensors():
        pattern = _LAYER_INDEX.sub("*", t.name)
        dtype = t.in_dtype if t.in_dtype == t.out_dtype else f"{t.in_dtype}->{t.out_dtype}"
        key = (pattern, t.action, t.beta, dtype, _LAYER_INDEX.sub("*", t.reason))
        g = groups.setdefault(
            key,
            {
                "pattern": pattern,
                "action": t.action,
                "beta": t.beta,
                "dtype": dtype,
                "reason": key[4],
                "count": 0,
                "shapes": [],
                "elements": 0,
            },
        )
        g["count"] += 1
        g["elements"] += t.numel
        if list(t.shape) not in g["shapes"]:
            g["shapes"].append(list(t.shape))
    return list(groups.values())


@PLAN.keywords
def inspect(models, *, aligned=None, unaligned=None, vector=None, base=None, dare_base=None, **options) -> dict:
    """Describe each model and, given a fine-tune plus aligned/unaligned (or a
    vector), the plan a patch would run.

    Args:
        models: paths or Hub ids; the first is the fine-tune, then aligned, then unaligned
            unless given by keyword. With only a fine-tune and an aligned
            model, the plan checks the fine-tune against the aligned model alone.
        options: the patch options that shape a plan (``PLAN``: beta, include, exclude,
            beta_rules, dtype), as ``patch`` takes them.
    Returns:
        ``{"models": [...], "plan": {...} | None, "plan_error": str | None}``.
    """

    models = list(models)
    if not models:
        raise RestaError("inspect needs at least one model directory")
    ft_path = models[0]
    rest = models[1:]
    if aligned is None and rest:
        aligned = rest.pop(0)
    if unaligned is None and vector is None and rest:
        unaligned = rest.pop(0)
    if rest:
        raise RestaError(
            f"inspect takes at most 3 positional models (finetuned, aligned, unaligned); "
            f"extra: {', '.join(map(str, rest))}"
        )
    from resta_fast.resolve import resolve_all
    from resta_fast.roles import ROLE_KINDS

    # The resolve step (each Hub id once, to its cache snapshot: io.hub.HUB_RULE): what is described below.
    given = {"finetuned": ft_path, "aligned": aligned, "unaligned": unaligned, "vector": vector}
    found = resolve_all({**given, "base": base, "dare_base": dare_base}, ROLE_KINDS)
    ft_path, aligned, unaligned, vector, base, dare_base = (None if i is None else i.path for i in found.values())
    seen = []
    for p in [ft_path, aligned, unaligned, vector, base, dare_base]:
        if p is not None and p not in seen:
            seen.append(p)
    result = {"models": [describe_model(p) for p in seen], "plan": None, "plan_error": None}
    if aligned is None and vector is None:
        if found["finetuned"].is_adapter and base is not None:
            aligned = base  # still show the merge: which tensors the adapter touches
        else:
            return result
    compat_only = vector is None and unaligned is None
    try:
        from resta_fast import api
        from resta_fast.options import PatchOptions
        from resta_fast.roles import resolve_roles

        options = PatchOptions(**options)
        # With no unaligned model the fine-tune is checked against the aligned one alone.
        roles = resolve_roles(
            ft_path,
            aligned=aligned,
            unaligned=aligned if compat_only else unaligned,
            vector=vector,
            base=base,
            dare_base=dare_base,
            dare=dare_base is not None,
        )
        with ExitStack() as stack:
            _, inputs = api.open_roles(roles, api.Opener(stack), dare=dare_base is not None)
            plan = api.plan_patch(inputs, options)
            if compat_only:
                plan.notes.insert(
                    0,
                    "no unaligned model given: checked the fine-tune against the aligned "
                    "model only (names, shapes, dtypes)",
                )
            result["plan"] = {**plan.to_json(), "groups": group_plan(plan), "table": plan.format_table()}
    except RestaError as exc:
        result["plan_error"] = exc.render(cli_flag)  # inspect's flags are patch's
    return result


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_report(result: dict, tensors: bool = False) -> str:
    """Text for the terminal."""
    lines = []
    for m in result["models"]:
        lines.append(f"{m['path']}  ({m['kind']})")
        if m["kind"] == "lora adapter":
            scale = "alpha/sqrt(r)" if m["use_rslora"] else "alpha/r"
            lines += [
                f"  LoRA r={m['r']} alpha={m['lora_alpha']} (scale {scale}), fan_in_fan_out={m['fan_in_fan_out']}",
                f"  targets: {m['target_modules']}; {m['lora_modules']} LoRA module(s), "
                f"{m['full_tensors']} full tensor(s) (modules_to_save: {m['modules_to_save']})",
            ]
            if m["rank_pattern"] or m["alpha_pattern"]:
                lines.append(f"  rank_pattern: {m['rank_pattern']}  alpha_pattern: {m['alpha_pattern']}")
            if m["base_model_name_or_path"]:
                lines.append(f"  trained on: {m['base_model_name_or_path']}")
            lines.append(f"  adapter parameters: {_human(m['adapter_parameters'])}")
            continue
        dtypes = ", ".join(f"{d} x{n}" for d, n in m["dtypes"].items())
        files = m["files"]
        shard = f"{len(files)} file(s): {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
        lines += [
            f"  architecture: {m['architecture']}  layers: {m['layers']}",
            f"  tensors: {m['tensors']}  parameters: {_human(m['parameters'])}  dtypes: {dtypes}",
            f"  {shard}",
            f"  vocab: config {m['vocab_size']}, embedding rows {m['embedding_rows']}",
            f"  tied embeddings: {m['tied_embeddings']}",
        ]
        if m["quantization"]:
            lines.append(f"  QUANTIZED: {m['quantization']} (cannot be patched)")
        if m["missing_format_metadata"]:
            lines.append(
                f"  no {{'format': 'pt'}} metadata in {len(m['missing_format_metadata'])} file(s) "
                "(accepted; the output always has it)"
            )
    if result["plan_error"]:
        lines += ["", f"plan: cannot patch: {result['plan_error']}"]
    elif result["plan"]:
        plan = result["plan"]
        lines += [
            "",
            "plan (by tensor group):",
            f"  {'count':>5}  {'action':6}  {'beta':>5}  {'dtype':11}  group  (reason)",
        ]
        for g in plan["groups"]:
            beta = "" if g["beta"] is None else f"{g['beta']:g}"
            shape = str(g["shapes"][0]) if len(g["shapes"]) == 1 else f"{len(g['shapes'])} shapes"
            lines.append(
                f"  {g['count']:>5}  {g['action']:6}  {beta:>5}  {g['dtype']:11}  {g['pattern']} "
                f"{shape}" + (f"  ({g['reason']})" if g["reason"] else "")
            )
        s = plan["summary"]
        lines.append(
            f"  {s['tensors']} tensors in {s['files']} file(s): {s.get('patch', 0)} patched, {s.get('copy', 0)} copied"
        )
        lines += [f"  note: {n}" for n in plan["notes"]]
        if tensors:
            lines += ["", plan["table"]]
    return "\n".join(lines)


def add_inspect_parser(subparsers) -> None:
    """Register ``inspect`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "inspect",
        help="describe checkpoints and what a patch would do (no output written)",
        description="Describe each model; with a fine-tune plus aligned/unaligned (or --vector), "
        "print the patch plan grouped by layer pattern. Positional models are "
        "finetuned, aligned, unaligned in that order.",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="finetuned [aligned [unaligned]]: directories or Hugging Face Hub ids (an existing local "
        "path wins; otherwise ORG/NAME[@REV] or hf://ORG/NAME[@REV] is a Hub id)",
    )
    p.add_argument("--aligned")
    p.add_argument("--unaligned")
    p.add_argument("--vector")
    p.add_argument("--base", help="for a LoRA adapter: the model it was trained on (default: aligned)")
    p.add_argument("--dare-base", help="show DARE's base in the plan")
    PLAN.add_arguments(p)  # the options that shape the plan
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    """Exit 0, or 2 when the plan cannot be built (the reason is printed)."""
    result = inspect(
        args.models,
        aligned=args.aligned,
        unaligned=args.unaligned,
        vector=args.vector,
        base=args.base,
        **PLAN.from_args(args),
        dare_base=args.dare_base,
    )
    if args.json:
        if result["plan"]:
            result["plan"].pop("table")
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_report(result, tensors=args.tensors))
    if result["plan_error"]:
        print(f"resta-fast: error: {result['plan_error']}", file=sys.stderr)
        return 2
    return 0
