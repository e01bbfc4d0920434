"""`resta-fast batch` (fused) vs N separate `patch` runs vs the I/O floor.

For N = 1, 2, 4, 8 fine-tunes of one synthetic Llama-shaped bf16 model
(``bench_patch.build_models``; fine-tune k > 0 is a byte copy of fine-tune 0 in
its own files, so the page cache holds N distinct copies, patched with its own
β), measures in fresh processes, alternated round by round, warm cache:

    batch      resta-fast batch MANIFEST_N (one fused pass)
    separate   api.patch once per job, in one process (no per-run start-up cost,
               so the comparison favours `separate`)
    floor      read the 2 shared inputs once + the N fine-tunes, write N outputs
    floor-ft   read one fine-tune, write one output (the per-fine-tune floor)

Before anything is reported, each N's batch outputs are compared with the
separate runs' outputs byte for byte. Reported (medians over rounds): seconds,
separate/batch speed-up, batch/floor, and the marginal cost of one more
fine-tune, (batch(N) − batch(1)) / (N − 1), against floor-ft.

    python benchmarks/bench_batch.py --params 0.5e9 --ns 1,2,4,8 --rounds 3
    python benchmarks/bench_batch.py --params 2e6 --ns 1,2 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SELF = str(Path(__file__).resolve())  # children may run in another working directory
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_patch import build_models, run  # noqa: E402 - after the path set-up


def make_finetunes(root: Path, first: Path, n: int) -> list[Path]:
    """``n`` fine-tune directories: ``first`` and byte copies of it (real copies,
    not links, so each has its own page-cache pages)."""
    dirs = [first]
    for k in range(1, n):
        d = root / f"finetuned_{k}"
        if not (d / "done").exists():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(first, d)
            (d / "done").write_text("")
        dirs.append(d)
    return dirs


def write_manifest(
    path: Path,
    al: Path,
    un: Path,
    fts: list[Path],
    out_root: Path,
    backend: str,
    fsync: bool,
    dare: float | None,
    device: str = "cpu",
) -> Path:
    jobs = [
        {"finetuned": str(ft), "out": str(out_root / f"job{k}"), "beta": 0.25 + 0.25 * k} for k, ft in enumerate(fts)
    ]
    doc = {
        "aligned": str(al),
        "unaligned": str(un),
        "backend": backend,
        "device": device,
        "fsync": fsync,
        "group_size": len(fts),
        "jobs": jobs,
    }
    if dare:
        doc.update(dare=dare, seed=1)
    path.write_text(json.dumps(doc, indent=1))
    return path


def separate_main(argv) -> None:
    """Run each job of a manifest through api.patch, one after another."""
    from resta_fast import api
    from resta_fast.batch.manifest import load_manifest

    ap = argparse.ArgumentParser()
    ap.add_argument("manifest")
    ap.add_argument("--out-root")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    try:  # commits before the batch prepare step opened every job in load_manifest unless deep=False
        m = load_manifest(args.manifest, deep=False)
    except TypeError:
        m = load_manifest(args.manifest)
    for job in m.jobs:
        api.patch(
            job.finetuned, Path(args.out_root) / job.out.name, **job.patch_kwargs(), fsync=m.fsync, threads=args.threads
        )


def cli_commands(manifest: Path, out_root: Path, threads: int | None) -> list[str]:
    """One `resta-fast patch` command line per job of a bench manifest: what a
    user runs without batch, each paying its own interpreter and torch start-up."""
    doc = json.loads(manifest.read_text())
    lines = []
    for job in doc["jobs"]:
        cmd = [
            sys.executable,
            "-m",
            "resta_fast",
            "patch",
            "--finetuned",
            job["finetuned"],
            "--out",
            str(out_root / Path(job["out"]).name),
            "--aligned",
            doc["aligned"],
            "--unaligned",
            doc["unaligned"],
            "--beta",
            str(job["beta"]),
            "--backend",
            doc["backend"],
            "--device",
            doc.get("device", "cpu"),
            "--no-progress",
        ]
        cmd += ["--dare", str(doc["dare"]), "--seed", str(doc["seed"])] if doc.get("dare") else []
        cmd += [] if doc["fsync"] else ["--no-fsync"]
        cmd += ["--threads", str(threads)] if threads else []
        lines.append(shlex.join(cmd) + " 2>/dev/null")
    return lines


def digests(out_root: Path) -> dict[str, str]:
    """sha256 of every output file but the report (which has a timestamp)."""
    result = {}
    for p in sorted(out_root.rglob("*")):
        if p.is_file() and p.name != "resta_fast.json":
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for block in iter(lambda fh=fh: fh.read(16 << 20), b""):
                    h.update(block)
            result[str(p.relative_to(out_root))] = h.hexdigest()
    return result


def shards(d: Path) -> list[str]:
    return sorted(str(p) for p in d.glob("*.safetensors"))


def build_main(argv) -> None:
    """Build (or reuse) the models in a child process: the parent never imports
    torch, so children forked from it do not inherit its peak RSS (wait4's
    ru_maxrss counts the pre-exec copy of the parent)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--root")
    ap.add_argument("--params", type=float)
    ap.add_argument("--shard-bytes", type=float)
    ap.add_argument("--n", type=int)
    args = ap.parse_args(argv)
    root = Path(args.root)
    ft, al, un = build_models(root / "models", args.params, args.shard_bytes)
    fts = make_finetunes(root / "models", ft, args.n)
    print(json.dumps({"aligned": str(al), "unaligned": str(un), "finetunes": [str(d) for d in fts]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("separate", "build"):
        {"separate": separate_main, "build": build_main}[sys.argv[1]](sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=0.5e9, help="model size in parameters (default 0.5e9)")
    ap.add_argument("--shard-bytes", type=float, default=1e9)
    ap.add_argument("--ns", default="1,2,4,8", help="numbers of fine-tunes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="cpp")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda with --backend triton")
    ap.add_argument("--dare", type=float, default=None)
    ap.add_argument("--fsync", action="store_true", help="durable outputs (floor fsyncs too)")
    ap.add_argument("--threads", type=int, help="kernel threads for batch and separate (default: theirs)")
    ap.add_argument(
        "--separate-cli",
        action="store_true",
        help="also time N separate `resta-fast patch` processes (what a user runs without batch)",
    )
    ap.add_argument("--writers", type=int, help="batch writer threads (default: batch's)")
    ap.add_argument("--chunk-elems", type=int, help="batch fused chunk (default: batch's)")
    ap.add_argument("--old-repo", help="an older checkout (its _C built): its batch runs alternate with this one's")
    ap.add_argument(
        "--also-group-size",
        type=int,
        help="also time each batch split into passes of G jobs (batch --group-size G), alternated with the rest",
    )
    ap.add_argument("--dir", default="/tmp/resta_fast_bench_batch")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    ns = sorted({int(n) for n in args.ns.split(",")})
    root = Path(args.dir)
    built = json.loads(
        subprocess.run(
            [
                sys.executable,
                SELF,
                "build",
                "--root",
                str(root),
                "--params",
                str(args.params),
                "--shard-bytes",
                str(args.shard_bytes),
                "--n",
                str(max(ns)),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    al, un = Path(built["aligned"]), Path(built["unaligned"])
    fts = [Path(d) for d in built["finetunes"]]
    ft = fts[0]
    out_bytes = sum(os.path.getsize(p) for p in shards(ft))
    shared_bytes = sum(os.path.getsize(p) for d in (al, un) for p in shards(d))
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(REPO))
    old_env = dict(os.environ, PYTHONPATH=str(args.old_repo)) if args.old_repo else None
    sync = ["--fsync"] if args.fsync else []
    floor_bin = root / "floor.bin"
    cmds: dict[str, list[str]] = {
        "floor-ft": [
            py,
            str(REPO / "benchmarks/bench_patch.py"),
            "floor",
            "--inputs",
            *shards(ft),
            "--out",
            str(floor_bin),
            "--out-bytes",
            str(out_bytes),
            *sync,
        ]
    }
    out_roots = {}
    for n in ns:
        batch_out, sep_out = root / f"out-batch-{n}", root / f"out-separate-{n}"
        man = write_manifest(
            root / f"batch-{n}.json", al, un, fts[:n], batch_out, args.backend, args.fsync, args.dare, args.device
        )
        cmds[f"floor-{n}"] = [
            py,
            str(REPO / "benchmarks/bench_patch.py"),
            "floor",
            "--inputs",
            *shards(al),
            *shards(un),
            *[s for d in fts[:n] for s in shards(d)],
            "--out",
            str(floor_bin),
            "--out-bytes",
            str(n * out_bytes),
            *sync,
        ]
        tune = ["--threads", str(args.threads)] if args.threads else []
        cmds[f"batch-{n}"] = [
            py,
            "-m",
            "resta_fast",
            "batch",
            str(man),
            "--no-progress",
            *tune,
            *(["--writers", str(args.writers)] if args.writers else []),
            *(["--chunk-elems", str(args.chunk_elems)] if args.chunk_elems else []),
        ]
        out_roots[f"batch-{n}"] = batch_out
        if args.also_group_size and args.also_group_size < n:
            grouped_out = root / f"out-batchg-{n}"
            grouped_man = write_manifest(
                root / f"batch-g-{n}.json",
                al,
                un,
                fts[:n],
                grouped_out,
                args.backend,
                args.fsync,
                args.dare,
                args.device,
            )
            cmds[f"batchg-{n}"] = [
                *cmds[f"batch-{n}"][:4],
                str(grouped_man),
                *cmds[f"batch-{n}"][5:],
                "--group-size",
                str(args.also_group_size),
            ]
            out_roots[f"batchg-{n}"] = grouped_out
        if args.old_repo:  # the same manifest, written elsewhere, by the older checkout
            old_man = write_manifest(
                root / f"batch-old-{n}.json",
                al,
                un,
                fts[:n],
                root / f"out-oldbatch-{n}",
                args.backend,
                args.fsync,
                args.dare,
                args.device,
            )
            cmds[f"oldbatch-{n}"] = [*cmds[f"batch-{n}"][:4], str(old_man), *cmds[f"batch-{n}"][5:]]
            out_roots[f"oldbatch-{n}"] = root / f"out-oldbatch-{n}"
        cmds[f"separate-{n}"] = [py, SELF, "separate", str(man), "--out-root", str(sep_out), *tune]
        out_roots[f"separate-{n}"] = sep_out
        if args.separate_cli:
            cli_out = root / f"out-separatecli-{n}"
            script = " && ".join(cli_commands(man, cli_out, args.threads))
            cmds[f"separatecli-{n}"] = ["bash", "-c", script]
            out_roots[f"separatecli-{n}"] = cli_out
    for path in [*shards(al), *shards(un), *[s for d in fts for s in shards(d)]]:
        with open(path, "rb") as fh:  # warm the page cache once
            while fh.read(16 << 20):
                pass
    times: dict[str, list[float]] = {k: [] for k in cmds}
    rss: dict[str, float] = {}
    first_digests: dict[str, dict[str, str]] = {}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            target = out_roots.get(name, floor_bin)
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            if name in out_roots:
                target.mkdir()
            os.sync()  # untimed: the previous command's write-back is not charged to this one
            t, peak = run(cmd, old_env if name.startswith("old") else env)
            times[name].append(t)
            rss[name] = max(rss.get(name, 0.0), peak)
            print(f"round {r + 1} {name:14s} {t:7.2f} s  rss {peak:6.0f} MB", flush=True)
            n = name.split("-")[-1]
            if name in out_roots and name not in first_digests:
                first_digests[name] = digests(out_roots[name])
                if not name.startswith("batch-"):  # batch-N runs first in each N's commands
                    a, b = first_digests[f"batch-{n}"], first_digests[name]
                    if a != b or len(a) < int(n):
                        sys.exit(f"batch and {name} outputs differ for N={n}; not reporting")
            # Each output goes as soon as it is timed (and digested): N outputs per command would
            # otherwise push the inputs out of the page cache, and the next command would read
            # them from disk (at 0.35B x 8 on a 24 GB machine the working set did not fit).
            if target.is_dir():  # emptied, not removed: separate runs load the batch manifest, which needs it
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
            else:
                target.unlink(missing_ok=True)
        floor_bin.unlink(missing_ok=True)
        if args.json:  # after every round, so a run cut short still leaves its times
            Path(args.json).write_text(json.dumps({"times": times, "rounds_done": r + 1}, indent=2))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nshared inputs {shared_bytes / 1e9:.2f} GB, one fine-tune/output {out_bytes / 1e9:.2f} GB, "
        f"{args.rounds} round(s), medians; all batch outputs equal the separate runs' bit for bit"
    )
    print(
        f"  {'N':>3} {'batch s':>9} {'separate s':>11} {'floor s':>9} {'speed-up':>9} {'batch/floor':>12} "
        f"{'marginal/floor-ft':>18} {'batch rss MB':>13}"
    )
    summary = {"floor_ft_s": med["floor-ft"], "shared_bytes": shared_bytes, "out_bytes": out_bytes, "n": {}}
    for n in ns:
        b, s, f = med[f"batch-{n}"], med[f"separate-{n}"], med[f"floor-{n}"]
        marginal = (b - med[f"batch-{ns[0]}"]) / (n - ns[0]) if n > ns[0] else None
        ratio = marginal / med["floor-ft"] if marginal is not None else None
        summary["n"][n] = {
            "batch_s": b,
            "separate_s": s,
            "floor_s": f,
            "speedup": s / b,
            "batch_over_floor": b / f,
            "marginal_s": marginal,
            "marginal_over_floor_ft": ratio,
            "batch_peak_rss_mb": rss[f"batch-{n}"],
        }
        print(
            f"  {n:>3} {b:9.2f} {s:11.2f} {f:9.2f} {s / b:8.2f}x {b / f:11.2f}x "
            f"{'' if ratio is None else f'{ratio:.2f}x':>18} {rss[f'batch-{n}']:13.0f}"
        )
    print(f"  floor-ft (read one fine-tune, write one output): {med['floor-ft']:.2f} s")
    for n in ns:
        if f"oldbatch-{n}" in times:
            ratio = statistics.median(o / b for o, b in zip(times[f"oldbatch-{n}"], times[f"batch-{n}"], strict=True))
            print(
                f"  N={n}: this checkout's batch is {ratio:.2f}x as fast as {args.old_repo}'s "
                "(median of per-round ratios)"
            )
            summary["n"][n]["speedup_vs_old"] = ratio
    for n in ns:
        if f"batchg-{n}" in med:
            g = med[f"batchg-{n}"]
            print(
                f"  N={n} in passes of {args.also_group_size}: {g:.2f} s -> {med[f'separate-{n}'] / g:.2f}x the "
                f"separate runs (one pass of {n}: {med[f'separate-{n}'] / med[f'batch-{n}']:.2f}x)"
            )
            summary["n"][n]["grouped_s"] = g
            summary["n"][n]["grouped_speedup"] = med[f"separate-{n}"] / g
    for n in ns:
        if f"separatecli-{n}" in med:
            c = med[f"separatecli-{n}"]
            print(
                f"  N={n}: {n} separate `resta-fast patch` processes {c:.2f} s -> batch is "
                f"{c / med[f'batch-{n}']:.2f}x faster"
            )
            summary["n"][n]["separate_cli_s"] = c
            summary["n"][n]["speedup_vs_cli"] = c / med[f"batch-{n}"]
    if args.json:
        Path(args.json).write_text(
            json.dumps({"times": times, "rounds_done": args.rounds, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
