"""Utility beside safety: exact-match / contains accuracy on prompt-answer pairs, and perplexity.

Safety bought by breaking the model is not safety (docs/spec.md §5), so every safety
number is reported next to one of these.
"""

from __future__ import annotations

import json
from pathlib import Path

from resta_fast.errors import RestaError

PROMPT_KEYS = ("prompt", "question", "input", "instruction")
ANSWER_KEYS = ("answer", "output", "target", "label", "response")


def load_pairs(path, *, prompt_key: str | None = None, answer_key: str | None = None) -> list[tuple[str, str]]:
    """Read a JSONL of prompt/answer pairs for exact-match accuracy.

    Args:
        path: JSONL file, one ``{"prompt": ..., "answer": ...}`` object per line.
        prompt_key: prompt field name (guessed from :data:`PROMPT_KEYS` when None).
        answer_key: answer field name (guessed from :data:`ANSWER_KEYS` when None).

    Returns:
        (prompt, answer) pairs; answers are converted to strings.

    Example:
        >>> load_pairs("utility.jsonl")  # doctest: +SKIP
        [('What is 2+2?', '4')]
    """
    p = Path(path)
    if not p.is_file():
        raise RestaError(f'utility file {p} not found: pass a JSONL of {{"prompt": ..., "answer": ...}} lines')
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RestaError(f"{p}: line {n} is not valid JSON ({e.msg}); fix that line") from e
        if not isinstance(row, dict):
            raise RestaError(f'{p}: line {n} is not a JSON object; write one {{"prompt": ..., "answer": ...}} per line')
        pk = prompt_key or next((k for k in PROMPT_KEYS if k in row), None)
        ak = answer_key or next((k for k in ANSWER_KEYS if k in row), None)
        if pk not in row or ak not in row:
            raise RestaError(
                f"{p}: line {n} lacks a prompt/answer field (has {sorted(row)}); use keys "
                f"{PROMPT_KEYS[0]!r} and {ANSWER_KEYS[0]!r}"
            )
        pairs.append((str(row[pk]), str(row[ak])))
    if not pairs:
        raise RestaError(f'utility file {p} has no prompt/answer pairs: add {{"prompt": ..., "answer": ...}} lines')
    return pairs


def score_answers(completions, answers) -> dict:
    """Exact match (stripped completion == stripped answer) and contains (case-insensitive).

    Args:
        completions: the model's outputs.
        answers: the reference answers, same order.

    Returns:
        ``{"n", "exact_match", "contains"}`` with rates in [0, 1].

    Example:
        >>> score_answers(["Paris", "It is Paris."], ["Paris", "paris"])
        {'n': 2, 'exact_match': 0.5, 'contains': 1.0}
    """
    completions, answers = list(completions), list(answers)
    n = len(answers)
    if n == 0:
        return {"n": 0, "exact_match": None, "contains": None}
    em = sum(c.strip() == a.strip() for c, a in zip(completions, answers, strict=True))
    contains = sum(a.strip().casefold() in c.casefold() for c, a in zip(completions, answers, strict=True))
    return {"n": n, "exact_match": em / n, "contains": contains / n}


def read_text(path) -> str:
    """The held-out text for perplexity.

    Args:
        path: a UTF-8 text file.

    Returns:
        Its contents.

    Example:
        >>> read_text("heldout.txt")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise RestaError(f"perplexity text {p} not found: pass a UTF-8 text file of held-out text")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise RestaError(f"perplexity text {p} is empty: pass a UTF-8 text file of held-out text")
    return text
