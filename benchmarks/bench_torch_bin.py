"""`resta-fast patch` from torch .bin inputs against the same weights as safetensors, in one run.

Builds synthetic Llama-shaped bf16 checkpoints (bench_patch.build_models: finetuned, aligned,
unaligned, sharded like HF), writes the same tensors in the same shards with torch.save
(``pytorch_model-0000K-of-0000N.bin`` + ``pytorch_model.bin.index.json``), then alternates

    safetensors      resta-fast patch over the three safetensors directories
    bin              resta-fast patch over the three .bin directories (io/torch_bin.py)
    convert          resta-fast convert of the fine-tune's .bin directory (only with --convert)
    convert-floor    its I/O floor: read the .bin fine-tune once, write as many bytes (with --convert)

in fresh processes, round by round (the order reversed every other round), so the machine's noise
hits each alike. Before it reports,
it checks that both patches wrote the same tensor bytes (the data sections of every output file;
the headers differ only by the inputs' fingerprints). Reported: per-round and median time ratio
bin / safetensors, and each command's peak RSS (wait4).

    python benchmarks/bench_torch_bin.py --params 5e7 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SELF = str(Path(__file__).resolve())
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_patch import build_models, run  # noqa: E402 - benchmarks/ is not a package


def build_bin_copies(root: Path) -> list[Path]:
    """The three safetensors models under ``root`` as .bin directories (same shards, order, config)."""
    import torch
    from safetensors.torch import load_file

    out = []
    for name in ("finetuned", "aligned", "unaligned"):
        src, dst = root / name, root / f"{name}_bin"
        out.append(dst)
        if (dst / "pytorch_model.bin.index.json").is_file():
            continue
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_bytes((src / "config.json").read_bytes())
        index = json.loads((src / "model.safetensors.index.json").read_text())
        weight_map = {}
        for shard in sorted(set(index["weight_map"].values())):
            target = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            tensors = load_file(str(src / shard))
            torch.save(tensors, dst / target)
            weight_map.update({n: target for n in tensors})
            del tensors
        index_text = json.dumps({"metadata": {}, "weight_map": weight_map})
        (dst / "pytorch_model.bin.index.json").write_text(index_text)
    return out


def data_digests(out: Path) -> dict[str, str]:
    """sha256 of each output weight file's data section (after its safetensors header)."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
            h = hashlib.sha256()
            while chunk := fh.read(16 << 20):
                h.update(chunk)
        found[f.name] = h.hexdigest()
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        root = Path(sys.argv[2])
        build_models(root, float(sys.argv[3]), float(sys.argv[4]))
        build_bin_copies(root)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.2e9)
    ap.add_argument("--shard-bytes", type=float, default=1e9)
    ap.add_argument("--dir", default="/tmp/resta_fast_bench_bin")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fsync", action="store_true", help="durable patches (default --no-fsync)")
    ap.add_argument("--convert", action="store_true", help="also time resta-fast convert of the .bin fine-tune")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    root = Path(args.dir) / "models"
    # Built in a child, so this process stays small: Linux charges a parent's peak RSS to its children.
    subprocess.run([sys.executable, SELF, "build", str(root), str(args.params), str(args.shard_bytes)], check=True)
    st = [root / n for n in ("finetuned", "aligned", "unaligned")]
    bins = [root / f"{n}_bin" for n in ("finetuned", "aligned", "unaligned")]
    sync = [] if args.fsync else ["--no-fsync"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def patch(models: list[Path], out: Path) -> list[str]:
        ft, al, un = (str(m) for m in models)
        return [
            sys.executable,
            "-m",
            "resta_fast",
            "patch",
            "--finetuned",
            ft,
            "--aligned",
            al,
            "--unaligned",
            un,
            "--beta",
            "0.5",
            "--out",
            str(out),
            "--overwrite",
            "--no-progress",
            *sync,
        ]

    outs = {"safetensors": Path(args.dir) / "out_st", "bin": Path(args.dir) / "out_bin"}
    cmds = {"safetensors": patch(st, outs["safetensors"]), "bin": patch(bins, outs["bin"])}
    if args.convert:
        conv = Path(args.dir) / "converted"
        cmds["convert"] = [sys.executable, "-m", "resta_fast", "convert", str(bins[0]), str(conv), "--overwrite"]
        cmds["convert"] += ["--no-progress", *sync]
        # convert's floor: read the .bin fine-tune once, write as many bytes (bench_patch's floor).
        shards = sorted(str(p) for p in bins[0].glob("*.bin"))
        out_bytes = sum(p.stat().st_size for p in (root / "finetuned").glob("*.safetensors"))
        cmds["convert-floor"] = [
            sys.executable,
            str(REPO / "benchmarks" / "bench_patch.py"),
            "floor",
            "--inputs",
            *shards,
            "--out",
            str(Path(args.dir) / "floor.bin"),
            "--out-bytes",
            str(out_bytes),
            *(["--fsync"] if args.fsync else []),
        ]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    digested: dict[str, dict] = {}
    for r in range(args.rounds):
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]  # A B C, C B A: the order's own cost cancels
        for name in order:
            cmd = cmds[name]
            # Flush the previous command's dirty pages first (untimed): otherwise whichever command runs
            # next pays for them, and the order, not the reader, decides the ratio.
            os.sync()
            results[name].append(run(cmd, env=env))
            print(f"round {r + 1} {name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]:.0f} MB", flush=True)
            if name in outs and name not in digested:
                digested[name] = data_digests(outs[name])
            # Each output goes once timed: four kept outputs beside two models' inputs overflow the page
            # cache at 1.2B on a 24 GB machine, and the next command would read its inputs from disk.
            for leftover in (outs.get(name), Path(args.dir) / "converted", Path(args.dir) / "floor.bin"):
                if leftover is not None and leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover is not None:
                    leftover.unlink(missing_ok=True)
    a, b = digested["safetensors"], digested["bin"]
    if a != b or not a:
        raise SystemExit(f"the .bin and safetensors patches differ: {a} vs {b}")
    ratios = [tb / ts for (tb, _), (ts, _) in zip(results["bin"], results["safetensors"], strict=True)]
    n_params = json.loads(next(root.glob("stamp-*.json")).read_text())["params"]
    in_bytes = sum(p.stat().st_size for d in bins for p in d.glob("*.bin"))
    summary = {
        "params": n_params,
        "bin_input_bytes": in_bytes,
        "rounds": args.rounds,
        "fsync": args.fsync,
        "seconds": {k: [round(t, 3) for t, _ in v] for k, v in results.items()},
        "peak_rss_mb": {k: round(max(m for _, m in v), 1) for k, v in results.items()},
        "ratio_bin_over_safetensors": [round(x, 3) for x in ratios],
        **(
            {
                "ratio_convert_over_floor": [
                    round(c / f, 3) for (c, _), (f, _) in zip(results["convert"], results["convert-floor"], strict=True)
                ]
            }
            if "convert" in results
            else {}
        ),
        "median_ratio": round(statistics.median(ratios), 3),
        "outputs_identical": True,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
