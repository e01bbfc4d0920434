"""The fused C++ kernel against memcpy and torch eager, in one run.

bf16 tensors (default 256M elements; RESTA_BENCH_ELEMS or --elems), plain
(F + β(A − U)) and DARE (p = 0.3), at 1 and 2 threads. Reported throughput is
GB/s of bytes touched: inputs read + output written (plain 8 B/element, DARE
10 B/element). Beside it, in the same run and interleaved round by round so a
shared machine's noise hits all alike:

    memcpy   torch copy_ of half the kernel's bytes touched into a pre-touched
             buffer (so it too reads + writes the same byte count), same threads
    torch    the reference backend (torch eager, separate ops) doing the same
             math on a slice (it allocates temporaries; 8M elements by default)

Every kernel result is checked bit for bit against the reference on sample
slices before anything is reported. Buffers are allocated and touched once:
fresh allocations are very slow on small VMs and would be measured instead.

    python benchmarks/bench_kernels.py --elems 64M --rounds 5
    pytest -p no:xdist benchmarks/bench_kernels.py --benchmark-json=kernels.json

Targets: plain >= 0.6x memcpy, DARE >= 0.25x memcpy, both >= 10x torch eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resta_fast import rng  # noqa: E402
from resta_fast.kernels import reference as ref  # noqa: E402

DEFAULT_ELEMS = 256 * 2**20
TORCH_ELEMS = 8 * 2**20
P_DARE = 0.3
BETA = 0.5
SEED = rng.tensor_seed(0, "model.layers.0.mlp.down_proj.weight")
TARGETS = {"plain": 0.6, "dare": 0.25}
TORCH_SPEEDUP_TARGET = 10.0
MODES = ("plain", "dare")


def parse_count(text: str) -> int:
    """'256M' -> 268435456; also accepts K, G and plain integers."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def bytes_per_elem(mode: str) -> int:
    """Bytes touched per element: bf16 f, a, u (+ b for DARE) read, bf16 out written."""
    return 2 * (4 if mode == "plain" else 5)


class Buffers:
    """Pre-touched bf16 inputs/output, memcpy buffers and the torch slice."""

    def __init__(self, elems: int, torch_elems: int = TORCH_ELEMS):
        self.elems = elems
        pattern = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02
        self.b = self._tiled(pattern, elems)
        self.f = self._tiled(pattern.roll(1) * 1e-2 + pattern, elems)
        self.a = self._tiled(pattern.roll(2) * 1e-2 + pattern, elems)
        self.u = self._tiled(pattern.roll(3) * 1e-3 + pattern.roll(2) * 1e-2 + pattern, elems)
        self.out = torch.empty(elems, dtype=torch.bfloat16)
        self.out.fill_(0.0)
        copy_bytes = elems * bytes_per_elem("dare") // 2
        self.src = torch.ones(copy_bytes, dtype=torch.uint8)
        self.dst = torch.zeros(copy_bytes, dtype=torch.uint8)
        self.torch_elems = min(elems, torch_elems)
        self.torch_out = torch.empty(self.torch_elems, dtype=torch.bfloat16)

    @staticmethod
    def _tiled(pattern: torch.Tensor, elems: int) -> torch.Tensor:
        out = torch.empty(elems, dtype=torch.bfloat16)
        chunk = pattern.to(torch.bfloat16)
        for lo in range(0, elems, chunk.numel()):
            hi = min(elems, lo + chunk.numel())
            out[lo:hi] = chunk[: hi - lo]
        return out

    def inputs(self, mode: str, lo: int = 0, hi: int | None = None):
        hi = self.elems if hi is None else hi
        b = self.b[lo:hi] if mode == "dare" else None
        return self.f[lo:hi], self.a[lo:hi], self.u[lo:hi], b


def kw(mode: str, offset: int = 0) -> dict:
    return {"beta": BETA, "p": P_DARE if mode == "dare" else 0.0, "seed": SEED, "offset": offset}


def run_cpp(cpp, buf: Buffers, mode: str, threads: int) -> None:
    cpp.patch_into(buf.out, *buf.inputs(mode), threads=threads, **kw(mode))


def run_memcpy(buf: Buffers, mode: str, threads: int) -> None:
    torch.set_num_threads(threads)
    n = buf.elems * bytes_per_elem(mode) // 2
    buf.dst[:n].copy_(buf.src[:n])


def run_torch(buf: Buffers, mode: str, threads: int) -> None:
    torch.set_num_threads(threads)
    ref.patch_into(buf.torch_out, *buf.inputs(mode, 0, buf.torch_elems), **kw(mode))


def check_sample(cpp, buf: Buffers, mode: str, slices: int = 4, width: int = 1 << 16) -> None:
    """The full-size kernel output equals the reference on sample slices (bit for bit)."""
    starts = np.linspace(0, max(0, buf.elems - width), slices).astype(np.int64).tolist()
    starts[-1] = max(0, buf.elems - width)  # the tail block too
    for lo in starts:
        hi = min(buf.elems, lo + width)
        want = torch.empty(hi - lo, dtype=torch.bfloat16)
        ref.patch_into(want, *buf.inputs(mode, lo, hi), **kw(mode, offset=lo))
        got = buf.out[lo:hi]
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            bad = (got.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
            i = int(bad[0])
            raise AssertionError(
                f"{mode}: cpp output differs from the reference at element {lo + i} "
                f"({int(bad.numel())} of {hi - lo} in slice {lo}:{hi}): "
                f"got {got[i].item()!r}, want {want[i].item()!r}"
            )


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure(cpp, buf: Buffers, threads_list, rounds: int, with_torch: bool = True) -> list[dict]:
    """Interleave cpp / memcpy / torch per round; return one row per (mode, threads)."""
    times: dict[tuple, list[float]] = {}
    saved = torch.get_num_threads()
    try:
        for threads in threads_list:  # warm-up (page in, start thread teams) and check
            for mode in MODES:
                run_cpp(cpp, buf, mode, threads)
                check_sample(cpp, buf, mode)
                run_memcpy(buf, mode, threads)
        for _ in range(rounds):
            for threads in threads_list:
                for mode in MODES:
                    times.setdefault(("cpp", mode, threads), []).append(timed(run_cpp, cpp, buf, mode, threads))
                    times.setdefault(("memcpy", mode, threads), []).append(timed(run_memcpy, buf, mode, threads))
                    if with_torch:
                        times.setdefault(("torch", mode, threads), []).append(timed(run_torch, buf, mode, threads))
    finally:
        torch.set_num_threads(saved)
    rows = []
    for threads in threads_list:
        for mode in MODES:
            per = bytes_per_elem(mode)
            cpp_gbs = per * buf.elems / statistics.median(times[("cpp", mode, threads)]) / 1e9
            copy_gbs = per * buf.elems / statistics.median(times[("memcpy", mode, threads)]) / 1e9
            row = {
                "mode": mode,
                "threads": threads,
                "elems": buf.elems,
                "cpp_gbs": cpp_gbs,
                "memcpy_gbs": copy_gbs,
                "vs_memcpy": cpp_gbs / copy_gbs,
                "target_vs_memcpy": TARGETS[mode],
            }
            if with_torch:
                torch_gbs = per * buf.torch_elems / statistics.median(times[("torch", mode, threads)]) / 1e9
                row.update(torch_gbs=torch_gbs, vs_torch=cpp_gbs / torch_gbs)
            rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    head = (
        f"{'mode':6} {'thr':>3} {'cpp GB/s':>9} {'memcpy':>8} {'x memcpy':>9} {'target':>7} {'torch':>7} {'x torch':>8}"
    )
    lines = [head]
    for r in rows:
        ok = "ok" if r["vs_memcpy"] >= r["target_vs_memcpy"] else "MISS"
        line = (
            f"{r['mode']:6} {r['threads']:>3} {r['cpp_gbs']:>9.2f} {r['memcpy_gbs']:>8.2f} "
            f"{r['vs_memcpy']:>9.2f} {r['target_vs_memcpy']:>5.2f}{ok:>2}"
        )
        if "torch_gbs" in r:
            tok = "ok" if r["vs_torch"] >= TORCH_SPEEDUP_TARGET else "MISS"
            line += f" {r['torch_gbs']:>7.3f} {r['vs_torch']:>6.1f}{tok:>4}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--elems",
        type=parse_count,
        default=parse_count(os.environ.get("RESTA_BENCH_ELEMS", str(DEFAULT_ELEMS))),
        help="bf16 elements per tensor, e.g. 64M (default RESTA_BENCH_ELEMS or 256M)",
    )
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument(
        "--torch-elems", type=parse_count, default=TORCH_ELEMS, help="elements for the torch eager peer (default 8M)"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the torch eager peer")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    from resta_fast.kernels import load_backend

    cpp = load_backend("cpp")  # an explicit request: raise the original load error
    info = cpp.build_info()
    threads_list = [int(t) for t in args.threads.split(",")]
    print(
        f"cpp kernel variant {info['isa']} (supported: {', '.join(info['isa_supported'])}), "
        f"OpenMP max threads {info['openmp_max_threads']}; torch {torch.__version__}"
    )
    print(
        f"{args.elems:,} bf16 elements per tensor, {args.rounds} rounds, threads {threads_list}; "
        "GB/s = bytes read + written per second, medians"
    )
    buf = Buffers(args.elems, args.torch_elems)
    rows = measure(cpp, buf, threads_list, args.rounds, with_torch=not args.no_torch)
    print("correctness: sample slices of every full-size output match the torch reference bit for bit")
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps({"build": info, "rows": rows}, indent=2))
    return 0


# ------------------------------------------------------------ pytest-benchmark

try:
    import pytest
except ImportError:  # script mode needs neither pytest nor pytest-benchmark
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def cpp():
        from resta_fast.kernels import BackendUnavailable, load_backend

        try:
            return load_backend("cpp")
        except BackendUnavailable as exc:
            pytest.skip(f"cpp backend unavailable: {exc}")

    @pytest.fixture(scope="module")
    def buffers():
        elems = parse_count(os.environ.get("RESTA_BENCH_ELEMS", str(DEFAULT_ELEMS)))
        return Buffers(elems)

    def _bench(benchmark, fn, nbytes: int):
        pytest.importorskip("pytest_benchmark")
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)
        benchmark.extra_info["bytes_touched"] = nbytes
        benchmark.extra_info["gbs_median"] = nbytes / benchmark.stats.stats.median / 1e9

    @pytest.mark.parametrize("threads", [1, 2])
    @pytest.mark.parametrize("mode", MODES)
    def test_cpp_kernel(benchmark, cpp, buffers, mode, threads):
        run_cpp(cpp, buffers, mode, threads)
        check_sample(cpp, buffers, mode)
        _bench(benchmark, lambda: run_cpp(cpp, buffers, mode, threads), bytes_per_elem(mode) * buffers.elems)

    @pytest.mark.parametrize("threads", [1, 2])
    @pytest.mark.parametrize("mode", MODES)
    def test_memcpy_floor(benchmark, buffers, mode, threads):
        saved = torch.get_num_threads()
        try:
            _bench(benchmark, lambda: run_memcpy(buffers, mode, threads), bytes_per_elem(mode) * buffers.elems)
        finally:
            torch.set_num_threads(saved)

    @pytest.mark.parametrize("threads", [1, 2])
    @pytest.mark.parametrize("mode", MODES)
    def test_torch_eager(benchmark, buffers, mode, threads):
        saved = torch.get_num_threads()
        try:
            _bench(benchmark, lambda: run_torch(buffers, mode, threads), bytes_per_elem(mode) * buffers.torch_elems)
        finally:
            torch.set_num_threads(saved)


if __name__ == "__main__":
    sys.exit(main())
