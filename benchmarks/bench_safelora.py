"""Safe LoRA: the factored projection against the formed-C one, and end to end against the I/O floor.

Two measurements, each command in a fresh process (peak RSS from wait4), the
compared commands alternated A B A B ... so the shared machine's drift hits
both alike; medians and per-round ratios are reported.

``module``: one 7B-shaped module (V 11008 × 4096, r = 16, fp32).
    factored   B' = V·(Vᵀ·B)/‖V‖_F and the cosine from r × r Gram matrices (resta_fast.safelora)
    formed     C = V·Vᵀ/‖V‖_F, B' = C·B, cos over vec(B'·A), vec(B·A), as the authors' code does
    Both report B', cos; the run checks they agree (1e-5 relative on B').

``e2e``: ``resta-fast safelora`` on a synthetic Llama (bf16; --params, default 1.2e9) with a
    rank-16 adapter on q/k/v/o/gate/up/down, against the floor: read the targeted tensors of
    both models and the adapter once, write the adapter's bytes (and fsync, as safelora does).

    python benchmarks/bench_safelora.py module --rounds 2
    python benchmarks/bench_safelora.py e2e --params 1.2e9 --rounds 3
    python benchmarks/bench_safelora.py e2e --params 1.2e9 --rounds 5 --old /path/to/an/older/checkout

``--old``: also run an older checkout's ``resta-fast safelora`` (``python -m resta_fast`` from
that directory, its ``_C`` built or copied in), alternated with this one's in every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SELF = str(Path(__file__).resolve())
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def child_module(form: str, out: str) -> None:
    """One module, one form; writes {seconds, b_proj (path), cos} for the parent."""
    import torch

    torch.manual_seed(0)
    v = torch.randn(11008, 4096) * 0.01
    b = torch.randn(11008, 16) * 0.02
    a = torch.randn(16, 4096) * 0.02
    t0 = time.perf_counter()
    if form == "factored":
        from resta_fast.safelora import lora_cosine, projected_b

        b_proj = projected_b(v, b)
        cos = lora_cosine(a, b, b_proj)
    else:
        c = v @ v.T / torch.linalg.norm(v)
        b_proj = c @ b
        cos = torch.nn.functional.cosine_similarity((b_proj @ a).reshape(1, -1), (b @ a).reshape(1, -1)).item()
    seconds = time.perf_counter() - t0
    torch.save(b_proj, out + ".pt")
    Path(out).write_text(json.dumps({"seconds": seconds, "cos": cos}))


def measure(cmd: list[str], cwd=None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed")
    return wall, usage.ru_maxrss / 1024


def module_main(args) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {"factored": [], "formed": []}
    for _ in range(args.rounds):
        for form in ("factored", "formed"):
            out = str(work / f"{form}.json")
            _, rss = measure([sys.executable, SELF, "child-module", form, out])
            res = json.loads(Path(out).read_text())
            rows[form].append({"seconds": res["seconds"], "peak_rss_mib": rss, "cos": res["cos"]})
    bf, bc = torch.load(str(work / "factored.json.pt")), torch.load(str(work / "formed.json.pt"))
    rel = float(torch.linalg.norm(bf.double() - bc.double()) / torch.linalg.norm(bc.double()))
    # The fp64 reference (same seeded inputs): B' = V(VᵀB)/‖V‖_F and the cosine, both in fp64.
    torch.manual_seed(0)
    v = (torch.randn(11008, 4096) * 0.01).double()
    b = (torch.randn(11008, 16) * 0.02).double()
    a = (torch.randn(16, 4096) * 0.02).double()
    ref = v @ (v.T @ b) / torch.linalg.norm(v)
    del v
    x, y = (ref @ a).reshape(-1), (b @ a).reshape(-1)
    cos64 = float(x @ y / (x.norm() * y.norm()))
    fp64 = {"cos": cos64}
    for form, t in (("factored", bf), ("formed", bc)):
        fp64[f"{form}_b_proj_rel_error"] = float(torch.linalg.norm(t.double() - ref) / torch.linalg.norm(ref))
        fp64[f"{form}_cos_error"] = abs(rows[form][0]["cos"] - cos64)
    med = {f: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for f, rs in rows.items()}
    return {
        "shape": [11008, 4096],
        "rank": 16,
        "dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "rounds": rows,
        "median": med,
        "speedup_factored_vs_formed": med["formed"]["seconds"] / med["factored"]["seconds"],
        "b_proj_relative_difference": rel,
        "cos": {f: rs[0]["cos"] for f, rs in rows.items()},
        "fp64": fp64,
    }


def build_adapter(path: Path, aligned: Path, rank: int = 16) -> Path:
    """A PEFT LoRA adapter (fp32, r = 16) on every q/k/v/o/gate/up/down of ``aligned``."""
    import torch
    from safetensors.torch import save_file

    from resta_fast.io.checkpoint import Checkpoint

    if (path / "adapter_model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    ck = Checkpoint(aligned)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in ck.names():
        module = name.removesuffix(".weight")
        if module.split(".")[-1] in TARGETS:
            d_out, d_in = ck.info(name).shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    ck.close()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": list(TARGETS),
                "task_type": "CAUSAL_LM",
                "fan_in_fan_out": False,
            }
        )
    )
    return path


def child_floor(aligned: str, unaligned: str, adapter: str, out: str) -> None:
    """Read the targeted tensors of both models and the adapter once; write and fsync the adapter's bytes."""
    from resta_fast.io.checkpoint import Checkpoint

    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in (aligned, unaligned):
        ck = Checkpoint(path)
        for name in ck.names():
            if name.removesuffix(".weight").split(".")[-1] not in TARGETS:
                continue
            info, f = ck.info(name), ck.file_of(name)
            for lo in range(info.start, info.end, len(buf)):
                n = min(len(buf), info.end - lo)
                f.read_into(view[:n], lo)
        ck.close()
    src = Path(adapter) / "adapter_model.safetensors"
    with open(src, "rb", buffering=0) as fh, open(out, "wb", buffering=0) as dst:
        while n := fh.readinto(buf):
            dst.write(view[:n])
        os.fsync(dst.fileno())


def child_build(work: str, params: str) -> None:
    from bench_patch import build_models

    _, aligned, _ = build_models(Path(work) / "models", float(params), 4.0e9)
    build_adapter(Path(work) / "adapter", aligned)


def e2e_main(args) -> dict:
    import shutil

    root = Path(args.work)
    # Built in a child: a forked child's ru_maxrss starts from its parent's, so the parent stays small.
    measure([sys.executable, SELF, "child-build", str(root), str(args.params)])
    aligned, unaligned, adapter = root / "models" / "aligned", root / "models" / "unaligned", root / "adapter"
    target_bytes = 0
    from resta_fast.io.checkpoint import Checkpoint

    for p in (aligned, unaligned):
        ck = Checkpoint(p)
        target_bytes += sum(
            ck.info(n).nbytes for n in ck.names() if n.removesuffix(".weight").split(".")[-1] in TARGETS
        )
        ck.close()
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    rows = {"floor": [], "safelora": []}
    checkouts = {"safelora": REPO}
    if args.old:
        rows["safelora_old"] = []
        checkouts["safelora_old"] = Path(args.old).resolve()
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)  # each checkout writes out/<which>; the command wants the parent
    for k in range(args.rounds):
        wall, rss = measure(
            [sys.executable, SELF, "child-floor", str(aligned), str(unaligned), str(adapter), str(root / "floor.bin")]
        )
        # The 1-minute load average before each round: on the shared VM it says how much of the
        # 2 cores the round had (other engineers' tests ran to load 13 during these benchmarks).
        rows["floor"].append({"seconds": wall, "peak_rss_mib": rss, "loadavg_before": os.getloadavg()[0]})
        order = list(checkouts) if k % 2 == 0 else list(checkouts)[::-1]  # neither always runs right after the floor
        for which in order:
            shutil.rmtree(out / which, ignore_errors=True)
            wall, rss = measure(
                [
                    sys.executable,
                    "-m",
                    "resta_fast",
                    "safelora",
                    "--adapter",
                    str(adapter),
                    "--aligned",
                    str(aligned),
                    "--unaligned",
                    str(unaligned),
                    "--threshold",
                    "0.5",
                    "--out",
                    str(out / which),
                    "--no-progress",
                ],
                cwd=str(checkouts[which]),
            )
            rows[which].append({"seconds": wall, "peak_rss_mib": rss})
    ratios = {
        which: [s["seconds"] / f["seconds"] for s, f in zip(rows[which], rows["floor"], strict=True)]
        for which in checkouts
    }
    if args.old:
        reports = {w: json.loads((out / w / "resta_fast.json").read_text())["safelora"]["modules"] for w in checkouts}
        same = [(m["module"], m["cos"], m["projected"]) for m in reports["safelora"]] == [
            (m["module"], m["cos"], m["projected"]) for m in reports["safelora_old"]
        ]
    out = out / "safelora"
    report = json.loads((out / "resta_fast.json").read_text())
    return {
        "params": args.params,
        "targeted_bytes_read": target_bytes,
        "adapter_bytes": adapter_bytes,
        "modules": len(report["safelora"]["modules"]),
        "projected": report["safelora"]["projected"],
        "rounds": rows,
        "ratio_to_floor_per_round": ratios["safelora"],
        "median_ratio_to_floor": statistics.median(ratios["safelora"]),
        "median_seconds": {k: statistics.median(r["seconds"] for r in v) for k, v in rows.items()},
        "median_peak_rss_mib": {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in rows.items()},
        **(
            {
                "old_checkout_ratio_to_floor_per_round": ratios["safelora_old"],
                "old_median_ratio_to_floor": statistics.median(ratios["safelora_old"]),
                "new_over_old_per_round": [
                    n["seconds"] / o["seconds"] for n, o in zip(rows["safelora"], rows["safelora_old"], strict=True)
                ],
                "cosines_and_decisions_equal_old": same,
            }
            if args.old
            else {}
        ),
        "model_bytes_each": target_bytes // 2,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child-module":
        return child_module(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == "child-build":
        return child_build(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 1 and sys.argv[1] == "child-floor":
        return child_floor(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("module", "e2e"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--params", type=float, default=1.2e9)
    ap.add_argument("--work", default="/tmp/resta-bench-safelora")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--old", help="e2e: an older checkout to alternate with this one (its _C built or copied in)")
    args = ap.parse_args()
    result = module_main(args) if args.what == "module" else e2e_main(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
