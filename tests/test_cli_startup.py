"""The CPU path never imports torch, and building the CLI imports nothing heavy.

Each command runs in a fresh interpreter that reports, once the command is
done, whether ``torch`` (or any ``torch.*``) was ever imported; so an import
of torch that creeps back anywhere on these paths fails here. torch stays for
what really uses it: the torch reference backend, Triton/GPU, LoRA merging,
eval, tune and the demo (and ``env``, which reports its version).
"""

import json
import subprocess
import sys

import pytest
from checkpoints import three_models

from resta_fast.kernels import backend_status

CPP = backend_status()["cpp"] == "ok"
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension is not built: the torch backend would be used")

RUN = r"""
import sys
from resta_fast.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "triton"))
print("IMPORTED:" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run(*argv, cwd=None) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", RUN, *map(str, argv)], capture_output=True, text=True, cwd=cwd)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTED:")]
    assert line, proc.stderr
    heavy = [m for m in line[-1][len("IMPORTED:") :].split(",") if m]
    return proc.returncode, heavy, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    ft, al, un = three_models(root, vocab=16, hidden=8, layers=1, inter=12, shards=2)
    return root, ft, al, un


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["patch", "--help"],
        ["batch", "--help"],
        ["verify", "--help"],
        ["inspect", "--help"],
        ["push", "--help"],
        ["eval", "--help"],
        ["demo", "--help"],
        ["patch", "--finetuned", "x", "--out", "y", "--beta", "nan"],
    ],
)
def test_help_and_argument_errors_import_nothing_heavy(argv):
    code, heavy, out = run(*argv)
    assert code in (0, 2), out
    assert heavy == [], f"{argv} imported {heavy}"


@needs_cpp
@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_patch_vector_verify_and_inspect_on_the_cpu_never_import_torch(world, backend):
    """Including ``verify --against``, which recomputes its sample with the C++ kernel."""
    root, ft, al, un = world
    out, vec, out_v = root / f"out_{backend}", root / f"vec_{backend}", root / f"out_vec_{backend}"
    steps = [
        [
            "patch",
            "--finetuned",
            ft,
            "--aligned",
            al,
            "--unaligned",
            un,
            "--out",
            out,
            "--backend",
            backend,
            "--dare",
            "0.2",
            "--no-fsync",
            "--no-progress",
        ],
        ["vector", "--aligned", al, "--unaligned", un, "--out", vec, "--no-fsync", "--no-progress"],
        [
            "patch",
            "--finetuned",
            ft,
            "--vector",
            vec,
            "--out",
            out_v,
            "--backend",
            backend,
            "--no-fsync",
            "--no-progress",
        ],
        ["verify", out],
        ["verify", out, "--against", ft, al, un, "--samples", "2000"],
        ["verify", out_v, "--against", ft, vec, "--samples", "2000"],
        ["inspect", ft, "--aligned", al, "--unaligned", un],
    ]
    for argv in steps:
        code, heavy, text = run(*argv)
        assert code == 0, f"{argv[0]}: {text}"
        assert heavy == [], f"{argv[0]} imported {heavy}"
    report = json.loads((out / "resta_fast.json").read_text())
    assert report["backend"] == "cpp"


@needs_cpp
def test_a_local_batch_never_imports_torch(world):
    root, ft, al, un = world
    manifest = root / "batch.json"
    manifest.write_text(
        json.dumps(
            {
                "aligned": str(al),
                "unaligned": str(un),
                "fsync": False,
                "backend": "cpp",
                "jobs": [
                    {"finetuned": str(ft), "out": str(root / "b1"), "beta": 0.5},
                    {"finetuned": str(ft), "out": str(root / "b2"), "dare": 0.3},
                ],
            }
        )
    )
    code, heavy, text = run("batch", manifest, "--no-progress")
    assert code == 0, text
    assert heavy == [], f"batch imported {heavy}"
    assert (root / "b1" / "resta_fast.json").is_file() and (root / "b2" / "resta_fast.json").is_file()


def test_the_torch_backend_does_import_torch(world):
    """The check can fail: the torch reference backend is a real torch user."""
    root, ft, al, un = world
    code, heavy, text = run(
        "patch",
        "--finetuned",
        ft,
        "--aligned",
        al,
        "--unaligned",
        un,
        "--out",
        root / "out_torch",
        "--backend",
        "torch",
        "--no-fsync",
        "--no-progress",
    )
    assert code == 0, text
    assert "torch" in heavy


@pytest.mark.parametrize(
    "argv, what",
    [
        (["demo", "--out", "{tmp}/demo"], "the demo"),
        (["eval", "--model", "{tmp}", "--prompts", "builtin:smoke"], "`resta-fast eval --model`"),
        (
            [
                "tune",
                "--finetuned",
                "{tmp}",
                "--aligned",
                "{tmp}",
                "--unaligned",
                "{tmp}",
                "--betas",
                "0.5",
                "--prompts",
                "builtin:smoke",
                "--max-harmful",
                "0.1",
            ],
            "`resta-fast tune`",
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path, argv, what):
    """Without transformers (the [eval] extra), demo/eval/tune say what to install, exit 2."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # as if it were not installed
        "from resta_fast.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        f"resta-fast: error: {what} needs transformers, which is not installed: pip install 'resta-fast[eval]'"
    ], proc.stderr
    assert not (tmp_path / "demo").exists()
