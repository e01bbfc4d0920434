"""The engine's host side: mmap vs pread staging, and the GPU configuration on a CPU stand-in.

Issue 13 asks two things of the same measurement:
- on the CPU path, keep the faster of zero-copy mmap views and pread into
  reusable buffers (``engine.CPU_STAGING``);
- the GPU scheduler run with a CPU stand-in for the device (buffers in ordinary
  memory, the C++ kernel as compute, the GPU's staging and chunking) must reach
  >= 0.9x the CPU pipeline's throughput: the host side no longer limits.

Modes, alternated round by round (A B C ... A B C ...) so machine drift hits
each alike, each in a fresh process that times only the pipeline call:

    cpu-mmap     run_jobs(device="cpu", staging="mmap")   the CPU path (4M-element chunks)
    cpu-read     run_jobs(device="cpu", staging="read")
    cpu-mmap-1t  cpu-mmap with one kernel thread (what share of 2 cores the kernel should take)
    gpu-standin  run_jobs(device="cpu", staging="read", chunk from the GPU pool size)
    floor        read every input byte once + write the output bytes
    old-cpu / old-gpu-standin   pipeline.cpu.run_plan / pipeline.gpu.run_plan_gpu(device="cpu")
                 of an older checkout (--old-repo), for the before/after ratio

Every mode's output sha256s must agree before anything is reported.

    python benchmarks/bench_staging.py --params 1.2e9 --rounds 3 --old-repo /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ONE = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, models, out = sys.argv[2], [Path(p) for p in sys.argv[3:6]], Path(sys.argv[6])
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.kernels import load_backend
from resta_fast.plan import build_plan
kernel = load_backend("cpp")
F, A, U = (Checkpoint(p) for p in models)
plan = build_plan(F, aligned=A, unaligned=U, beta=0.5)
meta = {"format": "pt"}
out.mkdir()
if mode.startswith("old"):
    from resta_fast.pipeline import cpu, gpu
    inputs = cpu.Inputs(F, A, U)
    t0 = time.perf_counter()
    if mode == "old-cpu":
        stats = cpu.run_plan(plan, inputs, out, kernel=kernel, beta=0.5, dare=None, seed=0, metadata=meta)
    else:
        stats = gpu.run_plan_gpu(plan, inputs, out, kernel=kernel, beta=0.5, dare=None, seed=0, metadata=meta,
                                 device="cpu")
    seconds = time.perf_counter() - t0
else:
    from resta_fast.pipeline.compute import DEFAULT_SLOTS, chunk_elems_for_pool
    from resta_fast.pipeline.device import DEFAULT_POOL_BYTES
    from resta_fast.pipeline.engine import run_jobs
    from resta_fast.pipeline.job import Inputs, Job
    job = Job(plan, Inputs(F, A, U), out, None, 0, meta)
    gpu_chunk = chunk_elems_for_pool(DEFAULT_POOL_BYTES, DEFAULT_SLOTS)
    kw = {"cpu-mmap": dict(staging="mmap"), "cpu-read": dict(staging="read"),
          "cpu-mmap-1t": dict(staging="mmap", threads=1),  # the kernel leaves a core to the writer and hashers
          "gpu-standin": dict(staging="read", chunk_elems=gpu_chunk)}[mode]
    t0 = time.perf_counter()
    run_jobs([job], kernel=kernel, device="cpu", **kw)
    seconds = time.perf_counter() - t0
    if job.error:
        raise job.error
    stats = job.stats
print(json.dumps({"seconds": seconds, "sha256": stats.sha256, "busy": getattr(stats, "busy", {})}))
"""


def run_one(repo: Path, mode: str, models: list[Path], out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(
        [sys.executable, "-c", ONE, str(repo), mode, *map(str, models), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def floor_seconds(models: list[Path], out: Path, out_bytes: int) -> float:
    files = [str(p) for d in models for p in sorted(d.glob("*.safetensors"))]
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_patch.py"),
            "floor",
            "--inputs",
            *files,
            "--out",
            str(out),
            "--out-bytes",
            str(out_bytes),
        ],
        check=True,
    )
    seconds = time.perf_counter() - t0
    out.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.2e9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "resta_bench")
    ap.add_argument("--old-repo", type=Path, help="an older checkout (with its _C built) to compare against")
    ap.add_argument("--modes", default="cpu-mmap,cpu-read,gpu-standin")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "bench_staging_1.2B.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_patch import build_models

    models = build_models(args.root / "models", args.params, 2e9)
    out_bytes = sum(p.stat().st_size for p in models[0].glob("*.safetensors"))
    modes = args.modes.split(",") + (["old-cpu", "old-gpu-standin"] if args.old_repo else [])
    times: dict[str, list[float]] = {m: [] for m in modes + ["floor"]}
    busy: dict[str, dict] = {}
    digest = None
    for r in range(args.rounds):
        for mode in modes:
            repo = args.old_repo if mode.startswith("old") else REPO
            res = run_one(repo, mode, models, args.root / "out")
            if digest is None:
                digest = res["sha256"]
            elif res["sha256"] != digest:
                raise SystemExit(f"{mode}: output differs from the first mode's; nothing reported")
            times[mode].append(res["seconds"])
            busy[mode] = res["busy"]
            print(f"round {r + 1} {mode:16} {res['seconds']:7.2f} s", flush=True)
        times["floor"].append(floor_seconds(models, args.root / "floor.bin", out_bytes))
        print(f"round {r + 1} {'floor':16} {times['floor'][-1]:7.2f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = {
        m: statistics.median(times["cpu-mmap"][i] / v[i] for i in range(args.rounds))
        for m, v in times.items()
        if m != "floor"
    }
    summary = {
        "params": args.params,
        "rounds": args.rounds,
        "median_seconds": med,
        "throughput_vs_cpu_mmap": ratios,
        "gpu_standin_vs_cpu": statistics.median(
            times[best][i] / times["gpu-standin"][i]
            for i in range(args.rounds)
            for best in [min(("cpu-mmap", "cpu-read"), key=lambda m: med[m])]
        )
        if "gpu-standin" in times
        else None,
        "times": times,
        "busy_last_round": busy,
        "cores": len(os.sched_getaffinity(0)),
    }
    if args.old_repo:
        summary["old_gpu_standin_vs_old_cpu"] = statistics.median(
            times["old-cpu"][i] / times["old-gpu-standin"][i] for i in range(args.rounds)
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        json.dumps(
            {k: summary[k] for k in ("median_seconds", "throughput_vs_cpu_mmap", "gpu_standin_vs_cpu")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
