"""PatchOptions and OptionError: one place for every option check, in the library's words (roles: test_roles.py)."""

import subprocess
import sys

import pytest

from resta_fast.errors import OptionError, RestaError, cli_flag
from resta_fast.options import BetaRule, PatchOptions


def test_options_keep_values_as_given_and_parse_rules_and_dtype():
    opts = PatchOptions(beta=1, dare=0.25, seed=3, include="mlp", beta_rules=["attn=0.3"], dtype="bf16")
    assert opts.beta == 1 and isinstance(opts.beta, int)  # recorded in the headers as given
    assert opts.include == ("mlp",) and opts.beta_rules == (BetaRule("attn", 0.3),) and opts.out_dtype == "BF16"
    assert opts.params() == {
        "beta": 1,
        "dare": 0.25,
        "seed": 3,
        "include": ["mlp"],
        "exclude": [],
        "beta_rules": ["attn=0.3"],
        "dtype": "BF16",
    }


@pytest.mark.parametrize(
    "field, value, library, cli",
    [
        ("beta", float("inf"), "beta must be a finite number, got inf", "--beta must be a finite number, got inf"),
        ("dare", 1.0, "dare must be a drop probability in [0, 1), got 1.0", "--dare must be a drop probability"),
        ("seed", -1, "seed must be an integer in [0, 2**64), got -1", "--seed must be an integer"),
        ("dtype", "int8", "dtype 'int8' is not supported", "--dtype 'int8' is not supported"),
        ("beta_rules", ["noequals"], "beta_rules 'noequals': expected REGEX=BETA", "--beta-rule 'noequals'"),
        ("include", ["("], "include '(' is not a valid regular expression", "--include '(' is not a valid"),
        ("device", "tpu", "device 'tpu': expected auto, cpu, cuda or cuda:N", "--device 'tpu': expected"),
        ("backend", "gpu", "backend must be one of auto, cpp, triton, torch, got 'gpu'", "--backend must be"),
        ("threads", 0, "threads must be an integer >= 1, got 0", "--threads must be"),
        ("staging", "disk", "staging must be one of auto, mmap, read, got 'disk'", "--staging must be"),
    ],
)
def test_a_bad_option_is_named_in_library_words_and_rendered_as_a_flag(field, value, library, cli):
    with pytest.raises(OptionError) as info:
        PatchOptions(**{field: value})
    exc = info.value
    assert isinstance(exc, RestaError) and exc.option == field
    assert str(exc).startswith(library), str(exc)
    assert exc.render(cli_flag).startswith(cli), exc.render(cli_flag)
    assert "--" not in str(exc)


def test_problems_of_lists_every_problem():
    problems = PatchOptions.problems_of(beta="big", dare=1.5, seed=True, dtype=3, device="tpu")
    assert [p.option for p in problems] == ["beta", "dare", "seed", "dtype", "device"]
    assert str(problems[0]) == "beta must be a finite number, got 'big'"
    assert PatchOptions.problems_of(beta=0.5, dare=0.1) == []


def test_options_module_imports_no_torch():
    code = "import sys, resta_fast.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
