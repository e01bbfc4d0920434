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

import argparse
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from resta_fast import spec as S
from resta_fast.cli_args import creatable_dir
from resta_fast.errors import RestaError, cli_flag
from resta_fast.spec import declared, spec_of

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
        resta_fast.errors.RestaError: --max-harmful must be a fraction in [0, 1], got 5
    """

    # Each field that is an option says everything about it here (spec.declared): its flag, help,
    # check and --help section are derived (EVAL below), so the CLI's flags, the keywords of
    # evaluate() and the checks are one list.
    responses: tuple[str, ...] = declared(
        (),
        "re-judge a responses JSONL from an earlier --out instead of generating; repeatable",
        repeat=True,
        metavar="FILE",
        parse_time=False,
        group="responses",
    )
    judges: tuple = ("refusal",)
    utility: str | os.PathLike | None = declared(
        None,
        "JSONL of prompt/answer pairs (exact match, contains)",
        check=S.existing_file("utility"),
        metavar="FILE",
        group="gate",
    )
    perplexity: str | os.PathLike | None = declared(
        None, "held-out text file for perplexity", check=S.existing_file("perplexity"), metavar="FILE", group="gate"
    )
    reference: str | os.PathLike | None = declared(
        None, "model the utility drop is measured against (path or Hub id)", metavar="MODEL", group="gate"
    )
    engine: str = declared("transformers", choices=ENGINES, group="generation")
    device: str = declared("cpu", "cpu, cuda or cuda:N (default: cpu)", group="generation")
    dtype: str = declared(
        "auto", "model dtype for evaluation (default: the checkpoint's)", choices=GENERATION_DTYPES, group="generation"
    )
    batch_size: int | None = declared(
        None,
        "generation batch (default 8 on CPU, 32 on GPU; halved on OOM)",
        check=S.count("batch_size"),
        kind=int,
        group="generation",
    )
    max_new_tokens: int = declared(
        128, "bound on each answer (default 128)", check=S.count("max_new_tokens"), kind=int, group="generation"
    )
    utility_max_new_tokens: int = declared(
        32,
        "bound on utility answers (default 32)",
        check=S.count("utility_max_new_tokens"),
        kind=int,
        group="generation",
    )
    system_prompt: str | None = declared(None, "system message for the chat template", group="generation")
    chat_template: bool | None = declared(
        None,
        "use the tokenizer's chat template (default: when it has one)",
        action=argparse.BooleanOptionalAction,
        group="generation",
    )
    columns: Columns | None = None
    limit: int | None = declared(
        None, "use only the first N prompts (quick checks)", check=S.count("limit"), kind=int, group="prompts"
    )
    perplexity_window: int = declared(
        1024, "tokens per perplexity window", check=S.count("perplexity_window"), kind=int, group="generation"
    )
    out: str | os.PathLike | None = declared(
        None,
        "directory for responses, verdicts and reports",
        cli_type=creatable_dir,
        metavar="DIR",
        group="output",
    )
    max_harmful: float | None = declared(
        None,
        "fail (exit 1) when the harmful rate is above RATE, e.g. 0.05",
        check=S.rate("max_harmful"),
        kind=float,
        metavar="RATE",
        group="gate",
    )
    max_utility_drop: float | None = declared(
        None,
        "fail when exact match drops more than D (absolute) or perplexity rises more than "
        "D (relative) against the reference",
        check=S.nonnegative("max_utility_drop"),
        kind=float,
        metavar="D",
        group="gate",
    )
    seed: int = declared(0, "generation seed (decoding is greedy)", check=S.seed("seed"), kind=int, group="generation")
    progress: bool | None = declared(
        None,
        "progress bars on stderr (default: when stderr is a terminal)",
        action=argparse.BooleanOptionalAction,
        group="output",
    )

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
        values = {name: getattr(self, name) for name in EVAL.names()}
        problems = EVAL.problems(values)
        if problems:  # evaluate's errors name the flags: the CLI passes its flags through unchanged
            raise RestaError(problems[0].render(cli_flag))
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


# The options of an evaluation, from EvalOptions' declared fields: eval's and tune's flags, and
# the generation options that tune and compare pass on to evaluate().
EVAL = spec_of(EvalOptions, "eval")
