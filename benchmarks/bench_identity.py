"""What an input's content identity costs, and what it buys a batch resume.

Two measurements, in one run (docs/identity.md):

1. cost: the identity of each input of a synthetic bf16 model (``--params``), each in a
   fresh process, against reading every byte of that input once (what any patch does),
   alternated, warm page cache; with ``--cold`` the page cache is dropped before each
   (needs root).
2. resume: a batch of ``--jobs`` fine-tunes sharing a pair (``--resume-params``), then the
   same manifest pointed at plain copies of the fine-tunes in another folder (new names,
   new mtimes), then again after one fine-tune's data changed in one byte: the counts of
   jobs skipped, redone and refused.

    python benchmarks/bench_identity.py --params 1.2e9 --jobs 8 --json benchmarks/results/identity.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str], cold: bool) -> float:
    if cold:
        drop_caches()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


IDENTITY = (
    "import sys, time; from resta_fast.io.checkpoint import Checkpoint; c = Checkpoint(sys.argv[1]); "
    "t = time.perf_counter(); c.fingerprint(); print(time.perf_counter() - t)"
)
READ = (
    "import sys, os\nfor p in sorted(os.listdir(sys.argv[1])):\n  f = open(os.path.join(sys.argv[1], p), 'rb')\n"
    "  while f.read(1 << 24): pass"
)


def cost(models: list[Path], rounds: int, cold: bool) -> dict:
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.io.identity import sample_windows

    sampled = sum(e - s for d in models for f in Checkpoint(d).files.values() for s, e in sample_windows(f))
    total = sum(p.stat().st_size for d in models for p in d.glob("*.safetensors"))
    ident, read = [], []
    for _ in range(rounds):  # alternated: the machine's drift hits both alike
        ident.append(sum(timed([sys.executable, "-c", IDENTITY, str(d)], cold) for d in models))
        read.append(sum(timed([sys.executable, "-c", READ, str(d)], cold) for d in models))
    # The identity alone (inside the process, without interpreter start-up), warm.
    inner = [
        float(
            subprocess.run([sys.executable, "-c", IDENTITY, str(d)], check=True, capture_output=True, text=True).stdout
        )
        for d in models
    ]
    return {
        "input_bytes": total,
        "sampled_bytes": sampled,
        "sampled_fraction": sampled / total,
        "identity_process_seconds_median": statistics.median(ident),
        "read_all_seconds_median": statistics.median(read),
        "identity_seconds_in_process": sum(inner),
        "cold": cold,
    }


def batch_counts(manifest: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "resta_fast", "batch", str(manifest), "--no-progress", "--no-fsync", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(proc.stdout)["counts"] | {"exit": proc.returncode}


def resume(root: Path, params: float, jobs: int) -> dict:
    from bench_batch import make_finetunes
    from bench_patch import build_models

    ft, al, un = build_models(root / "models", params, 1e9)
    fts = make_finetunes(root / "models", ft, jobs)
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    manifest = root / "batch.json"

    def write(paths):
        spec = {
            "aligned": str(al),
            "unaligned": str(un),
            "beta": 0.5,
            "jobs": [{"name": f"j{i}", "finetuned": str(p), "out": str(out / f"j{i}")} for i, p in enumerate(paths)],
        }
        manifest.write_text(json.dumps(spec))

    write(fts)
    first = batch_counts(manifest)
    moved_root = root / "moved"
    shutil.rmtree(moved_root, ignore_errors=True)
    moved = []
    for i, d in enumerate(fts):  # plain copies: new files, new mtimes, new names
        moved.append(moved_root / f"customer-{i}")
        shutil.copytree(d, moved[-1], copy_function=shutil.copyfile)
    write(moved)
    after_copy = batch_counts(manifest)
    shard = sorted(moved[len(moved) // 2].glob("*.safetensors"))[-1]
    with open(shard, "r+b") as fh:  # one byte of the data, the header untouched
        fh.seek(-1, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0x40]))
    after_change = batch_counts(manifest)
    shutil.rmtree(moved_root, ignore_errors=True)
    return {"jobs": jobs, "first_run": first, "after_copy": after_copy, "after_one_changed": after_change}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.2e9, help="model size for the cost (default 1.2e9)")
    ap.add_argument("--resume-params", type=float, default=0.05e9, help="model size for the resume (default 5e7)")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each command (root)")
    ap.add_argument("--dir", default="/tmp/resta_fast_bench_identity")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    from bench_patch import build_models

    root = Path(args.dir)
    models = build_models(root / "big", args.params, 1e9)
    result = {"params": args.params, "cost": cost(models, args.rounds, args.cold)}
    result["resume"] = resume(root / "resume", args.resume_params, args.jobs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
