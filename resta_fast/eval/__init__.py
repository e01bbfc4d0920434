"""Is the patched model safe now, and still useful? (docs/spec.md §5)

Evaluation sits beside the patcher and only reads finished checkpoints:
prompts → generation → judges → metrics → gate → reports.

Example:
    >>> from resta_fast.eval import evaluate
    >>> r = evaluate(["out/restored"], "builtin:smoke", max_harmful=0.05, out="eval-out")  # doctest: +SKIP
    >>> r["summary"]["gate"]  # doctest: +SKIP
    {'passed': True, 'reason': '...'}
"""

import importlib

# Attributes resolve on first use (PEP 562): importing a submodule, e.g. the CLI's
# parsers in eval/cli.py, then does not import the judges, runner and tune.
_WHERE = {
    "ClassifierJudge": "judges",
    "OpenAIJudge": "judges",
    "RefusalJudge": "judges",
    "Verdict": "judges",
    "make_judge": "judges",
    "Columns": "prompts",
    "Prompt": "prompts",
    "PromptSet": "prompts",
    "load_prompts": "prompts",
    "prompts_from_texts": "prompts",
    "evaluate": "runner",
    "make_validator": "runner",
    "validate_checkpoint": "runner",
    "tune": "tune",
    "EvalOptions": "options",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'resta_fast.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"resta_fast.eval.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "ClassifierJudge",
    "Columns",
    "EvalOptions",
    "OpenAIJudge",
    "Prompt",
    "PromptSet",
    "RefusalJudge",
    "Verdict",
    "evaluate",
    "load_prompts",
    "make_judge",
    "make_validator",
    "prompts_from_texts",
    "tune",
    "validate_checkpoint",
]
