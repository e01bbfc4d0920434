"""How `patch` hashes its outputs: inline (one hasher thread, buffers wait on it)
vs follow (a thread per output file re-reads it from the page cache).

sha256 is the slowest stage of a patch (about 1.8 GB/s per core here, 1.3 GB/s
on the H200 host), and it is sequential within a file. Inline, the writer's
buffers go back to the pool only once hashed, so the kernel waits on one sha256
stream. Following, a buffer is free once written, file k is hashed while file
k+1 is written, and several files hash in parallel, for the price of re-reading
the output from the page cache.

Alternates the two modes round by round in one process (warm cache, no fsync),
on a sharded synthetic bf16 model (``bench_patch.build_models``), and checks
that both give the same sha256 for every file before reporting.

    python benchmarks/bench_hash_modes.py --params 1.3e9 --rounds 5
    python benchmarks/bench_hash_modes.py --params 2e7 --rounds 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_patch import build_models  # noqa: E402

from resta_fast import api  # noqa: E402
from resta_fast.pipeline import cpu  # noqa: E402

MODES = ("inline", "follow")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1.3e9)
    ap.add_argument("--shard-bytes", type=float, default=1e9)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/resta_fast_bench")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    ft, al, un = build_models(Path(args.dir) / "models", args.params, args.shard_bytes)
    out = Path(args.dir) / "out-hash-modes"
    times: dict[str, list[float]] = {m: [] for m in MODES}
    busy: dict[str, list[dict]] = {m: [] for m in MODES}
    digests = {}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            cpu.HASH_MODE = mode
            t0 = time.perf_counter()
            report = api.patch(ft, out, aligned=al, unaligned=un, beta=0.5, backend="cpp", fsync=False)
            times[mode].append(time.perf_counter() - t0)
            busy[mode].append(report["stats"]["busy_seconds"])
            digests.setdefault(mode, report["files"])
            print(f"round {r + 1} {mode:7s} {times[mode][-1]:6.2f} s  busy {report['stats']['busy_seconds']}",
                  flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if digests["inline"] != digests["follow"]:
        sys.exit("the two modes hashed differently; not reporting")
    ratios = [f / i for f, i in zip(times["follow"], times["inline"], strict=True)]
    med = {m: statistics.median(v) for m, v in times.items()}
    n_files = len([k for k in digests["inline"] if k.endswith(".safetensors")])
    print(f"\n{n_files} output files, {args.rounds} rounds, same sha256 in both modes")
    for m in MODES:
        print(f"  {m:7s} median {med[m]:.2f} s  (rounds {min(times[m]):.2f}-{max(times[m]):.2f})")
    print(f"  follow / inline per round: median {statistics.median(ratios):.2f} "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"times": times, "busy": busy, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
