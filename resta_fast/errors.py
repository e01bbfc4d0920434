"""The one error type users see: a clear message, exit code 2, no traceback."""

from __future__ import annotations

from collections.abc import Callable


class RestaError(Exception):
    """Bad input or a refused operation; the message names file/tensor and the fix."""

    exit_code = 2

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with option names spelled by ``spell`` (the CLI: ``beta`` -> ``--beta``)."""
        return str(self)


class CheckpointError(RestaError):
    """A checkpoint file or directory is malformed or unreadable."""


class OptionError(RestaError):
    """An option has a bad value, or does not fit the others.

    The message speaks the library's words (``beta``, ``dare_base``); whoever
    knows how the user spelled them renders it: the CLI says ``--beta``, the
    batch manifest loader ``beta`` under its job.

    Args:
        option: the option at fault (library name).
        template: the message, naming options as ``{beta}``, ``{dare_base}``;
            values go in ``values`` (so braces inside them are kept as they are).
        values: ``{name}`` fields of ``template`` that are not option names.

    Example:
        >>> e = OptionError("beta", "{beta} must be a finite number, got {got!r}", got=float("inf"))
        >>> str(e), e.render(lambda o: "--" + o)
        ('beta must be a finite number, got inf', '--beta must be a finite number, got inf')
    """

    def __init__(self, option: str, template: str, **values):
        self.option = option
        self.template = template
        self.values = values
        super().__init__(self.render(lambda name: name))

    def render(self, spell: Callable[[str], str]) -> str:
        return self.template.format_map(_Spelled(self.values, spell))

    def __reduce__(self):  # pickles (Ray) with its template
        return (_rebuild, (type(self), self.option, self.template, self.values))


def _rebuild(cls, option, template, values):
    return cls(option, template, **values)


class _Spelled(dict):
    def __init__(self, values: dict, spell: Callable[[str], str]):
        super().__init__(values)
        self.spell = spell

    def __missing__(self, name: str) -> str:
        return self.spell(name)


# Flags not spelled by the rule below (``beta_rules`` -> ``--beta-rule``): every ``spec.Spec`` adds
# its own here when it is made, so the spelling is written once, with its option.
FLAG_SPELLINGS: dict[str, str] = {}


def cli_flag(option: str) -> str:
    """The command-line flag of a library option name: ``dare_base`` -> ``--dare-base``."""
    return FLAG_SPELLINGS.get(option) or "--" + option.replace("_", "-")
