"""Where the time goes in one `api.patch` on a GPU machine (host side, per thread).

gpu_check.py says *how fast* the end-to-end GPU pipeline is against its floor;
this says *why*: the host's copy, read, hash and write rates on that machine,
then `api.patch` (triton on the GPU, and cpp on its CPU cores) on three ~1.5 GB
models, warm cache, with a cProfile of each pipeline thread (main, writer,
hasher; on Python >= 3.12 one profile sees all threads): the top functions by
own and by cumulative time.

    python benchmarks/gpu_profile.py --gb 1.5          # on the GPU machine
    python benchmarks/gpu_profile.py --gb 0.02 --devices cpu   # smoke, anywhere
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import mmap
import os
import pstats
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from gpu_check import build_checkpoints  # noqa: E402

GB = 1e9


def rate(nbytes: int, fn, reps: int = 3) -> float:
    """Best GB/s of ``fn()`` moving ``nbytes`` over ``reps`` calls (after a warm-up)."""
    fn()
    best = min(_timed(fn) for _ in range(reps))
    return nbytes / best / GB


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def host_rates(path: Path, cuda: bool) -> None:
    """Copy, read, hash and write rates of this host on one warm file."""
    size = path.stat().st_size
    chunk = 16 << 20
    pinned = torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda)
    plain = torch.empty(chunk, dtype=torch.uint8)
    pinned.fill_(0)
    plain.fill_(0)
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    src = torch.frombuffer(mm, dtype=torch.uint8)

    def copy_into(buf, threads):
        def go():
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            for lo in range(0, size - chunk + 1, chunk):
                buf.copy_(src[lo : lo + chunk])
            torch.set_num_threads(old)

        return go

    def pread_into(buf):
        view = memoryview(buf.numpy())

        def go():
            for lo in range(0, size - chunk + 1, chunk):
                os.preadv(fd, [view], lo)

        return go

    def sha(buf):
        data = memoryview(buf.numpy())

        def go():
            h = hashlib.sha256()
            for _ in range(size // chunk):
                h.update(data)

        return go

    out_path = path.parent / "profile_write.bin"

    def write_from(buf):
        data = memoryview(buf.numpy())

        def go():
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for lo in range(0, size - chunk + 1, chunk):
                os.pwrite(out, data, lo)
            os.close(out)

        return go

    n = size // chunk * chunk
    print(f"host rates on {size / GB:.2f} GB (warm), torch threads {torch.get_num_threads()}:")
    for label, fn in [
        ("mmap -> pinned, torch copy_, 1 thread", copy_into(pinned, 1)),
        ("mmap -> pinned, torch copy_, all threads", copy_into(pinned, torch.get_num_threads())),
        ("mmap -> pageable, torch copy_, 1 thread", copy_into(plain, 1)),
        ("pread -> pinned", pread_into(pinned)),
        ("sha256 of a pinned buffer", sha(pinned)),
        ("sha256 of a pageable buffer", sha(plain)),
        ("pwrite from pinned", write_from(pinned)),
        ("pwrite from pageable", write_from(plain)),
    ]:
        print(f"  {label:42s} {rate(n, fn):7.2f} GB/s", flush=True)
    out_path.unlink(missing_ok=True)
    src = None  # drop the view before closing the map
    mm.close()
    os.close(fd)


class ThreadProfiles:
    """cProfile the pipeline's threads (main = the scheduler, writer, a file hasher) of one run."""

    def __init__(self):
        from resta_fast.pipeline import hashing, writer

        self.targets = [(writer.Writer, "_run", "writer"), (hashing.FileHasher, "_follow", "hasher")]
        self.profiles: dict[str, cProfile.Profile] = {}
        self._orig = [getattr(cls, attr) for cls, attr, _ in self.targets]

    def _wrap(self, fn, name):
        profiles = self.profiles

        def run(obj, *args):
            prof = cProfile.Profile()
            try:
                prof.enable()
            except ValueError:  # Python >= 3.12: one profiler per process, and it sees every thread
                return fn(obj, *args)
            profiles.setdefault(name, prof)  # the first thread of each kind
            try:
                return fn(obj, *args)
            finally:
                prof.disable()

        return run

    def __enter__(self):
        for (cls, attr, name), fn in zip(self.targets, self._orig, strict=True):
            setattr(cls, attr, self._wrap(fn, name))
        self.profiles["main"] = main = cProfile.Profile()
        main.enable()
        return self

    def __exit__(self, *exc):
        self.profiles["main"].disable()
        for (cls, attr, _), fn in zip(self.targets, self._orig, strict=True):
            setattr(cls, attr, fn)

    def report(self, top: int) -> None:
        for name, prof in self.profiles.items():
            for key in ("tottime", "cumulative"):
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats(key).print_stats(top)
                lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
                start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
                print(f"  -- thread {name}: top {top} by {key} time")
                for ln in lines[start : start + top + 1]:
                    print("    " + ln[:150])


def profile_patch(dirs, root: Path, device: str, top: int, dare: bool) -> None:
    from resta_fast import api

    backend = "triton" if device == "cuda" else "auto"
    extra = {"dare": 0.3, "seed": 7} if dare else {}
    in_bytes = sum(p.stat().st_size for d in dirs.values() for p in d.glob("*.safetensors"))
    for attempt in range(2):  # the first also compiles / warms the allocator
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        with ThreadProfiles() as profs:
            t0 = time.perf_counter()
            report = api.patch(
                str(dirs["finetuned"]),
                str(out),
                aligned=str(dirs["aligned"]),
                unaligned=str(dirs["unaligned"]),
                beta=0.5,
                device=device,
                backend=backend,
                overwrite=True,
                fsync=False,
                progress=False,
                **extra,
            )
            wall = time.perf_counter() - t0
        busy = ", ".join(f"{k} {v:.2f}" for k, v in report["stats"].get("busy_seconds", {}).items())
        print(
            f"{device} {report.get('backend')} {'dare' if dare else 'plain'} run {attempt + 1}: {wall:.2f} s, "
            f"{in_bytes / wall / GB:.2f} GB/s of inputs; pipeline {report['stats']['seconds']:.2f} s, "
            f"busy s: {busy}",
            flush=True,
        )
    profs.report(top)
    shutil.rmtree(root / "out", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.5, help="size of each synthetic model")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--dare", action="store_true", help="also profile a DARE run")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    devices = [d for d in args.devices.split(",") if d != "cuda" or cuda]
    root = Path(tempfile.mkdtemp(prefix="resta_gpu_profile_"))
    try:
        t0 = time.perf_counter()
        dirs = build_checkpoints(root, args.gb, torch, "cuda" if cuda else "cpu")
        print(
            f"built 3 models in {time.perf_counter() - t0:.1f} s under {root}; {os.cpu_count()} cpus, "
            f"threads alive {threading.active_count()}",
            flush=True,
        )
        host_rates(max(dirs["finetuned"].glob("*.safetensors"), key=lambda p: p.stat().st_size), cuda)
        for device in devices:
            profile_patch(dirs, root, device, args.top, dare=False)
            if args.dare:
                profile_patch(dirs, root, device, args.top, dare=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
