"""One-command check of the Triton backend on a lent GPU (about 5 minutes on an H200).

Sections, each run on its own so one failure does not hide the rest:

1. identity   GPU output vs the CPU torch reference, bit for bit (NaN as NaN-ness),
              on several M random elements (half realistic, half random bit patterns:
              NaN payloads, Inf, subnormals) for every in/out dtype pair, with and
              without vector mode and DARE, plus mixed input dtypes.
2. bandwidth  kernel GB/s of bytes touched vs a device-to-device copy of the same
              bytes in the same run (target >= 0.8x); sweeps BLOCK x num_warps.
3. transfer   pinned H2D / D2H (and pageable H2D) GB/s.
4. pipeline   resta_fast.api.patch(device="cuda") on a multi-GB synthetic sharded
              checkpoint vs min(cold disk read, pinned H2D) (target >= 0.7x), when
              resta_fast.api and resta_fast.pipeline.engine exist.

Prints one table at the end; writes gpu_check.log and gpu_check.json under $OUT
(default ./gpu_check_out). The repo need not be pip-installed.

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --smoke         # tiny sizes; CPU via TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPE_NAMES = ("bf16", "f16", "f32")
MODES = {"plain": (True, False), "vector": (False, False), "dare": (True, True), "dare_vector": (False, True)}
BW_TARGET = 0.8
PIPELINE_TARGET = 0.7
GB = 1e9


class Tee:
    """Write to the console and the log file at once."""

    def __init__(self, path: Path, stream):
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 - closed in main()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)

    def flush(self):
        self.stream.flush()
        self.file.flush()


class Context:
    """Shared state: options, device, deadline, table rows and JSON results."""

    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.deadline = time.monotonic() + args.budget_s
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.results: dict = {}

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def row(self, section, item, value, target="", verdict=""):
        self.rows.append((section, item, value, target, verdict))

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes; without CUDA runs the kernels through TRITON_INTERPRET=1"
    )
    ap.add_argument("--out", default=None, help="results folder (default $OUT, else ./gpu_check_out)")
    ap.add_argument(
        "--sections",
        default="identity,bandwidth,transfer,pipeline",
        help="comma-separated subset of identity,bandwidth,transfer,pipeline",
    )
    ap.add_argument("--check-elems", type=int, default=None, help="elements per identity case")
    ap.add_argument("--bw-elems", type=int, default=None, help="elements per bandwidth run")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    ap.add_argument("--ckpt-gb", type=float, default=None, help="size of each synthetic model (GB)")
    ap.add_argument("--ckpt-dir", default=None, help="where to build the synthetic checkpoints")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting optional work after this many seconds")
    args = ap.parse_args(argv)
    small = args.smoke
    args.check_elems = args.check_elems or (1_037 if small else 4 * 2**20 + 37)
    args.bw_elems = args.bw_elems or (2**12 if small else 2**28)
    args.reps = args.reps or (2 if small else 15)
    args.ckpt_gb = args.ckpt_gb if args.ckpt_gb is not None else (0.004 if small else 3.0)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    return args


def env_info(ctx) -> dict:
    torch = ctx.torch
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": ctx.cuda,
        "interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing ({exc})"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sms=props.multi_processor_count,
            gpu_mem_gb=round(props.total_memory / GB, 1),
            capability=list(torch.cuda.get_device_capability()),
        )
    return info


def timed(ctx, fn, reps: int, inner: int = 4) -> float:
    """Median seconds per ``fn()`` call, after one warm-up call (which also compiles).

    On the GPU each timed rep queues ``inner`` calls back to back between two events,
    so the host's launch overhead overlaps the previous call instead of being timed.
    """
    torch = ctx.torch
    fn()
    ctx.sync()
    times = []
    for _ in range(reps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[name]


def test_data(n: int, dtype, seed: int):
    """CPU tensor: a realistic half (weights near 0.02 scale) and a random-bit-pattern half."""
    import torch

    g = torch.Generator().manual_seed(seed)
    half = n // 2
    realistic = (torch.randn(half, generator=g) * 0.02).to(dtype)
    width = 32 if dtype == torch.float32 else 16
    int_dtype = torch.int32 if width == 32 else torch.int16
    raw = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), (n - half,), generator=g, dtype=torch.int64)
    return torch.cat([realistic, raw.to(int_dtype).view(dtype)])


def count_mismatches(got, want) -> int:
    """Elements that differ in bits, or in NaN-ness (any NaN matches any NaN)."""
    import torch

    got, want = got.cpu(), want.cpu()
    ints = {2: torch.int16, 4: torch.int32}[got.element_size()]
    nan_g, nan_w = torch.isnan(got.float()), torch.isnan(want.float())
    bad = (nan_g != nan_w) | (~nan_g & (got.view(ints) != want.view(ints)))
    return int(bad.sum())


def _select(tensors, with_u, with_b):
    """(f, a, u, b) with u and/or b dropped for vector mode / no DARE."""
    f, a, u, b = tensors
    return f, a, u if with_u else None, b if with_b else None


def section_identity(ctx) -> dict:
    """GPU kernel vs CPU torch reference, bit for bit."""
    import torch

    from resta_fast import rng
    from resta_fast.kernels import reference as ref
    from resta_fast.kernels import triton_patch as tp

    n = ctx.args.check_elems
    cases = []
    for in_name in DTYPE_NAMES:
        for out_name in DTYPE_NAMES:
            cases.append(((in_name,) * 4, out_name))
    mixes = (("bf16", "f16", "f32", "bf16"), ("f32", "bf16", "bf16", "f16"), ("f16", "f32", "f16", "bf16"))
    cases += [(mix, "bf16") for mix in mixes]
    total_bad, checked, failures = 0, 0, []
    inputs_cache = {}
    for in_names, out_name in cases:
        if ctx.time_left() < 60:
            failures.append("stopped early: time budget")
            break
        ins = []
        for k, name in enumerate(in_names):
            key = (k, name)
            if key not in inputs_cache:
                inputs_cache[key] = test_data(n, torch_dtype(name), seed=100 + k)
            ins.append(inputs_cache[key])
        dev = [t.to(ctx.device) for t in ins]
        modes = MODES if len(set(in_names)) == 1 else ("plain", "dare")
        for mode in modes:
            with_u, with_b = MODES[mode]
            # offset 2**32 - 3: counters past 32 bits and SHIFT = 1 (a chunk not 4-aligned)
            for offset in (2**32 - 3,) if mode == "dare" else (0,):
                kw = dict(beta=0.5, p=0.3, seed=rng.tensor_seed(42, "model.layers.0.mlp.up_proj.weight"), offset=offset)
                out_dtype = torch_dtype(out_name)
                got = torch.empty(n, dtype=out_dtype, device=ctx.device)
                got.view(torch.uint8).fill_(0x5A)
                tp.patch_into(got, *_select(dev, with_u, with_b), **kw)
                want = torch.empty(n, dtype=out_dtype)
                want.view(torch.uint8).fill_(0xA5)
                ref.patch_into(want, *_select(ins, with_u, with_b), **kw)
                bad = count_mismatches(got, want)
                checked += n
                total_bad += bad
                if bad:
                    failures.append(f"{'-'.join(in_names)}->{out_name} {mode} offset={offset}: {bad} differ")
    for src in DTYPE_NAMES:
        for dst in DTYPE_NAMES:
            x = test_data(n, torch_dtype(src), seed=7)
            got = torch.empty(n, dtype=torch_dtype(dst), device=ctx.device)
            tp.convert_into(got, x.to(ctx.device))
            want = torch.empty(n, dtype=torch_dtype(dst))
            ref.convert_into(want, x)
            bad = count_mismatches(got, want)
            checked += n
            total_bad += bad
            if bad:
                failures.append(f"convert {src}->{dst}: {bad} differ")
    seed = 2**63 + 5
    bad = count_mismatches(tp.uniform(seed, 2**31 - 1, n, device=ctx.device), rng.uniform(seed, 2**31 - 1, n))
    total_bad += bad
    if bad:
        failures.append(f"uniform: {bad} differ")
    for line in failures:
        print("  MISMATCH", line)
    verdict = "PASS" if total_bad == 0 and not failures else "FAIL"
    ctx.row("identity", f"{len(cases)} dtype cases, {n:,} elems each", f"{total_bad} differ", "0", verdict)
    return {"elements_checked": checked, "mismatches": total_bad, "failures": failures, "verdict": verdict}


def _bw_case(ctx, in_name, out_name, mode, n):
    """Tensors and bytes touched for one bandwidth case."""
    torch = ctx.torch
    with_u, with_b = MODES[mode]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    ins = [(torch.randn(n, generator=g, device=ctx.device) * 0.02).to(torch_dtype(in_name)) for _ in range(4)]
    f, a, u, b = ins[0], ins[1], ins[2] if with_u else None, ins[3] if with_b else None
    out = torch.empty(n, dtype=torch_dtype(out_name), device=ctx.device)
    touched = sum(t.numel() * t.element_size() for t in (f, a, u, b, out) if t is not None)
    return (out, f, a, u, b), touched


def section_bandwidth(ctx) -> dict:
    """Kernel GB/s vs a device copy of the same bytes; BLOCK x num_warps sweep."""
    torch = ctx.torch
    from resta_fast.kernels import triton_patch as tp

    n, reps = ctx.args.bw_elems, ctx.args.reps
    max_bytes = n * 4 * 5  # fp32 with U and B: five tensors
    src = torch.empty(max_bytes // 2, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)

    def copy_gbps(touched):
        half = touched // 2
        t = timed(ctx, lambda: dst[:half].copy_(src[:half]), reps)
        return touched / t / GB

    sweep_blocks = (1024, 2048, 4096, 8192)
    sweep_warps = (4, 8, 16)
    if ctx.args.smoke:
        sweep_blocks, sweep_warps = (1024, 4096), (4, 8)
    results = {"cases": [], "sweeps": {}}
    cases = [
        ("bf16", "bf16", "plain", True),
        ("bf16", "bf16", "dare", True),
        ("bf16", "bf16", "vector", False),
        ("f32", "f32", "plain", False),
        ("f16", "f16", "dare", False),
        ("f32", "bf16", "dare", False),
    ]
    for in_name, out_name, mode, sweep in cases:
        if ctx.time_left() < 90:
            print("  bandwidth: stopping early, time budget")
            break
        label = f"{in_name}->{out_name} {mode}"
        tensors, touched = _bw_case(ctx, in_name, out_name, mode, n)
        floor = copy_gbps(touched)
        kw = dict(beta=0.5, p=0.3, seed=12345)
        configs = [(b, w) for b in sweep_blocks for w in sweep_warps] if sweep else [(None, None)]
        measured = []
        for block, warps in configs:
            if ctx.time_left() < 60:
                break
            try:

                def run(ts=tensors, k=kw, b=block, w=warps):
                    tp.patch_into(*ts, **k, block=b, num_warps=w)

                t = timed(ctx, run, reps)
            except Exception as exc:  # noqa: BLE001 - one bad config must not end the sweep
                print(f"  {label} BLOCK={block} warps={warps}: {type(exc).__name__}: {exc}")
                continue
            gbps = touched / t / GB
            shown = (block or tp.BLOCK_SIZE, warps or tp.NUM_WARPS)
            measured.append(
                {"block": shown[0], "num_warps": shown[1], "seconds": t, "gbps": gbps, "vs_copy": gbps / floor}
            )
            print(
                f"  {label:22s} BLOCK={shown[0]:5d} warps={shown[1]:2d}  {gbps:8.4g} GB/s  "
                f"{gbps / floor:5.2f}x copy ({floor:.1f} GB/s)"
            )
        tensors = None  # free the GPU memory before the next case
        if not measured:
            continue
        default = next(
            (m for m in measured if (m["block"], m["num_warps"]) == (tp.BLOCK_SIZE, tp.NUM_WARPS)), measured[0]
        )
        best = max(measured, key=lambda m: m["gbps"])
        if sweep:
            results["sweeps"][label] = measured
            print(
                f"  {label}: best BLOCK={best['block']} num_warps={best['num_warps']} "
                f"({best['gbps']:.1f} GB/s, {best['vs_copy']:.2f}x copy); default "
                f"BLOCK={tp.BLOCK_SIZE} num_warps={tp.NUM_WARPS} {default['vs_copy']:.2f}x"
            )
            ctx.row("bandwidth", f"{label} best BLOCK/warps", f"{best['block']}/{best['num_warps']}", "", "")
        case = {"case": label, "bytes": touched, "copy_gbps": floor, "default": default, "best": best}
        results["cases"].append(case)
        value = f"{default['gbps']:.4g} GB/s = {default['vs_copy']:.2f}x copy"
        ctx.row(
            "bandwidth",
            f"{label} default",
            value,
            f">= {BW_TARGET}x",
            "PASS" if default["vs_copy"] >= BW_TARGET else "BELOW",
        )
    small = [torch.zeros(4096, dtype=torch.bfloat16, device=ctx.device) for _ in range(5)]
    t0 = time.perf_counter()
    calls = 20 if ctx.args.smoke else 200
    for _ in range(calls):
        tp.patch_into(*small, beta=0.5)
    ctx.sync()
    results["host_us_per_call"] = (time.perf_counter() - t0) / calls * 1e6
    print(f"  host cost of patch_into on 4096 elements: {results['host_us_per_call']:.1f} us/call")
    ctx.row("bandwidth", "patch_into host cost (4096 elems)", f"{results['host_us_per_call']:.1f} us/call")
    return results


def section_transfer(ctx) -> dict:
    """Pinned H2D / D2H and pageable H2D bandwidth."""
    torch = ctx.torch
    if not ctx.cuda:
        ctx.row("transfer", "H2D/D2H", "skipped (no CUDA)")
        return {"skipped": "no CUDA"}
    nbytes = 1 << 30
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    reps = max(3, ctx.args.reps // 3)
    res = {
        "h2d_pinned_gbps": nbytes / timed(ctx, lambda: dev.copy_(host, non_blocking=True), reps) / GB,
        "d2h_pinned_gbps": nbytes / timed(ctx, lambda: host.copy_(dev, non_blocking=True), reps) / GB,
        "h2d_pageable_gbps": nbytes / timed(ctx, lambda: dev.copy_(pageable), reps) / GB,
    }
    for key, value in res.items():
        ctx.row("transfer", key.replace("_gbps", ""), f"{value:.1f} GB/s")
    ctx.results["h2d_gbps"] = res["h2d_pinned_gbps"]
    return res


def _evict(path: Path) -> None:
    """Drop a file's clean pages from the page cache so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _filesystem_of(path: Path) -> str:
    """'type on mountpoint' of the mount holding ``path`` (tmpfs makes 'cold' reads warm)."""
    best = ("", "unknown")
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                _, mount, fstype = line.split()[:3]
                inside = str(path.resolve()).startswith(mount.rstrip("/") + "/") or mount == "/"
                if inside and len(mount) > len(best[0]):
                    best = (mount, fstype)
    except OSError:
        pass
    return f"{best[1]} on {best[0] or '?'}"


def _read_all(paths) -> int:
    """Read every byte of ``paths`` with large reads; returns bytes read."""
    total = 0
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                got = fh.readinto(view)
                if not got:
                    break
                total += got
    return total


def _save_shard(d: Path, tensors: dict) -> None:
    """Write ``tensors`` as the next numbered shard in ``d`` (nothing when empty)."""
    from safetensors.torch import save_file

    if tensors:
        k = len(list(d.glob("*.safetensors")))
        save_file(tensors, str(d / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})


def build_checkpoints(root: Path, gb: float, torch, device) -> dict[str, Path]:
    """Three sharded bf16 'Llama-ish' models (finetuned, aligned, unaligned) of ~``gb`` GB each."""
    from safetensors import safe_open

    hidden = 4096 if gb >= 0.5 else 64
    inter = 11008 if gb >= 0.5 else 172
    per_layer = [
        ("self_attn.q_proj", (hidden, hidden)),
        ("self_attn.o_proj", (hidden, hidden)),
        ("mlp.up_proj", (inter, hidden)),
        ("mlp.down_proj", (hidden, inter)),
    ]
    layer_bytes = sum(2 * a * b for _, (a, b) in per_layer)
    layers = max(1, round(gb * GB / layer_bytes))
    shard_bytes = max(layer_bytes, int(min(1e9, gb * GB / 3)))  # several shards per model
    names = {f"model.layers.{i}.{n}.weight": s for i in range(layers) for n, s in per_layer}
    dirs = {role: root / role for role in ("finetuned", "aligned", "unaligned")}
    g = torch.Generator(device=device).manual_seed(1)
    base = {}
    for role, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
        tensors = {}
        for name, shape in names.items():
            if role == "finetuned":
                base[name] = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
                tensors[name] = base[name]
            else:
                noise = torch.randn(shape, generator=g, device=device) * 1e-3
                tensors[name] = (base[name].to(device).float() + noise).to(torch.bfloat16).cpu()
            if sum(t.numel() * 2 for t in tensors.values()) >= shard_bytes:
                _save_shard(d, tensors)
                tensors = {}
        _save_shard(d, tensors)
        weight_map = {}
        for shard in sorted(d.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as fh:
                weight_map.update({name: shard.name for name in fh.keys()})  # noqa: SIM118 - not a dict
        total = sum(2 * a * b for a, b in names.values())
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    return dirs


def section_pipeline(ctx) -> dict:
    """End-to-end api.patch on the GPU vs min(cold disk read, pinned H2D)."""
    import importlib.util

    torch = ctx.torch
    needed = ("resta_fast.api", "resta_fast.pipeline.engine")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if ctx.cuda and missing:
        print(f"  pipeline not available ({', '.join(missing)} missing); skipping")
        ctx.row("pipeline", "end to end", "pipeline not available")
        return {"skipped": f"missing {missing}"}
    if ctx.time_left() < 120:
        ctx.row("pipeline", "end to end", "skipped (time budget)")
        return {"skipped": "time budget"}
    if not ctx.cuda and not ctx.args.smoke:
        ctx.row("pipeline", "end to end", "skipped (no CUDA)")
        return {"skipped": "no CUDA"}
    from resta_fast import api

    device = "cuda" if ctx.cuda else "cpu"  # cpu only in --smoke without a GPU
    root = Path(ctx.args.ckpt_dir) if ctx.args.ckpt_dir else Path(tempfile.mkdtemp(prefix="resta_gpu_check_"))
    res: dict = {"device": device}
    try:
        t0 = time.perf_counter()
        dirs = build_checkpoints(root, ctx.args.ckpt_gb, torch, device)
        res["build_seconds"] = time.perf_counter() - t0
        res["filesystem"] = _filesystem_of(root)
        inputs = [p for role in ("finetuned", "aligned", "unaligned") for p in sorted(dirs[role].glob("*.safetensors"))]
        in_bytes = sum(p.stat().st_size for p in inputs)
        res["input_bytes"] = in_bytes
        print(
            f"  built 3 models, {in_bytes / GB:.2f} GB of inputs in {res['build_seconds']:.1f} s "
            f"under {root} ({res['filesystem']})"
        )
        for p in inputs:
            _evict(p)
        t0 = time.perf_counter()
        _read_all(inputs)
        res["cold_read_gbps"] = in_bytes / (time.perf_counter() - t0) / GB
        t0 = time.perf_counter()
        _read_all(inputs)
        res["warm_read_gbps"] = in_bytes / (time.perf_counter() - t0) / GB
        h2d = ctx.results.get("h2d_gbps")
        floor = min(res["cold_read_gbps"], h2d) if h2d else res["cold_read_gbps"]
        warm_floor = min(res["warm_read_gbps"], h2d) if h2d else res["warm_read_gbps"]
        res.update(floor_gbps=floor, warm_floor_gbps=warm_floor)
        print(
            f"  read cold {res['cold_read_gbps']:.2f} GB/s, warm {res['warm_read_gbps']:.2f} GB/s, "
            f"pinned H2D {h2d if h2d else float('nan'):.2f} GB/s"
        )
        runs = [
            ("plain cold", dict(), True),
            ("plain warm", dict(), False),
            ("dare warm", dict(dare=0.3, seed=7), False),
        ]
        for label, extra, cold in runs:
            if ctx.time_left() < 45:
                print(f"  pipeline {label}: skipped, time budget")
                continue
            out = root / f"out-{label.replace(' ', '-')}"
            if cold:
                for p in inputs:
                    _evict(p)
            t0 = time.perf_counter()
            report = api.patch(
                str(dirs["finetuned"]),
                str(out),
                aligned=str(dirs["aligned"]),
                unaligned=str(dirs["unaligned"]),
                beta=0.5,
                device=device,
                backend="triton" if ctx.cuda else "auto",
                overwrite=True,
                fsync=False,
                **extra,
            )
            wall = time.perf_counter() - t0
            gbps = in_bytes / wall / GB
            ref_floor = floor if cold else warm_floor
            ratio = gbps / ref_floor
            bad = _check_pipeline_output(out, dirs, extra)
            busy = report.get("stats", {}).get("busy_seconds", {})
            res[label] = {
                "seconds": wall,
                "input_gbps": gbps,
                "vs_floor": ratio,
                "backend": report.get("backend"),
                "sampled_mismatches": bad,
                "busy_seconds": busy,
            }
            print(
                f"  pipeline {label}: {wall:.2f} s, {gbps:.2f} GB/s of inputs, {ratio:.2f}x floor, "
                f"backend {report.get('backend')}, sampled mismatches {bad}"
            )
            print("    busy s: " + ", ".join(f"{k} {v:.2f}" for k, v in busy.items()))
            ok = ratio >= PIPELINE_TARGET and bad == 0
            ctx.row(
                "pipeline",
                f"{label} ({in_bytes / GB:.1f} GB in)",
                f"{gbps:.2f} GB/s = {ratio:.2f}x floor",
                f">= {PIPELINE_TARGET}x, 0 diff",
                "PASS" if ok else ("FAIL" if bad else "BELOW"),
            )
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not ctx.args.ckpt_dir:
            shutil.rmtree(root, ignore_errors=True)
    return res


def _load(d: Path, name: str):
    """One tensor of a sharded checkpoint directory, flat, on CPU."""
    from safetensors import safe_open

    shard = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(d / shard), "pt") as fh:
        return fh.get_tensor(name).reshape(-1)


def _check_pipeline_output(out: Path, dirs, extra) -> int:
    """Recompute the first and last output tensors with the CPU reference; returns mismatches."""
    import torch

    from resta_fast import rng
    from resta_fast.kernels import reference as ref

    names = sorted(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    bad = 0
    for name in (names[0], names[-1]):
        f, a, u = (_load(dirs[role], name) for role in ("finetuned", "aligned", "unaligned"))
        got = _load(out, name)
        want = torch.empty_like(got)
        if "dare" in extra:
            seed = rng.tensor_seed(extra["seed"], name)
            ref.patch_into(want, f, a, u, a, beta=0.5, p=extra["dare"], seed=seed)
        else:
            ref.patch_into(want, f, a, u, beta=0.5)
        bad += count_mismatches(got, want)
    return bad


SECTIONS = {
    "identity": section_identity,
    "bandwidth": section_bandwidth,
    "transfer": section_transfer,
    "pipeline": section_pipeline,
}


def format_table(rows) -> str:
    """Fixed-width table of (section, item, value, target, verdict) rows."""
    header = ("section", "item", "value", "target", "verdict")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        if not args.smoke:
            print("gpu_check: no CUDA device; use --smoke to exercise the script on CPU", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before resta_fast.kernels.triton_patch is imported
    tee = Tee(out_dir / "gpu_check.log", sys.stdout)
    sys.stdout = tee
    try:
        ctx = Context(args)
        ctx.results["env"] = env_info(ctx)
        print(f"gpu_check: {json.dumps(ctx.results['env'])}")
        try:
            from resta_fast.kernels import triton_patch as tp

            print(f"launch defaults: BLOCK_SIZE={tp.BLOCK_SIZE} NUM_WARPS={tp.NUM_WARPS}")
        except Exception as exc:  # noqa: BLE001 - the sections report it in detail
            print(f"cannot import the triton backend: {type(exc).__name__}: {exc}")
        failed = []
        for name in args.sections:
            fn = SECTIONS.get(name)
            if fn is None:
                print(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
                continue
            print(f"\n== {name} ==")
            t0 = time.perf_counter()
            try:
                ctx.results[name] = fn(ctx)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next section
                traceback.print_exc(file=sys.stdout)
                ctx.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                ctx.row(name, "section", f"error: {type(exc).__name__}: {str(exc)[:80]}", "", "ERROR")
                failed.append(name)
            ctx.results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 2)
            print(f"== {name}: {time.perf_counter() - t0:.1f} s")
        print("\n" + format_table(ctx.rows))
        ctx.results["table"] = ctx.rows
        (out_dir / "gpu_check.json").write_text(json.dumps(ctx.results, indent=2, default=str) + "\n")
        print(f"\nwrote {out_dir / 'gpu_check.log'} and {out_dir / 'gpu_check.json'}")
        verdicts = [r[4] for r in ctx.rows]
        return 1 if failed or "FAIL" in verdicts or "ERROR" in verdicts else 0
    finally:
        sys.stdout = tee.stream
        tee.file.close()


if __name__ == "__main__":
    sys.exit(main())
