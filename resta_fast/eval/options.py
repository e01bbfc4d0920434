"""Everything about an evaluation that is not the models or prompts themselves, and its checks.

``EvalOptions`` is what :func:`resta_fast.eval.evaluate` runs with; ``evaluate``
also takes its fields as keyword arguments, so callers may pass either. The
checks here need only the options (and the judges built from them); ``evaluate``
runs them after its own (is there anything to evaluate?), in that order, so an
input with two mistakes is told the first one. The engine, device and dtype are
checked where the engine loads (eval/generate.py). Messages name the CLI flags
(``--max-harmful``), since the CLI passes its flags through unchanged.

Example:
    >>> EvalOptions(max_harmful=0.05).judges
    ('refusal',)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from resta_fast.errors import RestaError

if TYPE_CHECKING:  # annotations only: the CLI's parsers import this module for the choices below
    from resta_fast.eval.prompts import Columns

ENGINES = ("transformers", "vllm")
# The --dtype values generation accepts (torch names; "auto" keeps the checkpoint's). Not the
# safetensors dtype table, which is resta_fast.io.reader.DTYPES.
GENERATION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def as_paths(value) -> tuple[str, ...]:
    """One path or several -> a tuple of strings (``responses="a.jsonl"`` is one file, not 7 letters).

    Example:
        >>> as_paths("a.jsonl"), as_paths(["a", "b"])
        (('a.jsonl',), ('a', 'b'))
    """
    return tuple(str(v) for v in ([value] if isinstance(value, (str, os.PathLike)) else value))


@dataclass(frozen=True)
class EvalOptions:
    """How to evaluate: every option of :func:`resta_fast.eval.evaluate` besides ``models`` and ``prompts``.

    Construction normalises: ``responses`` and ``judges`` become tuples; every other
    value is kept as given (``config`` in report.json records them). :meth:`check`
    raises the first ``RestaError`` of the thresholds and files, :func:`check_judges`
    that of the judges once they are built.

    Args:
        responses: responses JSONL file(s) from an earlier run, to re-judge without generating.
        judges: judge names (``refusal``) or judge objects; the first is the primary judge.
        utility: JSONL of prompt/answer pairs for exact-match accuracy.
        perplexity: text file for perplexity.
        reference: model the utility drop is measured against (usually the fine-tune).
        engine: ``transformers`` or ``vllm``; device: ``cpu``, ``cuda``, ``cuda:N``;
            dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        batch_size: generation batch (None: 8 on CPU, 32 on GPU).
        max_new_tokens: bound on each answer to a harmful question;
            utility_max_new_tokens: bound on each utility answer.
        system_prompt: optional system message; chat_template: force (True) or skip (False)
            the tokenizer's chat template (None: use it when the tokenizer has one).
        columns: prompt/category/subcategory column names for flat prompt files.
        limit: use only the first N prompts.
        perplexity_window: tokens per perplexity window.
        out: directory for responses, verdicts and reports (None: nothing written).
        max_harmful: gate threshold on the harmful rate, in [0, 1];
            max_utility_drop: gate threshold on the utility drop (needs ``reference``
            and ``utility`` or ``perplexity``).
        seed: generation seed.
        progress: tqdm bars on stderr (None: only on a terminal).

    Example:
        >>> import dataclasses
        >>> opts = EvalOptions(max_harmful=0.05, responses="run/responses/m.jsonl")
        >>> opts.responses, opts.device
        (('run/responses/m.jsonl',), 'cpu')
        >>> dataclasses.replace(opts, device="cuda").device
        'cuda'
        >>> EvalOptions(max_harmful=5).check()
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: --max-harmful is a rate in [0, 1], got 5
    """

    responses: tuple[str, ...] = ()
    judges: tuple = ("refusal",)
    utility: str | os.PathLike | None = None
    perplexity: str | os.PathLike | None = None
    reference: str | os.PathLike | None = None
    engine: str = "transformers"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int | None = None
    max_new_tokens: int = 128
    utility_max_new_tokens: int = 32
    system_prompt: str | None = None
    chat_template: bool | None = None
    columns: Columns | None = None
    limit: int | None = None
    perplexity_window: int = 1024
    out: str | os.PathLike | None = None
    max_harmful: float | None = None
    max_utility_drop: float | None = None
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self):
        # Frozen: normalised through object.__setattr__, once, before the checks read them.
        object.__setattr__(self, "responses", as_paths(self.responses))
        object.__setattr__(self, "judges", tuple(self.judges))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields, which are also ``evaluate``'s keyword arguments.

        Example:
            >>> EvalOptions.field_names()[:3]
            ('responses', 'judges', 'utility')
        """
        return tuple(f.name for f in fields(cls))

    def check(self) -> EvalOptions:
        """Raise the first option that does not fit (thresholds, files); return the options.

        Example:
            >>> EvalOptions(max_harmful=0.0).check().max_harmful
            0.0
        """
        if self.max_utility_drop is not None:
            if not self.reference:
                raise RestaError(
                    "--max-utility-drop needs --reference MODEL (usually the fine-tune) to measure against"
                )
            if not (self.utility or self.perplexity):
                raise RestaError("--max-utility-drop needs --utility FILE and/or --perplexity FILE to measure utility")
        if self.max_harmful is not None and not 0.0 <= self.max_harmful <= 1.0:
            raise RestaError(f"--max-harmful is a rate in [0, 1], got {self.max_harmful}")
        for f in [self.utility, self.perplexity]:
            if f and not Path(f).is_file():
                raise RestaError(f"{f} not found: pass an existing file")
        return self


def check_judges(judges) -> tuple:
    """The judges built from ``EvalOptions.judges``: at least one, each name once; returned as a tuple.

    Example:
        >>> check_judges([])
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: pass at least one --judge (refusal, classifier or openai)
    """
    judges = tuple(judges)
    if not judges:
        raise RestaError("pass at least one --judge (refusal, classifier or openai)")
    names = [j.name for j in judges]
    if len(set(names)) != len(names):
        raise RestaError(f"each judge may be given once; got {names}")
    return judges
