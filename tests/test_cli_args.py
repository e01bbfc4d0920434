"""Every numeric and path flag of every sub-command refuses what makes no sense,
while the arguments are parsed: one line naming the flag, exit 2, nothing written
(resta_fast/cli_args.py)."""

import argparse

import pytest

from resta_fast import cli_args as A
from resta_fast.cli import main

# (sub-command, flag, bad value, what the one line must say). "{file}" / "{dir}" /
# "{missing}" are an existing file, an existing directory and a path that does not exist.
PROBES = [
    ("patch", "--threads", "-1", "--threads must be an integer >= 1, got -1"),
    ("patch", "--threads", "0", "--threads must be an integer >= 1, got 0"),
    ("patch", "--threads", "two", "--threads must be an integer >= 1, got 'two'"),
    ("patch", "--gpu-pool-mb", "0", "--gpu-pool-mb must be an integer >= 1"),
    ("patch", "--beta", "nan", "--beta must be a finite number, got nan"),
    ("patch", "--beta", "inf", "--beta must be a finite number, got inf"),
    ("patch", "--dare", "1", "--dare must be a drop probability in [0, 1), got 1.0"),
    ("patch", "--dare", "-0.1", "--dare must be a drop probability in [0, 1)"),
    ("patch", "--seed", "-1", "--seed must be an integer in [0, 2**64), got -1"),
    ("patch", "--seed", str(2**64), "--seed must be an integer in [0, 2**64)"),
    ("patch", "--max-harmful", "1.5", "--max-harmful must be a fraction in [0, 1], got 1.5"),
    ("patch", "--max-utility-drop", "-1", "--max-utility-drop must be a finite number >= 0"),
    ("patch", "--validate-max-new-tokens", "0", "--validate-max-new-tokens must be an integer >= 1"),
    ("patch", "--validate-utility", "{missing}", "--validate-utility needs an existing file"),
    ("patch", "--validate-perplexity", "{dir}", "--validate-perplexity needs an existing file"),
    ("patch", "--out", "{file}", "--out needs a directory"),
    ("vector", "--out", "{file}", "--out needs a directory"),
    ("batch", None, "{missing}", "manifest needs an existing file"),
    ("batch", "--group", "-1", "--group must be an integer >= 0, got -1"),
    ("batch", "--group-size", "0", "--group-size must be an integer >= 1"),
    ("batch", "--num-cpus", "0", "--num-cpus must be a finite number > 0"),
    ("batch", "--num-gpus", "-1", "--num-gpus must be a finite number >= 0"),
    ("batch", "--threads", "0", "--threads must be an integer >= 1"),
    ("batch", "--writers", "0", "--writers must be an integer >= 1"),
    ("batch", "--chunk-elems", "0", "--chunk-elems must be an integer >= 1"),
    ("batch", "--summary", "{dir}", "--summary needs a file"),
    ("batch", "--emit-slurm", "{file}", "--emit-slurm needs a directory"),
    ("eval", "--limit", "-3", "--limit must be an integer >= 1, got -3"),
    ("eval", "--max-new-tokens", "0", "--max-new-tokens must be an integer >= 1, got 0"),
    ("eval", "--utility-max-new-tokens", "0", "--utility-max-new-tokens must be an integer >= 1"),
    ("eval", "--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("eval", "--seed", "-1", "--seed must be an integer in [0, 2**64)"),
    ("eval", "--perplexity-window", "0", "--perplexity-window must be an integer >= 1"),
    ("eval", "--judge-retries", "-1", "--judge-retries must be an integer >= 0"),
    ("eval", "--judge-backoff", "-1", "--judge-backoff must be a finite number >= 0"),
    ("eval", "--judge-rps", "0", "--judge-rps must be a finite number > 0"),
    ("eval", "--judge-concurrency", "0", "--judge-concurrency must be an integer >= 1"),
    ("eval", "--judge-cache", "{dir}", "--judge-cache needs a file"),
    ("eval", "--utility", "{missing}", "--utility needs an existing file"),
    ("eval", "--perplexity", "{missing}", "--perplexity needs an existing file"),
    ("eval", "--max-harmful", "2", "--max-harmful must be a fraction in [0, 1]"),
    ("eval", "--max-utility-drop", "nan", "--max-utility-drop must be a finite number >= 0"),
    ("eval", "--out", "{file}", "--out needs a directory"),
    ("tune", "--workdir", "{file}", "--workdir needs a directory"),
    ("tune", "--workdir", "{file}/sub", "--workdir needs a directory that can be created"),
    ("tune", "--dare", "1", "--dare must be a drop probability in [0, 1)"),
    ("tune", "--dare-seed", "-1", "--dare-seed must be an integer in [0, 2**64)"),
    ("tune", "--max-new-tokens", "0", "--max-new-tokens must be an integer >= 1"),
    ("demo", "--out", "{file}", "--out needs a directory"),
    ("demo", "--seed", "-1", "--seed must be an integer in [0, 2**64)"),
    ("inspect", "--beta", "nan", "--beta must be a finite number, got nan"),
    ("verify", "--samples", "-1", "--samples must be an integer >= 0"),
    ("verify", "--seed", "-1", "--seed must be an integer in [0, 2**64)"),
]


@pytest.mark.parametrize(
    "command, flag, value, says", PROBES, ids=[f"{c}{' ' + f if f else ''}={v}" for c, f, v, _ in PROBES]
)
def test_a_bad_value_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, command, flag, value, says):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    paths = {
        "{file}": str(tmp_path / "a_file"),
        "{dir}": str(tmp_path / "a_dir"),
        "{missing}": str(tmp_path / "missing"),
    }
    for key, path in paths.items():
        value = value.replace(key, path)
    says = says.replace("{file}", paths["{file}"])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main([command, *([flag] if flag else []), value])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("resta-fast: error: "), err
    assert says in lines[0], lines[0]
    assert lines[0].endswith(f"(see resta-fast {command} --help)"), lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_every_numeric_flag_has_a_checked_type():
    """No sub-command flag takes a bare int/float (which would let -1, 0, nan or inf through)."""
    from resta_fast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, p in sub.choices.items()
        for action in p._actions
        if action.type in (int, float)
    ]
    assert bare == []


def test_good_values_pass_and_a_directory_to_create_is_accepted(tmp_path):
    assert A.count("4") == 4 and A.index("0") == 0 and A.seed(str(2**64 - 1)) == 2**64 - 1
    assert A.finite("-0.5") == -0.5 and A.probability("0") == 0.0 and A.rate("1") == 1.0
    assert A.nonnegative("0") == 0.0 and A.positive("0.5") == 0.5
    new = tmp_path / "new" / "deeper"
    assert A.creatable_dir(str(new)) == str(new) and not new.exists()  # checked, not made
    assert A.creatable_file(str(tmp_path / "summary.json"))


def test_help_is_exit_0(capsys):
    assert main(["patch", "--help"]) == 0
    assert "--staging" in capsys.readouterr().out
