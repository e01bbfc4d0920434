"""An option, written once: its name, default, check and help, and every form derived from it.

A command family lists its options as one ``Spec``: ``options.PATCH`` (patch and a batch
job), ``options.VECTOR``, ``batch.manifest.BATCH`` (a batch's run settings),
``safelora.SAFELORA``, ``safemerge.SAFEMERGE``, and ``eval.options.EVAL`` (declared on
``EvalOptions``' fields). From that one list come the command-line flags (name, type, help, the
check at parse time), the batch manifest's keys (with "did you mean"), the API's
keywords and their defaults, the provenance's ``params``, and the model card's
"how to reproduce" command. Adding an option is one new ``Option`` in one spec.

Each check speaks the library's words (``OptionError("beta", "{beta} must ...")``):
the CLI renders ``{beta}`` as its flag, the manifest loader as its key under the
job that set it. Nothing here opens a file or imports torch.

Example:
    >>> s = Spec("demo", (Option("beta", 1.0, "scale", check=finite("beta"), kind=float),))
    >>> s.check({"beta": 2})
    ({'beta': 2}, [])
    >>> [str(e) for e in s.check({"beta": "x"})[1]]
    ["beta must be a finite number, got 'x'"]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.errors import FLAG_SPELLINGS, OptionError

MAX_SEED = 2**64 - 1


def shown(value) -> str:
    """A value as an error shows it: numbers plainly (the CLI's ``got inf``), the rest quoted."""
    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _bounded(what: str, ok: Callable, *, integral: bool = False, optional: bool = False):
    """A check factory: ``name`` gets a check accepting numbers that satisfy ``ok``."""

    def factory(name: str, *, optional: bool = optional):
        def check(value):
            if optional and value is None:
                return None
            good = isinstance(value, numbers.Integral) if integral else is_real(value)
            if not good or isinstance(value, bool) or (not integral and not math.isfinite(value)) or not ok(value):
                raise OptionError(name, "{" + name + "} must be " + what + ", got {got}", got=shown(value))
            return value

        return check

    return factory


finite = _bounded("a finite number", lambda v: True)
probability = _bounded("a drop probability in [0, 1)", lambda v: 0 <= v < 1, optional=True)
seed = _bounded("an integer in [0, 2**64)", lambda v: 0 <= v <= MAX_SEED, integral=True)
count = _bounded("an integer >= 1", lambda v: v >= 1, integral=True, optional=True)
index = _bounded("an integer >= 0", lambda v: v >= 0, integral=True, optional=True)


def cosine(name: str, *, optional: bool = False):
    """A check: a finite number first (what a typo gets told), then one in [-1, 1]."""
    number, ranged = finite(name, optional=optional), _bounded("a cosine in [-1, 1]", lambda v: -1 <= v <= 1)(name)
    return lambda value: None if optional and value is None else ranged(number(value))


fraction = _bounded("a fraction in (0, 1]", lambda v: 0 < v <= 1, optional=True)
positive = _bounded("a finite number > 0", lambda v: v > 0, optional=True)
rate = _bounded("a fraction in [0, 1]", lambda v: 0 <= v <= 1, optional=True)
nonnegative = _bounded("a finite number >= 0", lambda v: v >= 0, optional=True)


def as_given(value):
    """A ``record``: the value as it was given (``beta=1`` stays 1 in the headers)."""
    return value


def always(flag: str, name: str):
    """A ``reproduce``: the flag and the recorded value even when it is the default (said outright)."""

    def given_back(params: dict) -> list[str]:
        value = params.get(name)
        return [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]

    return given_back


def one_of(name: str, choices: tuple):
    """A check: ``value`` is one of ``choices``."""

    def check(value):
        if value not in choices:
            raise OptionError(
                name, "{" + name + "} must be one of " + ", ".join(choices) + ", got {got}", got=shown(value)
            )
        return value

    return check


@dataclass(frozen=True)
class Option:
    """One option of a command family.

    Args:
        name: the library's name (the API keyword, the manifest key, ``{name}`` in errors).
        default: the API's and the manifest's default (and the CLI's, but where ``cli_default`` says).
        help: the ``--help`` line.
        check: ``value -> value`` (the value as it is kept) or raise ``OptionError(name, ...)``.
            Runs once wherever the value comes from.
        kind: how a flag's text (and a manifest's number) becomes a value: ``float``, ``int``, ``str``.
        flag: the CLI spelling (default ``--name`` with dashes); ``""``: no flag (the API's knob).
        parse_time: the CLI runs ``check`` while parsing (one line naming the flag and ``--help``);
            False: when the options are built, the message rendered with the flag.
        repeat: a flag given several times (``append``); the API takes a list or one string.
        choices: the CLI lists them (argparse's choices); the check still decides.
        metavar, nargs: as argparse's (``nargs=2``: ``--weights W1 W2``).
        manifest: ``"job"`` (a job key or a default at the top), ``"top"`` (a run setting), or None.
        record: ``value -> the value as recorded`` in the provenance's ``params`` (None: not recorded).
        reproduce: the flags that give this value back in the model card's command, from the
            recorded ``params`` (None: derived: the flag and value when it is not the default).
        cli_default, to_api: the flag's own default and unit (``--gpu-pool-mb`` is MiB, the API bytes).
        each: with ``nargs``, the check of one of its values (the CLI's, as each is parsed).
        action: an argparse action of its own (``BooleanOptionalAction``: ``--x`` / ``--no-x``).
        cli_type: a check of the flag's text only (a directory that can be created: the library
            makes it, the command line refuses one that cannot be, before any work).
        group: the section of ``--help`` it is listed in (``add_arguments(section=...)``).
    """

    name: str
    default: object = None
    help: str = ""
    check: Callable | None = None
    kind: Callable = str
    flag: str | None = None
    parse_time: bool = True
    repeat: bool = False
    choices: tuple = ()
    metavar: str | None = None
    nargs: int | None = None
    manifest: str | None = "job"
    record: Callable | None = None
    reproduce: Callable | None = None
    cli_default: object = field(default=None, compare=False)
    to_api: Callable | None = None
    each: Callable | None = None
    action: object = None
    cli_type: Callable | None = None
    group: str | None = None

    @property
    def cli(self) -> str:
        """The flag (``--beta-rule``), or ``""`` when the option has none."""
        return self.flag if self.flag is not None else "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        """The parsed flag's attribute (``--beta-rule`` -> ``beta_rule``; renamed copies keep theirs apart)."""
        return self.cli.lstrip("-").replace("-", "_")

    def run_check(self, value):
        return self.check(value) if self.check is not None else value

    def parse_text(self, text: str):
        """A flag's text as a value, checked (``argparse``'s ``type=``): errors say what is wanted."""
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = text  # the check then names what was wanted and shows what came
        if not self.parse_time:
            return value
        try:
            return (self.each or self.run_check)(value)
        except OptionError as exc:
            what = exc.render(lambda name: "")  # "{beta} must be" -> " must be"
            raise argparse.ArgumentTypeError(what.lstrip()) from None

    def args_of(self, value) -> list[str]:
        """The flags a recorded ``value`` is given back by (the card's command)."""
        if not self.cli or value is None or value == self.default or value in ((), []):
            return []
        if self.kind is bool:
            return [self.cli] if value else []
        items = value if self.repeat or self.nargs else [value]
        if self.nargs:
            return [self.cli, *map(str, items)]
        return [a for item in items for a in (self.cli, str(item))]


@dataclass
class Spec:
    """The options of one command family, in the order flags, keywords and params show them.

    Everything is derived from ``options`` when it is asked for, so an option added to it
    (one edit) is at once a flag, a manifest key, an API keyword and, when recorded, a
    ``params`` entry and part of the card's command.
    """

    command: str
    options: tuple[Option, ...]
    spells: bool = True  # its flags are how errors spell its options (errors.cli_flag); not a renamed copy's

    def __post_init__(self):
        for o in self.options if self.spells else ():
            if o.cli and o.cli != "--" + o.name.replace("_", "-"):
                FLAG_SPELLINGS[o.name] = o.cli

    def subset(self, names: Iterable[str]) -> Spec:
        """These options only (in the spec's order), for a command that takes some of them as they are."""
        wanted = set(names)
        return Spec(self.command, tuple(o for o in self.options if o.name in wanted), spells=False)

    def renamed(self, flags: dict[str, tuple[str, str]]) -> Spec:
        """The options of ``flags`` under other flags and help, for a command that takes them beside
        others of the same name (``compare``'s ``--resta-dare``): the same checks, defaults and keywords.

        Example:
            >>> s = Spec("s", (Option("seed", 0, check=seed("seed"), kind=int),), spells=False)
            >>> s.renamed({"seed": ("--dare-seed", "DARE's seed")}).get("seed").cli
            '--dare-seed'
        """
        return Spec(
            self.command,
            tuple(dataclasses.replace(self.get(n), flag=flag, help=help) for n, (flag, help) in flags.items()),
            spells=False,
        )

    def __iter__(self):
        return iter(self.options)

    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def get(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def check(self, values: dict) -> tuple[dict, list[OptionError]]:
        """(every option's value as kept, every problem). Unknown names are a TypeError (a caller's bug)."""
        unknown = [k for k in values if k not in self.names()]
        if unknown:
            raise TypeError(f"unknown {self.command} option(s): {', '.join(unknown)}")
        kept, problems = {}, []
        for o in self.options:
            value = values.get(o.name, o.default)
            try:
                kept[o.name] = o.run_check(value)
            except OptionError as exc:
                problems.append(exc)
                kept[o.name] = value
        return kept, problems

    def problems(self, values: dict) -> list[OptionError]:
        """Every problem of ``values`` (empty: they are valid)."""
        return self.check(values)[1]

    def params(self, values: dict) -> dict:
        """The provenance's ``params``: the recorded options, as recorded."""
        return {o.name: o.record(values[o.name]) for o in self.options if o.record is not None}

    def recorded(self, params: dict) -> dict:
        """The options a provenance's ``params`` recorded, as keywords that rebuild them (verify).

        Example:
            >>> Spec("s", (Option("beta", 1.0, record=lambda v: v),)).recorded({"beta": 0.5, "other": 1})
            {'beta': 0.5}
        """
        return {o.name: params[o.name] for o in self.options if o.record is not None and o.name in params}

    def reproduce(self, params: dict) -> list[str] | None:
        """Flags giving the recorded ``params`` back, in the spec's order (the card's command);
        None when a value was set that only the API takes (no flag can give it back)."""
        args: list[str] = []
        for o in self.options:
            if o.record is None or o.name not in params:
                continue
            if not o.cli and params[o.name] not in (None, o.default, (), []):
                return None
            args += o.reproduce(params) if o.reproduce is not None else o.args_of(params[o.name])
        return args

    def keywords(self, func: Callable) -> Callable:
        """Decorate ``func(..., **options)``: its signature (``help()``, ``inspect``) lists every
        option as a keyword with its default, and a keyword no option has is a TypeError naming it.

        Example:
            >>> s = Spec("f", (Option("beta", 1.0),))
            >>> f = s.keywords(lambda x, **options: options)
            >>> str(inspect.signature(f))
            '(x, *, beta=1.0)'
        """
        sig = inspect.signature(func)
        fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in fixed}
        extra = [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
            for o in self.options
            if o.name not in taken
        ]

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for key in kwargs:
                if key not in taken and key not in self.names():
                    raise TypeError(f"{func.__name__}() got an unexpected keyword argument {key!r}")
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=fixed + extra)
        return wrapper

    # --- the command line -------------------------------------------------------------------

    def add_arguments(
        self,
        parser,
        *,
        only: Iterable[str] | None = None,
        group=None,
        section: str | None = None,
        required=(),
        unset: bool = False,
    ) -> None:
        """Add the flags of the options to ``parser`` (or its ``group``), in the spec's order:
        ``only`` these, or those of ``section``; ``required``: options the command needs;
        ``unset``: a flag not given is None (another source decides: a batch's manifest)."""
        wanted = None if only is None else set(only)
        for o in self.options:
            if not o.cli or (wanted is not None and o.name not in wanted):
                continue
            if section is not None and o.group != section:
                continue
            kw: dict = {"dest": o.dest, "help": o.help}
            if o.name in required:
                kw["required"] = True
            if o.action is not None:
                kw.update(action=o.action, default=o.default)
            elif o.kind is bool:
                kw.update(action="store_true")
            else:
                kw.update(type=o.cli_type or o.parse_text, metavar=o.metavar)
                kw["default"] = o.cli_default if o.cli_default is not None else o.default
                if o.repeat:
                    kw.update(action="append", default=[])
                if o.choices:
                    kw.update(choices=o.choices, type=None)
                if o.nargs:
                    kw["nargs"] = o.nargs
                    kw["default"] = list(o.default) if o.default is not None else None
                if unset:
                    kw["default"] = None
            (group if group is not None else parser).add_argument(o.cli, **kw)

    def from_args(self, args, *, only: Iterable[str] | None = None, section: str | None = None) -> dict:
        """The API keywords of the parsed flags (``only``/``section``: as ``add_arguments``)."""
        wanted = None if only is None else set(only)
        out = {}
        for o in self.options:
            if section is not None and o.group != section:
                continue
            if o.cli and (wanted is None or o.name in wanted) and hasattr(args, o.dest):
                value = getattr(args, o.dest)
                out[o.name] = o.to_api(value) if o.to_api is not None and value is not None else value
        return out

    def flag_of(self, name: str) -> str | None:
        """The CLI flag of the library name ``name`` (None: not an option of this spec, or no flag)."""
        for o in self.options:
            if o.name == name:
                return o.cli or None
        return None

    # --- the batch manifest -----------------------------------------------------------------

    def manifest_keys(self, where: str = "job") -> tuple[str, ...]:
        return tuple(o.name for o in self.options if o.manifest == where)


def declared(default, help: str = "", **option) -> dataclasses.Field:
    """A dataclass field that is also an option: ``spec_of`` reads it (the dataclass is the spec).

    Example:
        >>> @dataclasses.dataclass
        ... class Opts:
        ...     limit: int | None = declared(None, "use only the first N", check=count("limit"), kind=int)
        >>> spec_of(Opts, "demo").get("limit").help
        'use only the first N'
    """
    return dataclasses.field(default=default, metadata={"option": {"help": help, **option}})


def spec_of(cls, command: str) -> Spec:
    """The ``Spec`` of a dataclass whose option fields are ``declared`` (the others are not options)."""
    return Spec(
        command,
        tuple(
            Option(f.name, f.default, **f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata
        ),
    )


def existing_file(name: str):
    """A check: a path to a file that exists (None: not given)."""

    def check(value):
        if value is not None and not Path(value).is_file():
            found = "a directory" if Path(value).is_dir() else "missing"
            raise OptionError(name, "{" + name + "} needs an existing file: {got} is " + found, got=str(value))
        return value

    return check


def unknown_key(key: str, allowed, where: str) -> str:
    """A manifest's unknown key, with the closest allowed one ("did you mean")."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
    return f"{where}: unknown key {key!r}{hint}"
