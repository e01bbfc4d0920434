"""End-to-end `resta-fast patch` against the I/O floor and peers, in one run.

Builds synthetic Llama-shaped bf16 checkpoints (finetuned, aligned, unaligned;
sharded like HF), then alternates the measured commands A B C A B C ... so the
shared machine's noise (dirty-page writeback above all) hits each alike, and
reports medians of per-round ratios to the floor measured in the same round:

    floor            read every input byte once + write the output bytes
    floor+fsync      the same, then fsync the output (for the durable patch)
    patch            resta-fast patch (durable: fsync before rename)
    patch-nofsync    resta-fast patch --no-fsync
    naive            load_file + torch + save_file (benchmarks/peers/naive_patch.py)
    mergekit         task_arithmetic via mergekit, in its own venv (--peers mergekit)

Each command runs in a fresh process; peak RSS comes from wait4().

    python benchmarks/bench_patch.py --params 1.3e9 --rounds 3 --backends cpp,torch
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
SELF = str(Path(__file__).resolve())  # children may run in another working directory
sys.path.insert(0, str(REPO))


def llama_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor shapes totalling about ``params`` parameters."""
    vocab = 32000
    for hidden in range(256, 8193, 128):
        inter = int(hidden * 2.6875) // 64 * 64
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
        if layers <= hidden // 64:  # keep depth ~ width/64, like real Llamas
            break
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_models(root: Path, params: float, shard_bytes: float) -> list[Path]:
    """Write (or reuse) finetuned/aligned/unaligned synthetic checkpoints."""
    import torch
    from safetensors.torch import save_file

    stamp = root / f"stamp-{params:.3g}-{shard_bytes:.3g}.json"
    dirs = [root / n for n in ("finetuned", "aligned", "unaligned")]
    if stamp.exists():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    shapes = llama_shapes(params)
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    groups.append(cur)
    hidden = shapes["model.norm.weight"][0]
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "bfloat16",
        "vocab_size": shapes["lm_head.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
        "num_hidden_layers": sum(n.endswith("input_layernorm.weight") for n in shapes),
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    for d, scale in zip(dirs, (0.02, 0.021, 0.019), strict=True):
        d.mkdir(parents=True)
        weight_map = {}
        for k, names in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(
                {n: (torch.randn(shapes[n]) * scale).to(torch.bfloat16) for n in names},
                str(d / fname),
                metadata={"format": "pt"},
            )
            weight_map.update({n: fname for n in names})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps(config))
    n_params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    stamp.write_text(json.dumps({"params": n_params, "shards": len(groups)}))
    return dirs


def floor_main(argv) -> None:
    """The I/O floor: read every input byte once, write the output bytes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", nargs="+")
    ap.add_argument("--out")
    ap.add_argument("--out-bytes", type=int)
    ap.add_argument("--fsync", action="store_true")
    args = ap.parse_args(argv)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for path in args.inputs:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    with open(args.out, "wb", buffering=0) as fh:
        left = args.out_bytes
        while left:
            left -= fh.write(view[: min(left, len(buf))])
        if args.fsync:
            os.fsync(fh.fileno())


def run(cmd: list[str], env=None) -> tuple[float, float]:
    """(seconds, peak RSS MB) of one command in a fresh process.

    It runs in the checkout its PYTHONPATH names: ``python -m`` puts the working
    directory first on sys.path, so run from elsewhere it could import that
    directory's resta_fast instead (an --old-repo run would measure this one).
    """
    cwd = (env or {}).get("PYTHONPATH") or None
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"command failed ({status}): {' '.join(cmd)}")
    return elapsed, usage.ru_maxrss / 1024


def drop_page_cache() -> None:
    """Write back dirty pages, then drop clean ones, so inputs come from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs to drop the page cache: {exc}") from None


def mergekit_python(venv: Path) -> str:
    """A venv with mergekit (torch pinned first: unpinned pulls a CUDA build)."""
    py = venv / "bin" / "python"
    if not (venv / "ok").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "mergekit"], check=True)
        (venv / "ok").write_text("")
    return str(py)


def mergekit_config(path: Path, ft: Path, al: Path, un: Path, beta: float, dare: float | None) -> Path:
    """RESTA as task arithmetic with base = aligned: ft (w=1) and unaligned (w=−β)."""
    method = "dare_linear" if dare else "task_arithmetic"
    extra = {"density": 1 - dare} if dare else {}
    cfg = (
        f"merge_method: {method}\nbase_model: {al}\ndtype: bfloat16\nparameters:\n  normalize: false\n"
        f"models:\n  - model: {ft}\n    parameters:\n      weight: 1.0\n"
        + "".join(f"      {k}: {v}\n" for k, v in extra.items())
        + f"  - model: {un}\n    parameters:\n      weight: {-beta}\n"
        + "".join(f"      {k}: {v}\n" for k, v in extra.items())
    )
    path.write_text(cfg)
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        floor_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        build_models(Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.3e9)
    ap.add_argument("--shard-bytes", type=float, default=1e9)
    ap.add_argument("--dir", default="/tmp/resta_fast_bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="cpp")
    ap.add_argument("--peers", default="naive", help="comma list of naive, mergekit (or none)")
    ap.add_argument("--dare", type=float, default=None)
    ap.add_argument("--modes", default="nofsync,fsync", help="nofsync, fsync or both")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--old-repo", help="an older checkout (its _C built): its patch runs alternate with this one's")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every command (needs root; Linux)")
    args = ap.parse_args()
    root = Path(args.dir)
    # Built in a child: Linux charges a parent's peak RSS to the children it
    # spawns (exec records the old mm's high-water mark), so this process must
    # stay small for the children's peak-RSS numbers to mean anything.
    subprocess.run(
        [sys.executable, SELF, "build", str(root / "models"), str(args.params), str(args.shard_bytes)], check=True
    )
    ft, al, un = (root / "models" / n for n in ("finetuned", "aligned", "unaligned"))
    inputs = sorted(str(p) for d in (ft, al, un) for p in d.glob("*.safetensors"))
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out_bytes = sum(os.path.getsize(p) for p in ft.glob("*.safetensors"))
    out = root / "out"
    py = sys.executable
    dare = ["--dare", str(args.dare)] if args.dare else []
    modes = args.modes.split(",")
    cmds: dict[str, list[str]] = {}
    for mode in modes:
        sync = [] if mode == "fsync" else ["--no-fsync"]
        cmds[f"floor-{mode}"] = [
            py,
            SELF,
            "floor",
            "--inputs",
            *inputs,
            "--out",
            str(root / "floor.bin"),
            "--out-bytes",
            str(out_bytes),
        ] + (["--fsync"] if mode == "fsync" else [])
        for backend in args.backends.split(","):
            cmds[f"patch-{backend}-{mode}"] = [
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
                "--beta",
                "0.5",
                "--out",
                str(out),
                "--overwrite",
                "--no-progress",
                "--backend",
                backend,
                *dare,
                *sync,
            ]
            if args.old_repo:
                cmds[f"old-patch-{backend}-{mode}"] = cmds[f"patch-{backend}-{mode}"]
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    if "naive" in peers and not args.dare:
        cmds["naive"] = [
            py,
            str(REPO / "benchmarks/peers/naive_patch.py"),
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--beta",
            "0.5",
            "--out",
            str(out),
        ]
    if "mergekit" in peers:
        mk = mergekit_python(root / "mergekit-venv")
        cfg = mergekit_config(root / "mergekit.yml", ft, al, un, 0.5, args.dare)
        cmds["mergekit"] = [
            str(Path(mk).parent / "mergekit-yaml"),
            str(cfg),
            str(out),
            "--lazy-unpickle",
            "--no-copy-tokenizer",
            "--out-shard-size",
            "1B",
        ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    old_env = dict(os.environ, PYTHONPATH=str(args.old_repo)) if args.old_repo else None
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            shutil.rmtree(out, ignore_errors=True)
            (root / "floor.bin").unlink(missing_ok=True)
            if args.cold:
                drop_page_cache()
            t, rss = run(cmd, old_env if name.startswith("old-") else env)
            results[name].append((t, rss))
            if r == 0 and name.startswith(("patch-", "old-patch-")):
                # Correct before fast: recompute 20k sampled elements from the
                # inputs with the torch reference and compare bit for bit.
                subprocess.run(
                    [
                        py,
                        "-m",
                        "resta_fast",
                        "verify",
                        str(out),
                        "--against",
                        str(ft),
                        str(al),
                        str(un),
                        "--samples",
                        "20000",
                    ],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            print(
                f"round {r + 1} {name:24s} {t:7.2f} s  {in_bytes / t / 1e9:6.2f} GB/s in  rss {rss:6.0f} MB", flush=True
            )
    print(f"\ninputs {in_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, {args.rounds} rounds, medians:")
    summary = {}
    for name, vals in results.items():
        mode = "fsync" if name.endswith("-fsync") and not name.endswith("nofsync") else "nofsync"
        floor = results.get(f"floor-{mode}") or results.get("floor-nofsync") or results.get("floor-fsync")
        ratios = [t / f[0] for (t, _), f in zip(vals, floor, strict=True)]
        summary[name] = {
            "median_s": statistics.median(t for t, _ in vals),
            "ratio_to_floor": statistics.median(ratios),
            "peak_rss_mb": max(r for _, r in vals),
            "input_GBps": in_bytes / statistics.median(t for t, _ in vals) / 1e9,
        }
        s = summary[name]
        print(
            f"  {name:24s} {s['median_s']:7.2f} s  x{s['ratio_to_floor']:5.2f} floor({mode})  "
            f"{s['input_GBps']:5.2f} GB/s  peak rss {s['peak_rss_mb']:6.0f} MB"
        )
    for peer in ("naive", "mergekit"):
        if peer in results:
            for name in results:
                if name.startswith("patch-") and name.endswith("nofsync"):
                    pairs = zip(results[peer], results[name], strict=True)
                    sp = statistics.median(p[0] / o[0] for p, o in pairs)
                    pairs = zip(results[peer], results["floor-nofsync"], strict=True)
                    allowed = statistics.median(p[0] / f[0] for p, f in pairs)
                    print(f"  speed-up of {name} over {peer}: {sp:.2f}x (the floor allows {allowed:.2f}x)")
                    summary[f"speedup_{name}_vs_{peer}"] = {"speedup": sp, "floor_allows": allowed}
    for name in results:
        if name.startswith("old-"):
            new = name[len("old-") :]
            ratio = statistics.median(o[0] / n[0] for o, n in zip(results[name], results[new], strict=True))
            print(f"  {new}: this checkout is {ratio:.2f}x as fast as {args.old_repo} (median of per-round ratios)")
            summary[f"speedup_{new}_vs_old"] = ratio
    if args.json:
        Path(args.json).write_text(
            json.dumps({"in_bytes": in_bytes, "out_bytes": out_bytes, "rounds": results, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
