"""resta_fast/io/identity.py: inputs known by their content, so outputs travel.

The same input bytes, wherever they lie (another folder with other names and
mtimes, a Hugging Face cache snapshot), give byte-identical weight files for
every output kind; no file of an output names a local path or a file time; and
a real change of content is told apart even when the headers are equal.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from checkpoints import hub_cache_model, three_models, write_adapter, write_model

from resta_fast import api
from resta_fast.cli import main
from resta_fast.io import identity
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import SafetensorsFile
from resta_fast.verify import verify

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}
LORA = {"hidden": 8, "inter": 12, "layers": 1, "r": 2}
OLD_TIME = 1_500_000_000_000_000_000


def run(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-fsync", "--no-progress"])


def relocate(src: Path, dst: Path) -> Path:
    """A plain copy of ``src`` under another name: fresh files, then other mtimes."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for p in dst.rglob("*"):
        os.utime(p, ns=(OLD_TIME, OLD_TIME))
    return dst


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The same inputs in three places: where they were made, copied elsewhere under other names
    with other mtimes, and laid out as Hub cache snapshots (``org/NAME``)."""
    root = tmp_path_factory.mktemp("travel")
    ft, al, un = three_models(root / "here", shards=2, **SMALL)
    adapter = write_adapter(root / "here" / "adapter", **LORA)
    safety = write_adapter(root / "here" / "safety", **LORA, seed=11)
    # PEFT records where it loaded the base from: a local path that must not reach the outputs.
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(al)}))
    here = {"ft": ft, "al": al, "un": un, "adapter": adapter, "safety": safety}
    there = {k: relocate(p, root / "elsewhere" / f"{k}-copy") for k, p in here.items()}
    cache = root / "hub"
    for i, (k, p) in enumerate(here.items()):
        hub_cache_model(cache, f"org/{k}", p, commit=str(i + 1) * 40)
    hub = {k: f"org/{k}" for k in here}
    return root, cache, {"here": here, "there": there, "hub": hub}


CASES = {
    "patch": lambda p, out: ["patch", "--finetuned", p["ft"], "--aligned", p["al"], "--unaligned", p["un"],
                             "--beta", "0.5", "--out", out],
    "dare": lambda p, out: ["patch", "--finetuned", p["ft"], "--aligned", p["al"], "--unaligned", p["un"],
                            "--beta", "0.5", "--dare", "0.3", "--seed", "7", "--out", out],
    "vector": lambda p, out: ["vector", "--aligned", p["al"], "--unaligned", p["un"], "--out", out],
    "lora": lambda p, out: ["patch", "--finetuned", p["adapter"], "--base", p["al"], "--aligned", p["al"],
                            "--unaligned", p["un"], "--beta", "0.5", "--out", out],
    "safelora_merge": lambda p, out: ["safelora", "--adapter", p["adapter"], "--aligned", p["al"], "--unaligned",
                                      p["un"], "--threshold", "0.9", "--merge", "--out", out],
    "safelora_adapter": lambda p, out: ["safelora", "--adapter", p["adapter"], "--aligned", p["al"],
                                        "--unaligned", p["un"], "--threshold", "0.9", "--out", out],
    "safemerge": lambda p, out: ["safemerge", "--adapter", p["adapter"], "--safety-adapter", p["safety"],
                                 "--aligned", p["al"], "--unaligned", p["un"], "--tau", "0.9", "--out", out],
}  # fmt: skip


def batch(places: dict, out: Path, manifest: Path) -> list:
    out.mkdir(exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "aligned": str(places["al"]),
                "unaligned": str(places["un"]),
                "beta": 0.5,
                "jobs": [
                    {"name": "a", "finetuned": str(places["ft"]), "out": str(out / "a")},
                    {"name": "b", "finetuned": str(places["ft"]), "out": str(out / "b"), "dare": 0.2, "seed": 3},
                ],
            }
        )
    )
    return ["batch", manifest]


def weight_files(out: Path) -> dict[str, bytes]:
    """Every file of an output but the two that say when and how it was run (report, card)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("resta_fast.json", "README.md")}


def assert_private(out: Path, *roots: Path) -> None:
    """No file of ``out`` names a local root, the output's temp directory, or a file time; its card
    loads with huggingface_hub's ModelCard and its ``base_model`` holds valid Hub ids only."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    for p in sorted(out.rglob("*")):
        data = p.read_bytes()
        for root in roots:
            assert str(root).encode() not in data, f"{p.name} names {root}"
        assert b".resta-tmp-" not in data and b"mtime" not in data, f"{p.name} holds a temp name or an mtime"
    for repo in ModelCard.load(out / "README.md").data.to_dict().get("base_model") or []:
        validate_repo_id(repo)
        assert repo.startswith("org/"), repo


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_bytes_anywhere_give_the_same_output(places, case, tmp_path, monkeypatch):
    root, cache, where = places
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outs = {}
    for name, inputs in where.items():
        outs[name] = tmp_path / name
        assert run(*CASES[case](inputs, outs[name])) == 0, name
    want = weight_files(outs["here"])
    assert any(n.endswith(".safetensors") for n in want)
    for name in ("there", "hub"):
        assert weight_files(outs[name]) == want, f"{case}: {name} differs"
    for out in outs.values():
        assert_private(out, root, tmp_path)
    reports = {n: json.loads((o / "resta_fast.json").read_text()) for n, o in outs.items()}
    assert reports["here"]["inputs"] == reports["there"]["inputs"] == reports["hub"]["inputs"]
    assert {s["name"] for s in reports["there"]["sources"].values()} <= {f"{k}-copy" for k in where["here"]}
    assert all("hub" in s for s in reports["hub"]["sources"].values())
    from huggingface_hub import ModelCard

    assert ModelCard.load(outs["hub"] / "README.md").data.to_dict()["base_model"]  # the Hub ids are named
    assert "base_model" not in ModelCard.load(outs["here"] / "README.md").data.to_dict()


def test_a_batch_gives_the_same_bytes_anywhere_and_resumes_after_a_move(places, tmp_path, capsys):
    root, _, where = places
    assert run(*batch(where["here"], tmp_path / "out", tmp_path / "m1.json")) == 0
    first = {j: weight_files(tmp_path / "out" / j) for j in ("a", "b")}
    assert run(*batch(where["there"], tmp_path / "out2", tmp_path / "m2.json")) == 0
    assert {j: weight_files(tmp_path / "out2" / j) for j in ("a", "b")} == first
    for j in ("a", "b"):
        assert_private(tmp_path / "out" / j, root, tmp_path)
    # The first batch's manifest now names the copies: its finished outputs are recognised, none redone.
    capsys.readouterr()
    assert run(*batch(where["there"], tmp_path / "out", tmp_path / "m1.json"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"skipped": 2}


def test_a_moved_or_touched_input_resumes_and_a_changed_one_refuses_that_job_only(tmp_path, capsys):
    fts = [three_models(tmp_path / f"m{i}", **SMALL)[0] for i in range(3)]
    _, al, un = three_models(tmp_path / "pair", **SMALL)
    manifest = tmp_path / "batch.json"
    (tmp_path / "out").mkdir()

    def write(paths):
        jobs = [
            {"name": f"j{i}", "finetuned": str(p), "out": str(tmp_path / "out" / f"j{i}")} for i, p in enumerate(paths)
        ]
        manifest.write_text(json.dumps({"aligned": str(al), "unaligned": str(un), "beta": 0.5, "jobs": jobs}))

    def counts() -> dict:
        assert main(["batch", str(manifest), "--no-progress", "--no-fsync", "--json"]) in (0, 1)
        return json.loads(capsys.readouterr().out)["counts"]

    write(fts)
    assert counts() == {"done": 3}
    moved = [relocate(p, tmp_path / "moved" / f"ft{i}") for i, p in enumerate(fts)]
    write(moved)
    assert counts() == {"skipped": 3}, "copies with new names and mtimes are the same inputs"
    for p in moved[0].iterdir():
        os.utime(p)  # touched
    assert counts() == {"skipped": 3}
    # A real change of content, same header (same architecture): that job alone is refused, by name.
    shard = moved[1] / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-2:] = bytes(b ^ 0x40 for b in raw[-2:])
    shard.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["batch", str(manifest), "--no-progress", "--no-fsync", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"failed": 1, "skipped": 2}
    failed = next(j for j in summary["jobs"] if j["status"] == "failed")
    assert failed["name"] == "j1"
    assert "finetuned ft1: its content changed since (model.safetensors differ)" in failed["error"]


def test_verify_ignores_where_inputs_lie_and_names_a_changed_one(places, tmp_path):
    _, _, where = places
    here, there = where["here"], where["there"]
    out = tmp_path / "out"
    api.patch(here["ft"], out, aligned=here["al"], unaligned=here["un"], beta=0.5, fsync=False)
    assert verify(out, [str(there["ft"]), str(there["al"]), str(there["un"])])["ok"]
    changed = relocate(there["un"], tmp_path / "un-changed")
    shard = changed / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    result = verify(out, [str(there["ft"]), str(there["al"]), str(changed)], samples=10)
    inputs = next(c for c in result["checks"] if c["name"] == "inputs")
    assert not result["ok"] and not inputs["ok"]
    assert inputs["problems"] == [
        f"unaligned {changed}: model.safetensors: its content differs from the input the run read "
        "(size, header or sampled data); pass the input the output was made from"
    ]


def test_record_paths_is_asked_for_and_reaches_the_report_only(places, tmp_path):
    _, _, where = places
    here = where["here"]
    out = tmp_path / "out"
    assert run(*CASES["patch"](here, out), "--record-paths") == 0
    report = json.loads((out / "resta_fast.json").read_text())
    assert report["sources"]["finetuned"]["path"] == str(here["ft"].absolute())
    plain = tmp_path / "plain"
    assert run(*CASES["patch"](here, plain)) == 0
    assert weight_files(out) == weight_files(plain), "paths never reach the weights"
    assert verify(out, [])["ok"], "recorded paths: verify --against finds the inputs alone"


# --- the identity itself -------------------------------------------------------------------


def test_sampled_windows_cover_every_tensor_and_every_stride(tmp_path, monkeypatch):
    ft, _, _ = three_models(tmp_path, **SMALL)
    f = SafetensorsFile(ft / "model.safetensors")
    windows = identity.sample_windows(f)
    for t in f.tensors.values():
        if t.end > t.start:  # its first and last bytes are sampled
            assert any(s <= t.start < e for s, e in windows) and any(s < t.end <= e for s, e in windows), t.name
    assert all(identity.WINDOW >= e - s > 0 for s, e in windows)
    monkeypatch.setattr(identity, "STRIDE", 64)
    lo = min(t.start for t in f.tensors.values())
    assert {s for s, _ in identity.sample_windows(f)} >= set(range(lo, f.size, 64))


def test_equal_headers_different_weights_are_told_apart(tmp_path):
    a, b, _ = three_models(tmp_path, **SMALL)  # fine-tune and aligned: one architecture
    ia, ib = Checkpoint(a).fingerprint(), Checkpoint(b).fingerprint()
    name = "model.safetensors"
    assert ia[name]["header_sha256"] == ib[name]["header_sha256"] and ia[name]["bytes"] == ib[name]["bytes"]
    assert not identity.same(ia, ib) and identity.changed_files(ia, ib) == [name]
    assert identity.short_id(ia) != identity.short_id(ib)
    c = relocate(a, tmp_path / "a-copy")
    assert (
        identity.same(ia, Checkpoint(c).fingerprint()) and identity.changed_files(ia, Checkpoint(c).fingerprint()) == []
    )


def test_one_changed_element_inside_a_big_tensor_is_seen(tmp_path):
    """A change far from a tensor's start, middle and end is caught by the stride windows."""
    import torch

    big = {"w": torch.zeros(8 << 20, dtype=torch.bfloat16)}  # 16 MiB: windows at 0, 8 MiB, its end
    write_model(tmp_path / "a", big)
    edited = dict(big, w=big["w"].clone())
    edited["w"][(8 << 20) // 2 + 3] = 1.0  # at 8 MiB + 6 bytes: inside the stride window
    write_model(tmp_path / "b", edited)
    ia, ib = (Checkpoint(tmp_path / n).fingerprint() for n in ("a", "b"))
    assert not identity.same(ia, ib)


def test_an_old_record_with_mtimes_and_no_samples_still_matches():
    new = {"m.safetensors": {"bytes": 10, "header_sha256": "h", "sample_sha256": "s"}}
    old = {"m.safetensors": {"bytes": 10, "header_sha256": "h", "mtime_ns": 123}}
    assert identity.same(old, new)
    assert not identity.same({"m.safetensors": {"bytes": 11, "header_sha256": "h", "mtime_ns": 1}}, new)
    assert not identity.same({"m.safetensors": {"mtime_ns": 1}}, new), "nothing about content to compare"
    assert not identity.same({}, new) and identity.changed_files({}, new) == ["m.safetensors"]


def test_lfs_sha256_comes_from_the_cache_links(places):
    _, cache, _ = places
    snap = cache / "models--org--ft" / "snapshots" / ("1" * 40)
    found = identity.lfs_sha256(snap, ["model-00001-of-00002.safetensors", "config.json", "missing"])
    assert set(found) == {"model-00001-of-00002.safetensors", "config.json"}
    import hashlib

    blob = (snap / "config.json").read_bytes()
    assert found["config.json"] == hashlib.sha256(blob).hexdigest()
    assert identity.lfs_sha256(Path(os.devnull).parent, ["null"]) == {}
