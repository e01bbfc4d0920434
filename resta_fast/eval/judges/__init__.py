"""Judges: was a response harmful? Refusal phrases, a local classifier, or an OpenAI-compatible endpoint.

Every judge has ``name`` and ``judge(questions, responses) -> list[Verdict]``;
a verdict is ``harmful``, ``harmless`` or ``unparseable`` (excluded from the rate,
counted separately). One concept per module: ``verdict`` (labels, :class:`Verdict`),
``refusal`` (phrase lists in ``eval/data/refusal_<lang>.txt``), ``classifier``
(Llama Guard / HarmBench), ``openai`` (the endpoint judge) over ``http`` (retries,
rate limit) and ``cache`` (verdicts on disk). This module builds a judge by name.

Example:
    >>> from resta_fast.eval.judges import HARMLESS, make_judge
    >>> make_judge("refusal").judge(["q"], ["Sorry, no."])[0].label == HARMLESS
    True
"""

from __future__ import annotations

from resta_fast.errors import RestaError
from resta_fast.eval.judges.cache import VerdictCache
from resta_fast.eval.judges.classifier import (
    CLASSIFIER_STYLES,
    ClassifierJudge,
    detect_style,
    parse_llama_guard,
    parse_yes_no,
)
from resta_fast.eval.judges.http import RateLimiter
from resta_fast.eval.judges.openai import OpenAIJudge, parse_ab_tags
from resta_fast.eval.judges.refusal import EMPTY_POLICIES, REFUSAL_PHRASES, RefusalJudge
from resta_fast.eval.judges.verdict import HARMFUL, HARMLESS, LABELS, UNPARSEABLE, Verdict

JUDGES = ("refusal", "classifier", "openai")


def make_judge(name: str, **options):
    """Build a judge by its CLI name.

    Args:
        name: ``refusal``, ``classifier`` or ``openai``.
        **options: keyword arguments of that judge's class.

    Returns:
        The judge.

    Example:
        >>> make_judge("refusal", languages=("en", "zh")).name
        'refusal'
    """
    if name == "refusal":
        return RefusalJudge(**options)
    if name == "classifier":
        if not options.get("model_dir"):
            raise RestaError("--judge classifier needs --classifier PATH (a local Llama-Guard or HarmBench model)")
        return ClassifierJudge(**options)
    if name == "openai":
        return OpenAIJudge(**options)
    raise RestaError(f"unknown judge {name!r}; choose from {', '.join(JUDGES)}")


__all__ = [
    "CLASSIFIER_STYLES",
    "EMPTY_POLICIES",
    "HARMFUL",
    "HARMLESS",
    "JUDGES",
    "LABELS",
    "REFUSAL_PHRASES",
    "UNPARSEABLE",
    "ClassifierJudge",
    "OpenAIJudge",
    "RateLimiter",
    "RefusalJudge",
    "Verdict",
    "VerdictCache",
    "detect_style",
    "make_judge",
    "parse_ab_tags",
    "parse_llama_guard",
    "parse_yes_no",
]
