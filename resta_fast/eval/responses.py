"""Responses files: one JSONL line per prompt, so judges can be re-run without the model.

A line holds ``id``, ``prompt``, ``category``, ``subcategory``, ``response`` and
``model`` (the model path, the same on every line). ``resta-fast eval --out``
writes them under ``responses/``; ``--responses FILE`` reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.eval.prompts import Prompt


def save_responses(path, model: str, prompts: list[Prompt], responses: list[str]) -> Path:
    """Write one JSONL line per prompt: id, prompt, category, subcategory, response, model.

    Args:
        path: output file (parent directories are created).
        model: the model path, recorded on every line for re-judging.
        prompts: the prompts, in order.
        responses: the completions, same order.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     f = save_responses(f"{d}/responses/m.jsonl", "out/m", [Prompt("s:0", "q", "Cat")], ["no"])
        ...     print(f.read_text(), end="")
        {"id": "s:0", "category": "Cat", "subcategory": null, "prompt": "q", "response": "no", "model": "out/m"}
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for pr, resp in zip(prompts, responses, strict=True):
            row = {**pr.to_dict(), "prompt": pr.text, "response": resp, "model": model}
            del row["text"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def load_responses(path) -> tuple[str, list[Prompt], list[str]]:
    """Read a responses JSONL written by :func:`save_responses` (for re-judging).

    A line without ``id`` gets ``<file stem>:<line index>``, one without ``model``
    the file stem, and a null response reads as "".

    Args:
        path: the JSONL file.

    Returns:
        (model path, prompts, responses).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     f = save_responses(f"{d}/m.jsonl", "out/m", [Prompt("s:0", "q")], ["no"])
        ...     load_responses(f)
        ('out/m', [Prompt(id='s:0', text='q', category=None, subcategory=None)], ['no'])
    """
    p = Path(path)
    if not p.is_file():
        raise RestaError(f"responses file {p} not found: pass a responses/*.jsonl written by `resta-fast eval --out`")
    prompts, responses, models = [], [], set()
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):  # `5` or `"x"` are valid JSON: say so, not AttributeError
                raise TypeError(f"a JSON {type(row).__name__}, not an object")
            prompts.append(
                Prompt(
                    id=str(row.get("id", f"{p.stem}:{n - 1}")),
                    text=row["prompt"],
                    category=row.get("category"),
                    subcategory=row.get("subcategory"),
                )
            )
            responses.append(row["response"] if row["response"] is not None else "")
            models.add(row.get("model") or p.stem)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RestaError(
                f"{p}: line {n} is not a responses record ({type(e).__name__}: {e}); each line needs "
                "'prompt' and 'response'"
            ) from e
    if len(models) > 1:
        raise RestaError(f"{p} mixes responses of several models ({sorted(models)}); keep one model per file")
    if not prompts:
        raise RestaError(f"{p} holds no responses")
    return models.pop(), prompts, responses
