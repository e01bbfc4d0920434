"""Is the patched model safe now, and still useful? (SPEC §5)

Evaluation sits beside the patcher and only reads finished checkpoints:
prompts → generation → judges → metrics → gate → reports.

Example:
    >>> from resta_fast.eval import evaluate
    >>> r = evaluate(["out/restored"], "builtin:smoke", max_harmful=0.05, out="eval-out")  # doctest: +SKIP
    >>> r["summary"]["gate"]  # doctest: +SKIP
    {'passed': True, 'reason': '...'}
"""

from resta_fast.eval.judges import ClassifierJudge, OpenAIJudge, RefusalJudge, Verdict, make_judge
from resta_fast.eval.prompts import Columns, Prompt, PromptSet, load_prompts, prompts_from_texts
from resta_fast.eval.runner import evaluate, make_validator, validate_checkpoint
from resta_fast.eval.tune import tune

__all__ = [
    "ClassifierJudge",
    "Columns",
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
