"""The error types (resta_fast/errors.py): exit code 2, option names in the library's
words until rendered, and rendered as flags that `patch` really has."""

import argparse
import pickle

from resta_fast.cli import build_parser
from resta_fast.errors import CheckpointError, OptionError, RestaError, cli_flag
from resta_fast.options import PatchOptions

# Input roles are options too (OptionError("dare_base", ...) from resolve_roles).
ROLES = ("finetuned", "aligned", "unaligned", "vector", "dare_base", "base")
# PatchOptions fields the CLI never sets, so no CLI message names them: the API's knob.
API_ONLY = {"chunk_elems"}


def patch_flags() -> set[str]:
    sub = next(a for a in build_parser("patch")._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices["patch"]._option_string_actions)


def test_every_option_is_spelled_as_a_real_patch_flag():
    options = [name for name in PatchOptions.spec.names() if name not in API_ONLY]
    assert "beta_rules" in options and "gpu_pool_bytes" in options  # the two renamed ones are still fields
    flags = patch_flags()
    missing = {name: cli_flag(name) for name in [*options, *ROLES] if cli_flag(name) not in flags}
    assert missing == {}, f"error messages would name flags `patch` does not have: {missing}"


def test_an_error_is_exit_2_and_renders_as_its_message():
    for exc in (RestaError("x"), CheckpointError("model.safetensors: truncated"), OptionError("beta", "{beta} bad")):
        assert isinstance(exc, RestaError) and exc.exit_code == 2
    assert CheckpointError("m: truncated").render(cli_flag) == "m: truncated"  # no option names to spell
    assert OptionError("beta", "{beta} bad").render(cli_flag) == "--beta bad"


def test_option_error_pickles_with_its_template():
    exc = OptionError("dare_base", "{dare} needs {dare_base}: got {x!r}", x="{odd}")
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == str(exc) == "dare needs dare_base: got '{odd}'"
    assert back.render(cli_flag) == "--dare needs --dare-base: got '{odd}'"
