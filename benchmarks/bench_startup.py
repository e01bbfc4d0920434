"""What a CI job or Slurm array task pays per call: whole-process times of short commands.

Each command runs as a fresh process, alternated round by round with
``python -c pass`` (the interpreter's own start-up, the floor); reported are the
median seconds and the median per-round difference over that floor:

    python -c pass       the floor
    --help               building the CLI
    env                  versions and backends (imports torch: it reports its version)
    patch                a tiny model (cpp backend), --no-fsync
    verify               that output's hashes and headers
    import torch         for scale: what the CPU path no longer pays

    python benchmarks/bench_startup.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from checkpoints import three_models  # the tests' tiny Llama-shaped models

    root = Path(tempfile.mkdtemp(prefix="resta_startup_"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        ft, al, un = three_models(root, vocab=256, hidden=64, layers=2, inter=128, shards=2)
        out = root / "out"
        py = sys.executable
        cmds = {
            "python -c pass": [py, "-c", "pass"],
            "--help": [py, "-m", "resta_fast", "--help"],
            "env": [py, "-m", "resta_fast", "env"],
            "patch": [
                py,
                "-m",
                "resta_fast",
                "patch",
                "--finetuned",
                str(ft),
                "--aligned",
                str(al),
                "--unaligned",
                str(un),
                "--out",
                str(out),
                "--overwrite",
                "--no-fsync",
                "--no-progress",
                "--backend",
                "cpp",
            ],
            "verify": [py, "-m", "resta_fast", "verify", str(out)],
            "import torch": [py, "-c", "import torch"],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for r in range(args.rounds):
            for name, cmd in cmds.items():
                times[name].append(timed(cmd, env))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
        floor = times["python -c pass"]
        summary = {
            name: {
                "median_s": statistics.median(v),
                "over_python_s": statistics.median(t - f for t, f in zip(v, floor, strict=True)),
            }
            for name, v in times.items()
        }
        print(f"\n{args.rounds} rounds, medians:")
        for name, s in summary.items():
            print(f"  {name:16s} {s['median_s']:6.3f} s   (+{s['over_python_s']:.3f} s over python -c pass)")
        if args.json:
            args.json.write_text(json.dumps({"rounds": args.rounds, "times": times, "summary": summary}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
