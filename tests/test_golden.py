"""Golden digests: today's exact output bytes of every output kind, pinned.

Purpose: prove a refactor of the streaming engine byte-identical. Every case is
run through the CLI (or the public API where the CLI has no knob, e.g.
``chunk_elems``) on each available backend, and every output file is digested:

- ``*.safetensors``: sha256 of the data region (the bytes after the 8 + N
  header) and sha256 of the header JSON with only the tool version masked
  (``<VERSION>``, so a release does not re-record every digest), re-serialised
  with ``sort_keys``. Nothing else is masked: the provenance records the
  inputs by content (``io.identity``), so neither the run's root directory nor
  the inputs' mtimes reach the bytes, and the test checks that no output file
  names the root.
- other files (index, config, adapter config): sha256 of the file.
- ``resta_fast.json``: one digest per stable field (plan, params, inputs,
  sources, file list ...); ``created`` and timings are left out, and the
  report's per-file sha256 values are checked against the files instead of
  pinned (whole-file hashes include the version).
- the model card (``README.md``) is checked against the report's sha256 like
  every file, but it is not pinned here: tests/test_card.py checks its content.
  Every other byte stays pinned.

The fixture INPUT files are digested too (case ``inputs``), so a fixture change
(numpy, safetensors or this file) is reported as such, not as a code change.

Fixture values come from numpy's PCG64 raw 64-bit stream
(``default_rng(seed).bit_generator.random_raw``, whose output is guaranteed
stable across numpy versions), mapped to fp32 with exact operations and
rounded to bf16/fp16 by torch's deterministic ``.to()``.

Regenerate (only when a change of output is intended and understood):

    RESTA_GOLDEN_UPDATE=1 python -m pytest -q tests/test_golden.py   # writes, then fails
    python -m pytest -q tests/test_golden.py                          # must pass
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import llama_config, write_model
from safetensors.torch import save_file

import resta_fast
from resta_fast import api
from resta_fast.cli import main as cli_main
from resta_fast.kernels import backend_status

GOLDEN = Path(__file__).with_name("golden_digests.json")
UPDATE = os.environ.get("RESTA_GOLDEN_UPDATE") == "1"
REPORT = "resta_fast.json"
CARD = "README.md"  # the model card: see the module docstring

VOCAB, HIDDEN, INTER, LAYERS, HEADS, EXTRA_ROWS = 32, 16, 24, 2, 2, 5
BUFFER = "model.layers.0.self_attn.rotary_emb.position_ids"  # int64: copied, never patched


def _backends() -> list[str]:
    status = backend_status()
    names = [b for b in ("cpp", "torch") if status.get(b) == "ok"]
    # The Triton CPU interpreter: only when conftest enabled it before triton was imported.
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from triton.runtime.interpreter import InterpretedFunction

            from resta_fast.kernels import triton_patch

            if isinstance(triton_patch._resta_patch_kernel, InterpretedFunction):
                names.append("triton")
        except Exception:  # noqa: BLE001 - triton is optional
            pass
    return names


BACKENDS = _backends()
# The Triton interpreter costs ~1 s per patch even on these tiny models: a subset of cases
# that covers its kernels (plain bf16, DARE, fp16 in and out, fp32 out) runs on it.
TRITON_CASES = ("plain", "dare", "fp16", "dtype_f32")


# --- deterministic, torch-RNG-free fixtures ------------------------------------------------


def values(seed: int, shape, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
    """fp32 values uniform in [offset - scale, offset + scale), from PCG64's raw stream."""
    n = int(np.prod(shape))
    raw = np.random.default_rng(seed).bit_generator.random_raw(n)
    u = (raw >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)  # exact
    x = u * np.float32(scale) + np.float32(offset)
    return torch.from_numpy(x.reshape(shape).copy())


def llama(seed: int, dtype, *, extra_rows: int = 0, lm_head: bool = True) -> dict[str, torch.Tensor]:
    shapes = {"model.embed_tokens.weight": (VOCAB + extra_rows, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    if lm_head:
        shapes["lm_head.weight"] = (VOCAB + extra_rows, HIDDEN)
    out = {}
    for k, (name, shape) in enumerate(shapes.items()):
        norm = name.endswith("norm.weight")
        out[name] = values(seed * 1000 + k, shape, offset=1.0 if norm else 0.0).to(dtype)
    return out


def related(base: dict, seed: int, scale: float, dtype, *, extra_rows: int = 0) -> dict:
    """base + small noise (fp32 arithmetic, then rounded); extra vocabulary rows are fresh."""
    out = {}
    for k, (name, t) in enumerate(base.items()):
        shape = list(t.shape)
        if extra_rows and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            shape[0] += extra_rows
            grown = values(seed * 1000 + 500 + k, shape)
            grown[: t.shape[0]] = t.float()
            t = grown
        out[name] = (t.float() + values(seed * 1000 + k, shape, scale=scale)).to(dtype)
    return out


def build_inputs(root: Path) -> dict[str, Path]:
    bf16, f16 = torch.bfloat16, torch.float16
    cfg = llama_config(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, inter=INTER, heads=HEADS)
    cfg_extra = llama_config(vocab=VOCAB + EXTRA_ROWS, hidden=HIDDEN, layers=LAYERS, inter=INTER, heads=HEADS)
    cfg_tied = llama_config(vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, inter=INTER, heads=HEADS, tie=True)
    cfg16 = {**cfg, "torch_dtype": "float16"}
    m = root / "inputs"
    p: dict[str, Path] = {}

    aligned = llama(1, bf16)
    unaligned = related(aligned, 2, 0.01, bf16)
    ft = related(aligned, 3, 0.005, bf16)
    ft[BUFFER] = torch.arange(8, dtype=torch.int64).reshape(1, 8)
    p["aligned"] = write_model(m / "aligned", aligned, config=cfg)
    p["unaligned"] = write_model(m / "unaligned", unaligned, config=cfg)
    p["ft"] = write_model(m / "ft", ft, shards=2, config=cfg)
    (p["ft"] / "generation_config.json").write_text(json.dumps({"do_sample": False}, sort_keys=True))
    p["ft_extra"] = write_model(
        m / "ft_extra", related(aligned, 4, 0.005, bf16, extra_rows=EXTRA_ROWS), config=cfg_extra
    )

    a16 = {k: v.float().to(f16) for k, v in aligned.items()}
    p["aligned16"] = write_model(m / "aligned16", a16, config=cfg16)
    p["unaligned16"] = write_model(m / "unaligned16", related(a16, 5, 0.01, f16), config=cfg16)
    p["ft16"] = write_model(m / "ft16", related(a16, 6, 0.005, f16), config=cfg16)

    # Tied: the fine-tune stores equal embed/lm_head; aligned/unaligned store no lm_head.
    at = llama(7, bf16, lm_head=False)
    p["aligned_tied"] = write_model(m / "aligned_tied", at, config=cfg_tied)
    p["unaligned_tied"] = write_model(m / "unaligned_tied", related(at, 8, 0.01, bf16), config=cfg_tied)
    ftt = related(at, 9, 0.005, bf16)
    ftt["lm_head.weight"] = ftt["model.embed_tokens.weight"].clone()
    p["ft_tied"] = write_model(m / "ft_tied", ftt, config=cfg_tied)

    # A PEFT LoRA adapter (fp32, as peft saves it) trained on `aligned`.
    adapter = m / "lora"
    adapter.mkdir(parents=True)
    lora, k = {}, 0
    for i in range(LAYERS):
        for mod, (fan_out, fan_in) in (
            ("self_attn.q_proj", (HIDDEN, HIDDEN)),
            ("self_attn.v_proj", (HIDDEN, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTER)),
        ):
            key = f"base_model.model.model.layers.{i}.{mod}"
            lora[f"{key}.lora_A.weight"] = values(9000 + k, (4, fan_in), scale=0.1)
            lora[f"{key}.lora_B.weight"] = values(9100 + k, (fan_out, 4), scale=0.1)
            k += 1
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
            },
            sort_keys=True,
        )
    )
    p["lora"] = adapter
    return p


# --- digests ---------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Canon:
    """Mask the tool version (and only it), and check that no output names the run's root."""

    def __init__(self, root: Path):
        self.roots = sorted({str(root), str(root.resolve())}, key=len, reverse=True)

    def obj(self, o):
        text = json.dumps(o, sort_keys=True)
        for r in self.roots:
            assert r not in text, f"an output names the run's root {r}: {text[:200]}"
        return o

    def digest(self, o) -> str:
        return sha(json.dumps(self.obj(o), sort_keys=True).encode())

    def header(self, header: dict) -> dict:
        header = json.loads(json.dumps(header))
        meta = header.get("__metadata__") or {}
        if "resta_fast" in meta:
            prov = json.loads(meta["resta_fast"])
            if prov.get("version") == resta_fast.__version__:
                prov["version"] = "<VERSION>"
            meta["resta_fast"] = json.dumps(prov, sort_keys=True)
        return self.obj(header)


def safetensors_digest(path: Path, canon: Canon) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return {"data": sha(raw[8 + n :]), "header": canon.digest(canon.header(header))}


def report_digest(out: Path, canon: Canon) -> dict:
    report = json.loads((out / REPORT).read_text())
    listed = report.get("files", {})
    on_disk = sorted(p.name for p in out.iterdir() if p.name != REPORT)
    assert sorted(listed) == on_disk, f"{out}: report lists {sorted(listed)}, directory has {on_disk}"
    for name, digest in listed.items():
        assert sha((out / name).read_bytes()) == digest, f"{out}/{name}: sha256 differs from the report"
    listed = {name: digest for name, digest in listed.items() if name != CARD}
    if report.get("version") == resta_fast.__version__:
        report["version"] = "<VERSION>"
    stats = report.get("stats", {})
    stable = {
        "provenance": {k: report.get(k) for k in ("tool", "version", "command", "params", "inputs", "sources")},
        "plan": report.get("plan"),
        "file_names": sorted(listed),
        "device_fsync": [report.get("device"), report.get("fsync")],
        "stats": {"bytes_written": stats.get("bytes_written"), "nonfinite_outputs": stats.get("nonfinite_outputs")},
        "other_keys": sorted(
            set(report)
            - {
                "created",
                "stats",
                "backend",
                "files",
                "plan",
                "tool",
                "version",
                "command",
                "params",
                "inputs",
                "sources",
                "device",
                "fsync",
            }
        ),
    }
    if "batch" in report:
        stable["batch"] = report["batch"]
    # Big fields as digests; small ones as their (canonical) values, so a diff is readable.
    return {
        f"{REPORT}:{k}": canon.digest(v) if k in ("provenance", "plan") else json.dumps(canon.obj(v), sort_keys=True)
        for k, v in stable.items()
    }


def dir_digest(out: Path, canon: Canon) -> dict:
    d: dict = {}
    for p in sorted(out.iterdir()):
        if p.name == CARD:
            continue  # checked against the report's sha256 in report_digest, not pinned
        if p.name == REPORT:
            d.update(report_digest(out, canon))
        elif p.name.endswith(".safetensors"):
            d[p.name] = safetensors_digest(p, canon)
        else:
            d[p.name] = sha(p.read_bytes())
    return d


def input_digests(inputs: dict[str, Path], root: Path) -> dict:
    return {
        str(f.relative_to(root)): sha(f.read_bytes())
        for path in inputs.values()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


# --- running every output kind ---------------------------------------------------------------


def cli(*args) -> None:
    argv = [str(a) for a in args] + ["--no-fsync", "--no-progress"]
    assert cli_main(argv) == 0, f"resta-fast {' '.join(argv)} failed"


def run_cases(root: Path, inp: dict[str, Path]) -> dict[str, Path]:
    """Every case -> its output directory (keys ``case@backend`` for per-backend cases)."""
    out = root / "out"
    out.mkdir()
    outs: dict[str, Path] = {}

    # The safety vector (its own code path, no backend flag); then an input to patch --vector.
    outs["vector"] = out / "vector"
    outs["vector_bf16"] = out / "vector_bf16"
    pair = ["--aligned", inp["aligned"], "--unaligned", inp["unaligned"]]
    cli("vector", *pair, "--out", outs["vector"])
    cli("vector", *pair, "--dtype", "bfloat16", "--out", outs["vector_bf16"])

    for b in BACKENDS:

        def patch(case, ft, *args, b=b):
            if b == "triton" and case not in TRITON_CASES:
                return
            outs[f"{case}@{b}"] = out / f"{case}@{b}"
            cli("patch", "--finetuned", ft, *args, "--backend", b, "--out", outs[f"{case}@{b}"])

        patch("plain", inp["ft"], *pair, "--beta", "0.5")
        patch("vector_patch", inp["ft"], "--vector", outs["vector"], "--beta", "0.5")
        patch("dare", inp["ft"], *pair, "--beta", "0.5", "--dare", "0.3", "--seed", "7")
        patch(
            "vector_dare",
            inp["ft"],
            "--vector",
            outs["vector"],
            "--dare-base",
            inp["aligned"],
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
        )
        patch("dtype_f32", inp["ft"], *pair, "--beta", "0.5", "--dtype", "float32")
        patch("rules", inp["ft"], *pair, "--beta", "1.25", "--beta-rule", r"mlp\.=0.3", "--exclude", "norm")
        patch("extra_vocab", inp["ft_extra"], *pair, "--beta", "0.75", "--dare", "0.2", "--seed", "3")
        patch(
            "fp16",
            inp["ft16"],
            "--aligned",
            inp["aligned16"],
            "--unaligned",
            inp["unaligned16"],
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
        )
        patch(
            "fp16_to_bf16",
            inp["ft16"],
            "--aligned",
            inp["aligned16"],
            "--unaligned",
            inp["unaligned16"],
            "--beta",
            "0.5",
            "--dtype",
            "bfloat16",
        )
        patch(
            "tied",
            inp["ft_tied"],
            "--aligned",
            inp["aligned_tied"],
            "--unaligned",
            inp["unaligned_tied"],
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
        )
        patch("lora", inp["lora"], "--base", inp["aligned"], *pair, "--beta", "0.5")
        patch(
            "lora_dare", inp["lora"], "--base", inp["aligned"], *pair, "--beta", "0.5", "--dare", "0.3", "--seed", "7"
        )
        if b == "triton":
            continue

        # The same DARE patch, chunk edges mid-row and mid-Philox-counter, 2 threads (API only).
        outs[f"dare_chunk37@{b}"] = out / f"dare_chunk37@{b}"
        api.patch(
            inp["ft"],
            outs[f"dare_chunk37@{b}"],
            aligned=inp["aligned"],
            unaligned=inp["unaligned"],
            beta=0.5,
            dare=0.3,
            seed=7,
            backend=b,
            threads=2,
            chunk_elems=37,
            fsync=False,
        )

        # batch: three jobs sharing the pair (fused into one pass), one with DARE.
        bdir = out / f"batch@{b}"
        bdir.mkdir()
        manifest = {
            "aligned": str(inp["aligned"]),
            "unaligned": str(inp["unaligned"]),
            "beta": 0.5,
            "backend": b,
            "fsync": False,
            "jobs": [
                {"name": "plain", "finetuned": str(inp["ft"]), "out": str(bdir / "plain")},
                {"name": "dare", "finetuned": str(inp["ft"]), "out": str(bdir / "dare"), "dare": 0.3, "seed": 7},
                {
                    "name": "extra",
                    "finetuned": str(inp["ft_extra"]),
                    "out": str(bdir / "extra"),
                    "beta": 0.75,
                    "dare": 0.2,
                    "seed": 3,
                },
            ],
        }
        (bdir / "batch.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        assert cli_main(["batch", str(bdir / "batch.json"), "--no-progress", "--no-fsync"]) == 0
        for job in ("plain", "dare", "extra"):
            outs[f"batch_{job}@{b}"] = bdir / job

    # The engine in its GPU configuration (inputs preaded into reusable buffers by
    # reader threads), on CPU buffers with the torch reference kernel.
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.kernels import reference
    from resta_fast.pipeline.engine import run_jobs
    from resta_fast.pipeline.job import Inputs, Job
    from resta_fast.plan import build_plan

    staged = out / "staged_cpu"
    staged.mkdir()
    F, A, U = Checkpoint(inp["ft"]), Checkpoint(inp["aligned"]), Checkpoint(inp["unaligned"])
    try:
        plan = build_plan(F, aligned=A, unaligned=U, dare_base=A, beta=0.5)
        job = Job(plan, Inputs(F, A, U, None, A), staged, 0.3, 7, {"format": "pt"})
        run_jobs([job], kernel=reference, device="cpu", staging="read", chunk_elems=29)
        if job.error is not None:
            raise job.error
    finally:
        for ck in (F, A, U):
            ck.close()
    outs["staged_cpu"] = staged
    return outs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    # Any root: the outputs hold no path, so neither its name nor its length reaches a byte.
    return golden_world(tmp_path_factory.mktemp("golden"))


def golden_world(root: Path) -> dict:
    inputs = build_inputs(root)
    canon = Canon(root)
    got = {"inputs": input_digests(inputs, root)}
    for case, path in run_cases(root, inputs).items():
        got[case] = dir_digest(path, canon)
    return got


# --- the checks ------------------------------------------------------------------------------


def _diff(want: dict, got: dict, cases) -> list[str]:
    lines = []
    for case in cases:
        w, g = want.get(case), got.get(case)
        if w is None or g is None:
            lines.append(f"{case}: {'not in ' + GOLDEN.name if w is None else 'no longer produced'}")
            continue
        for f in sorted(set(w) | set(g)):
            wf, gf = w.get(f), g.get(f)
            if wf == gf:
                continue
            if wf is None or gf is None:
                lines.append(f"{case}: {f}: {'new file' if wf is None else 'file no longer written'}")
            elif isinstance(wf, dict) and isinstance(gf, dict):  # safetensors: say which part
                for part in sorted(set(wf) | set(gf)):
                    if wf.get(part) != gf.get(part):
                        lines.append(
                            f"{case}: {f} [{part}]: golden {str(wf.get(part))[:16]} != now {str(gf.get(part))[:16]}"
                        )
            else:
                lines.append(f"{case}: {f}: golden {str(wf)[:16]} != now {str(gf)[:16]}")
    return lines


def test_outputs_match_golden_digests(world):
    if UPDATE:
        GOLDEN.write_text(json.dumps({"backends": BACKENDS, "cases": world}, indent=1, sort_keys=True) + "\n")
        pytest.fail(f"RESTA_GOLDEN_UPDATE=1: wrote {GOLDEN.name} ({len(world)} cases); rerun without it")
    assert GOLDEN.is_file(), f"{GOLDEN} missing: generate it with RESTA_GOLDEN_UPDATE=1"
    want = json.loads(GOLDEN.read_text())["cases"]
    fixture = _diff(want, world, ["inputs"])
    assert not fixture, (
        "the test FIXTURES changed (not the code under test): the input files differ, so "
        "the output digests cannot be compared. Was this file, numpy or safetensors "
        "changed?\n" + "\n".join(fixture)
    )
    # Cases of a backend that is not available here (e.g. cpp not built) are not compared.
    cases = [
        c for c in sorted(set(want) | set(world)) if c != "inputs" and ("@" not in c or c.split("@")[1] in BACKENDS)
    ]
    diff = _diff(want, world, cases)
    assert not diff, f"{len(diff)} output file(s) differ from {GOLDEN.name}:\n" + "\n".join(diff)


def _data(case_digests: dict) -> dict:
    return {f: d["data"] for f, d in case_digests.items() if isinstance(d, dict)}


def test_backends_agree_bit_for_bit(world):
    """docs/spec.md §2: every backend gives the same bits; and so do the pipelines
    (batch vs patch, chunking, the staged GPU pipeline on CPU, vector vs pair)."""
    if len(BACKENDS) < 2:
        pytest.skip(f"only {BACKENDS} available")
    cases = sorted({c.split("@")[0] for c in world if "@" in c})
    for case in cases:
        have = [b for b in BACKENDS if f"{case}@{b}" in world]
        ref = world[f"{case}@{have[0]}"]
        for b in have[1:]:
            other = world[f"{case}@{b}"]
            # Weight data, headers (no backend is recorded in them), index and side files: all equal.
            assert {f: v for f, v in other.items() if not f.startswith(REPORT)} == {
                f: v for f, v in ref.items() if not f.startswith(REPORT)
            }, f"{case}: {b} != {have[0]}"
            assert other[f"{REPORT}:plan"] == ref[f"{REPORT}:plan"], f"{case}: plan differs on {b}"


def test_same_bits_across_pipelines_and_inputs(world):
    for b in (b for b in BACKENDS if b != "triton"):
        dare = world[f"dare@{b}"]
        assert world[f"dare_chunk37@{b}"] == dare, "chunking / threads changed the bytes"
        assert _data(world["staged_cpu"]) == _data(dare), "staged (GPU) pipeline on CPU differs"
        for job, case in (("plain", "plain"), ("dare", "dare"), ("extra", "extra_vocab")):
            got = {f: v for f, v in world[f"batch_{job}@{b}"].items() if not f.startswith(REPORT)}
            assert got == {f: v for f, v in world[f"{case}@{b}"].items() if not f.startswith(REPORT)}, (
                f"batch job {job} differs from patch {case} on {b}"
            )
        # fp32 vector: patching with it is bit-identical to patching with the pair (docs/vector.md).
        assert _data(world[f"vector_patch@{b}"]) == _data(world[f"plain@{b}"])
        assert _data(world[f"vector_dare@{b}"]) == _data(world[f"dare@{b}"])
