"""Hugging Face Hub ids as inputs (io/hub.py), against a Hub cache built here; never the network.

The cache is laid out as huggingface_hub keeps it (``models--ORG--NAME/{blobs,
snapshots, refs}``, tests/checkpoints.py ``hub_cache_model``), under tmp_path, with
``HF_HUB_CACHE`` pointed at it and ``HF_HUB_OFFLINE=1``. Every socket connection is
refused, so a test that reached for the Hub would fail rather than download.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import hub_cache_model, three_models, write_adapter

from resta_fast.batch.manifest import load_manifest
from resta_fast.cli import main
from resta_fast.errors import RestaError
from resta_fast.io import hub
from resta_fast.kernels import backend_status
from resta_fast.verify import verify

pytest.importorskip("huggingface_hub")

BACKEND = "cpp" if backend_status().get("cpp") == "ok" else "torch"
C_FT, C_FT_V1, C_CHAT, C_SHADOW, C_LORA = ("a" * 40, "b" * 40, "c" * 40, "d" * 40, "e" * 40)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails loudly: no test here may reach the Hub."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """Local models and the same models in a Hub cache: org/ft (main, and v1 = an older fine-tune),
    org/chat, org/shadow, org/lora (an adapter trained on org/chat)."""
    local = tmp_path / "local"
    ft, chat, shadow = three_models(local, shards=2)
    ft_v1, _, _ = three_models(local / "v1")
    lora = write_adapter(local / "lora")
    cache = tmp_path / "hf_cache"
    snaps = {
        "ft": hub_cache_model(cache, "org/ft", ft, commit=C_FT),
        "ft_v1": hub_cache_model(cache, "org/ft", ft_v1, commit=C_FT_V1, refs=("v1",)),
        "chat": hub_cache_model(cache, "org/chat", chat, commit=C_CHAT),
        "shadow": hub_cache_model(cache, "org/shadow", shadow, commit=C_SHADOW),
        "lora": hub_cache_model(cache, "org/lora", lora, commit=C_LORA),
    }
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(work)  # relative ids are looked up as local paths here first: none exist
    return {
        "ft": ft,
        "ft_v1": ft_v1,
        "chat": chat,
        "shadow": shadow,
        "lora": lora,
        "cache": cache,
        "snap": snaps,
        "out": tmp_path / "out",
    }


def run(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-fsync", "--no-progress"])


def parts(path: Path) -> tuple[bytes, dict]:
    """(data bytes, header JSON) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :], json.loads(raw[8 : 8 + n])


def assert_same_output(hub_out: Path, local_out: Path) -> dict:
    """Every weight file byte-identical, headers included (the provenance records the inputs'
    content, not where they lay); index and side files too; the reports' plans and input
    identities equal, and only the Hub run's sources name the Hub. Returns the Hub run's report."""
    names = sorted(p.name for p in hub_out.iterdir())
    assert names == sorted(p.name for p in local_out.iterdir())
    for name in names:
        a, b = hub_out / name, local_out / name
        if name.endswith(".safetensors"):
            (da, ha), (db, hb) = parts(a), parts(b)
            assert da == db, f"{name}: weight data differ"
            assert ha == hb, f"{name}: headers (tensor tables or provenance) differ"
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"
        elif name not in ("resta_fast.json", "README.md"):
            assert a.read_bytes() == b.read_bytes(), f"{name} differs"
    report = json.loads((hub_out / "resta_fast.json").read_text())
    local_report = json.loads((local_out / "resta_fast.json").read_text())
    assert report.get("plan") == local_report.get("plan")  # adapter outputs (safelora) have none
    assert report["inputs"] == local_report["inputs"]
    assert any("hub" in s for s in report["sources"].values())
    assert all("hub" not in s for s in local_report["sources"].values()), "a local input must not gain Hub fields"
    return report


def test_hub_id_shapes():
    assert hub.parse_hub_id("meta-llama/Llama-2-7b-chat-hf") == ("meta-llama/Llama-2-7b-chat-hf", None)
    assert hub.parse_hub_id("my-org/customer-ft@v3") == ("my-org/customer-ft", "v3")
    assert hub.parse_hub_id("hf://org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in (
        "./ft",
        "/abs/ft",
        "ft",
        "a/b/c",
        "org/model.safetensors",
        "org/-x",
        "org/x--y",
        "org/x@",
        "org/x@a b",
        "../x",
        "~/x",
        "org/",
    ):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    assert hub.INDEX_NAME == __import__("resta_fast.io.checkpoint", fromlist=["x"]).INDEX_NAME


def test_cache_location_follows_the_environment_at_resolve_time(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()


def test_patch_with_hub_ids_equals_the_same_patch_with_local_paths(world):
    snap, out = world["snap"], world["out"]
    assert (
        run(
            "patch",
            "--finetuned",
            "org/ft",
            "--aligned",
            "org/chat",
            "--unaligned",
            "hf://org/shadow",
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
            "--backend",
            BACKEND,
            "--out",
            out / "hub",
        )
        == 0
    )
    # The same patch naming the snapshot directories as local paths: only the Hub fields differ.
    assert (
        run(
            "patch",
            "--finetuned",
            snap["ft"],
            "--aligned",
            snap["chat"],
            "--unaligned",
            snap["shadow"],
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
            "--backend",
            BACKEND,
            "--out",
            out / "snap",
        )
        == 0
    )
    # And naming the original local directories: the same weights.
    assert (
        run(
            "patch",
            "--finetuned",
            world["ft"],
            "--aligned",
            world["chat"],
            "--unaligned",
            world["shadow"],
            "--beta",
            "0.5",
            "--dare",
            "0.3",
            "--seed",
            "7",
            "--backend",
            BACKEND,
            "--out",
            out / "local",
        )
        == 0
    )
    report = assert_same_output(out / "hub", out / "snap")
    assert_same_output(out / "hub", out / "local")
    inputs = report["sources"]
    assert inputs["finetuned"]["hub"] == {"repo_id": "org/ft", "revision": "main", "commit": C_FT}
    assert inputs["aligned"]["hub"] == {"repo_id": "org/chat", "revision": "main", "commit": C_CHAT}
    assert inputs["unaligned"]["hub"]["commit"] == C_SHADOW
    assert inputs["dare_base"]["hub"]["repo_id"] == "org/chat"  # defaulted from --aligned, with its origin
    assert "path" not in inputs["finetuned"]  # no local path unless --record-paths
    assert inputs["finetuned"]["name"] == "ft"  # the repo's name
    result = verify(out / "hub", [])  # recomputes from the recorded Hub ids, pinned to their commits
    assert result["ok"], result
    assert result["hub_inputs"]["finetuned"]["commit"] == C_FT


def test_vector_with_hub_ids(world):
    out = world["out"]
    assert run("vector", "--aligned", "org/chat", "--unaligned", "org/shadow", "--out", out / "vec_hub") == 0
    assert (
        run(
            "vector",
            "--aligned",
            world["snap"]["chat"],
            "--unaligned",
            world["snap"]["shadow"],
            "--out",
            out / "vec_snap",
        )
        == 0
    )
    report = assert_same_output(out / "vec_hub", out / "vec_snap")
    assert report["sources"]["aligned"]["hub"]["repo_id"] == "org/chat"
    # And the vector, from the Hub, into a patch.
    hub_cache_model(world["cache"], "org/vector", out / "vec_snap", commit="f" * 40)
    assert (
        run(
            "patch",
            "--finetuned",
            "org/ft",
            "--vector",
            "org/vector",
            "--beta",
            "0.5",
            "--backend",
            BACKEND,
            "--out",
            out / "pv_hub",
        )
        == 0
    )
    assert (
        run(
            "patch",
            "--finetuned",
            world["ft"],
            "--vector",
            out / "vec_snap",
            "--beta",
            "0.5",
            "--backend",
            BACKEND,
            "--out",
            out / "pv_local",
        )
        == 0
    )
    assert_same_output(out / "pv_hub", out / "pv_local")


def test_lora_adapter_and_base_from_the_hub(world):
    pytest.importorskip("torch")
    out, snap = world["out"], world["snap"]
    assert (
        run(
            "patch",
            "--finetuned",
            "org/lora",
            "--base",
            "org/chat",
            "--aligned",
            "org/chat",
            "--unaligned",
            "org/shadow",
            "--beta",
            "0.5",
            "--out",
            out / "lora_hub",
        )
        == 0
    )
    assert (
        run(
            "patch",
            "--finetuned",
            snap["lora"],
            "--base",
            snap["chat"],
            "--aligned",
            snap["chat"],
            "--unaligned",
            snap["shadow"],
            "--beta",
            "0.5",
            "--out",
            out / "lora_snap",
        )
        == 0
    )
    report = assert_same_output(out / "lora_hub", out / "lora_snap")
    assert report["sources"]["finetuned"]["hub"]["commit"] == C_LORA
    assert report["sources"]["base"]["hub"]["repo_id"] == "org/chat"


def test_revision_picks_its_snapshot(world):
    out = world["out"]
    assert (
        run(
            "patch",
            "--finetuned",
            "org/ft@v1",
            "--aligned",
            "org/chat",
            "--unaligned",
            "org/shadow",
            "--beta",
            "0.5",
            "--out",
            out / "v1",
        )
        == 0
    )
    assert (
        run(
            "patch",
            "--finetuned",
            world["ft_v1"],
            "--aligned",
            world["chat"],
            "--unaligned",
            world["shadow"],
            "--beta",
            "0.5",
            "--out",
            out / "v1_local",
        )
        == 0
    )
    report = assert_same_output(out / "v1", out / "v1_local")
    assert report["sources"]["finetuned"]["hub"] == {"repo_id": "org/ft", "revision": "v1", "commit": C_FT_V1}
    # A commit sha names its snapshot directly.
    found = hub.resolve_input(f"org/ft@{C_FT_V1}", "finetuned", kind="any")
    assert found.path == world["snap"]["ft_v1"] and found.commit == C_FT_V1
    assert hub.resolve_input("org/ft", "finetuned").commit == C_FT


@pytest.mark.parametrize(
    "spec, says",
    [
        ("org/missing", "the Hub model org/missing is not in the Hugging Face cache"),
        ("org/ft@v9", "the Hub model org/ft@v9 is not in the Hugging Face cache"),
        ("hf://org/missing@main", "the Hub model org/missing is not in the Hugging Face cache"),
    ],
)
def test_a_missing_id_offline_is_one_line_exit_2_nothing_written(world, capsys, spec, says):
    out = world["out"] / "never"
    code = run("patch", "--finetuned", spec, "--aligned", "org/chat", "--unaligned", "org/shadow", "--out", out)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"resta-fast: error: finetuned {spec}: no such local path, and ") and says in err[0]
    assert "HF_HUB_OFFLINE=1" in err[0] and "hf download" in err[0]
    assert not out.exists()
    assert not list(out.parent.glob(".never*")), "a temp or lock file was left"


def test_an_incomplete_cached_snapshot_offline_names_what_it_lacks(world, capsys):
    (world["snap"]["ft"] / "model-00002-of-00002.safetensors").unlink()
    code = run(
        "patch",
        "--finetuned",
        "org/ft",
        "--aligned",
        "org/chat",
        "--unaligned",
        "org/shadow",
        "--out",
        world["out"] / "x",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "lacks model-00002-of-00002.safetensors" in err[0] and C_FT[:12] in err[0]


def test_an_existing_local_directory_shaped_like_an_id_wins(world, tmp_path):
    # ./org/ft exists here (the v1 weights); the Hub cache's org/ft holds other weights.
    shutil.copytree(world["ft_v1"], Path("org") / "ft")
    out = world["out"]
    assert (
        run(
            "patch",
            "--finetuned",
            "org/ft",
            "--aligned",
            world["chat"],
            "--unaligned",
            world["shadow"],
            "--beta",
            "0.5",
            "--out",
            out / "local_wins",
        )
        == 0
    )
    report = json.loads((out / "local_wins" / "resta_fast.json").read_text())
    assert report["sources"]["finetuned"] == {"name": "ft"}  # the local directory, not the Hub
    assert (
        run(
            "patch",
            "--finetuned",
            world["ft_v1"],
            "--aligned",
            world["chat"],
            "--unaligned",
            world["shadow"],
            "--beta",
            "0.5",
            "--out",
            out / "v1_local",
        )
        == 0
    )
    assert parts(out / "local_wins" / "model.safetensors")[0] == parts(out / "v1_local" / "model.safetensors")[0]
    # hf:// is always the Hub, even with that local directory here.
    assert hub.resolve_input("hf://org/ft", "finetuned").commit == C_FT


def test_cache_first_needs_no_network_even_online(world, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    found = hub.resolve_input("org/chat", "aligned")  # the socket guard fails any connection
    assert found.path == world["snap"]["chat"] and found.commit == C_CHAT


def test_batch_with_ids_resolves_each_distinct_input_once(world, monkeypatch, tmp_path):
    calls: list[tuple] = []
    real = hub._snapshot

    def counting(repo_id, revision, **kw):
        calls.append((repo_id, revision))
        return real(repo_id, revision, **kw)

    monkeypatch.setattr(hub, "_snapshot", counting)
    out = world["out"]
    jobs = [
        {"name": "a", "finetuned": "org/ft", "out": str(out / "b_a"), "beta": 0.5},
        {"name": "b", "finetuned": "org/ft", "out": str(out / "b_b"), "dare": 0.3, "seed": 1},
        {"name": "c", "finetuned": "org/ft@v1", "out": str(out / "b_c")},
        {"name": "d", "finetuned": "org/lora", "base": "org/chat", "out": str(out / "b_d")},
    ]
    manifest = tmp_path / "batch.json"
    manifest.write_text(
        json.dumps({"aligned": "org/chat", "unaligned": "org/shadow", "fsync": False, "backend": BACKEND, "jobs": jobs})
    )
    assert main(["batch", str(manifest), "--no-progress"]) == 0
    assert sorted(calls) == sorted(
        {("org/ft", "main"), ("org/ft", "v1"), ("org/chat", "main"), ("org/shadow", "main"), ("org/lora", "main")}
    ), calls
    snap = world["snap"]
    singles = {
        "a": ["--finetuned", snap["ft"], "--beta", "0.5"],
        "b": ["--finetuned", snap["ft"], "--dare", "0.3", "--seed", "1"],
        "c": ["--finetuned", snap["ft_v1"]],
        "d": ["--finetuned", snap["lora"], "--base", snap["chat"]],
    }
    for name, args in singles.items():
        assert (
            run(
                "patch",
                *args,
                "--aligned",
                snap["chat"],
                "--unaligned",
                snap["shadow"],
                "--backend",
                BACKEND,
                "--out",
                out / f"p_{name}",
            )
            == 0
        )
        report = assert_same_output(out / f"b_{name}", out / f"p_{name}")
        assert report["sources"]["aligned"]["hub"]["repo_id"] == "org/chat"
    # A rerun recognises its finished outputs (fingerprints, not paths, are compared).
    assert main(["batch", str(manifest), "--no-progress", "--json"]) == 0


def test_batch_lists_a_missing_id_as_a_problem(world, tmp_path):
    manifest = tmp_path / "batch.json"
    manifest.write_text(
        json.dumps(
            {
                "aligned": "org/chat",
                "unaligned": "org/nope",
                "jobs": [{"finetuned": "org/ft", "out": str(world["out"] / "x")}],
            }
        )
    )
    with pytest.raises(RestaError, match=r"jobs\[0\]: unaligned org/nope: no such local path"):
        load_manifest(manifest)
    assert not list(world["out"].iterdir())


def test_verify_names_the_revisions_an_output_came_from(world, capsys):
    out = world["out"] / "v"
    assert (
        run("patch", "--finetuned", "org/ft@v1", "--aligned", "org/chat", "--unaligned", "org/shadow", "--out", out)
        == 0
    )
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"from  finetuned: org/ft@v1, commit {C_FT_V1}" in text
    assert f"from  aligned: org/chat, commit {C_CHAT}" in text
    # The cache snapshot gone, --against refetches the recorded commit (offline: a clean error, exit 2).
    shutil.rmtree(world["cache"] / "models--org--ft")
    assert main(["verify", str(out), "--against"]) == 2
    assert f"org/ft@{C_FT_V1}" in capsys.readouterr().err


# --- downloads, with huggingface_hub's snapshot_download replaced by a fake Hub --------------


class FakeHub:
    """``snapshot_download`` over a directory of repos (``remote/ORG/NAME``) at one commit:
    downloads copy the files the patterns select into the cache; local look-ups are the real ones."""

    def __init__(self, remote: Path, commit: str, real):
        self.remote, self.commit, self.real = remote, commit, real
        self.downloads: list[dict] = []

    def __call__(
        self,
        repo_id,
        *,
        revision=None,
        cache_dir=None,
        local_files_only=False,
        allow_patterns=None,
        ignore_patterns=None,
        **kw,
    ):
        if local_files_only:
            return self.real(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
            )
        from huggingface_hub.utils import filter_repo_objects

        src = self.remote / repo_id
        names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
        chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.downloads.append({"repo": repo_id, "revision": revision, "files": chosen})
        snap = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / self.commit
        for name in chosen:
            (snap / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, snap / name)
        refs = snap.parent.parent / "refs"
        refs.mkdir(exist_ok=True)
        if revision != self.commit:
            (refs / revision).write_text(self.commit)
        return str(snap)


@pytest.fixture()
def fake_hub(world, monkeypatch, tmp_path):
    import huggingface_hub

    remote = tmp_path / "remote"
    ft = shutil.copytree(world["ft"], remote / "org" / "big")
    (ft / "README.md").write_text("the fine-tune's card\n")
    (ft / "pytorch_model.bin").write_bytes(b"pickle we must not fetch")
    (ft / "consolidated.safetensors").write_bytes(b"a duplicate we must not fetch")
    (ft / "original").mkdir()
    (ft / "original" / "model.safetensors").write_bytes(b"nor this")
    (ft / "tokenizer_config.json").write_text("{}")
    fake = FakeHub(remote, "9" * 40, huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return fake


def test_a_download_fetches_only_the_files_the_job_reads(world, fake_hub, capsys):
    found = hub.resolve_input("org/big", "finetuned", kind="any")
    assert found.commit == "9" * 40 and found.revision == "main"
    got = sorted(p.name for p in found.path.iterdir())
    assert got == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer_config.json",
    ]
    assert [d["revision"] for d in fake_hub.downloads] == ["main", "9" * 40], "weights pinned to one commit"
    assert "fetching org/big from the Hugging Face Hub" in capsys.readouterr().err
    # Now cached: no second download.
    hub.resolve_input("org/big", "finetuned", kind="any")
    assert len(fake_hub.downloads) == 2


def _hub_error(name: str):
    import huggingface_hub.errors as errors

    cls = getattr(errors, name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"{name}: 404 Client Error")
    return exc


@pytest.mark.parametrize(
    "name, says",
    [
        ("GatedRepoError", "is gated; request access on https://huggingface.co/org/secret"),
        ("RepositoryNotFoundError", "the Hub has no model org/secret you can read"),
        ("RevisionNotFoundError", "has no revision 'main'"),
        ("LocalEntryNotFoundError", "cannot reach the Hugging Face Hub"),
    ],
)
def test_hub_errors_are_one_line(world, monkeypatch, name, says):
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def failing(repo_id, *, local_files_only=False, **kw):
        if local_files_only:
            return real(repo_id, local_files_only=True, **kw)
        raise _hub_error(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(RestaError) as info:
        hub.resolve_input("org/secret", "aligned")
    message = str(info.value)
    assert "\n" not in message and message.startswith("aligned org/secret: ") and says in message, message


def test_local_runs_never_call_the_hub(world):
    """Local inputs never reach the Hub: the run succeeds with every Hub download replaced by a crash
    and the endpoint a closed port. (huggingface_hub itself is imported to write the model card.)"""
    code = (
        "import sys\nimport huggingface_hub\nfrom resta_fast.io import hub\n"
        "def boom(*a, **k):\n    raise SystemExit('the Hub was called')\n"
        "huggingface_hub.snapshot_download = huggingface_hub.hf_hub_download = boom\n"
        "hub._snapshot = hub._hub = boom\n"
        "from resta_fast.cli import main\n"
        f"code = main(['patch', '--finetuned', {str(world['ft'])!r}, '--aligned', {str(world['chat'])!r}, "
        f"'--unaligned', {str(world['shadow'])!r}, '--out', {str(world['out'] / 'plain')!r}, '--no-fsync', "
        "'--no-progress', '--backend', " + repr(BACKEND) + "])\n"
        "sys.exit(code)"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "the Hub was called" not in proc.stderr


def test_verify_against_takes_hub_ids(world):
    out = world["out"] / "va"
    assert (
        run(
            "patch",
            "--finetuned",
            world["ft"],
            "--aligned",
            world["chat"],
            "--unaligned",
            world["shadow"],
            "--beta",
            "0.5",
            "--out",
            out,
        )
        == 0
    )
    assert verify(out, ["org/ft", "org/chat", "org/shadow"], samples=500)["ok"]


def test_eval_model_takes_a_hub_id(world, tmp_path, capsys):
    pytest.importorskip("transformers")
    from eval_fakes import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny", seed=1)
    snapshot = hub_cache_model(world["cache"], "org/tiny", tiny, commit="5" * 40)
    assert (
        main(
            [
                "eval",
                "--model",
                "org/tiny",
                "--prompts",
                "builtin:smoke",
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"][0]["model"] == str(snapshot) and summary["models"][0]["n"] == 2


def test_inspect_takes_hub_ids(world, capsys):
    assert main(["inspect", "org/ft@v1", "org/chat", "org/shadow", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plan_error"] is None and result["plan"]["summary"]["patch"] > 0


def test_batch_dry_run_names_the_ids(world, tmp_path, capsys):
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(
        f"aligned: org/chat\nunaligned: org/shadow\njobs:\n  - {{finetuned: org/ft@v1, out: {world['out'] / 'dry'}}}\n"
    )
    assert main(["batch", str(manifest), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"aligned org/chat@main (commit {C_CHAT[:12]})" in text and f"org/ft@v1 (commit {C_FT_V1[:12]})" in text
    assert not (world["out"] / "dry").exists()


@pytest.mark.parametrize("merge", [False, True])
def test_safelora_with_hub_ids(world, merge):
    """Safe LoRA's inputs resolve like patch's: same bytes as the snapshots' paths, repo and commit recorded."""
    pytest.importorskip("torch")
    out, snap = world["out"], world["snap"]
    extra = ["--merge"] if merge else []
    assert (
        run(
            "safelora",
            "--adapter",
            "org/lora",
            "--aligned",
            "org/chat",
            "--unaligned",
            "org/shadow",
            "--num-layers",
            "2",
            "--out",
            out / "sl_hub",
            *extra,
        )
        == 0
    )
    assert (
        run(
            "safelora",
            "--adapter",
            snap["lora"],
            "--aligned",
            snap["chat"],
            "--unaligned",
            snap["shadow"],
            "--num-layers",
            "2",
            "--out",
            out / "sl_snap",
            *extra,
        )
        == 0
    )
    report = assert_same_output(out / "sl_hub", out / "sl_snap")
    assert report["sources"]["adapter"]["hub"] == {"repo_id": "org/lora", "revision": "main", "commit": C_LORA}
    assert report["sources"]["unaligned"]["hub"]["commit"] == C_SHADOW
    assert "org/lora" in (out / "sl_hub" / "README.md").read_text()
    from huggingface_hub import ModelCard

    meta = ModelCard.load(out / "sl_hub" / "README.md").data.to_dict()
    assert meta["base_model"] == ["org/lora", "org/chat", "org/shadow"]
    assert meta["base_model_relation"] == ("merge" if merge else "adapter")


def test_a_repo_with_only_bin_weights_is_fetched_and_read_without_unpickling(world, monkeypatch, tmp_path):
    """Safetensors first; a repo that has none gives its torch .bin weights (shards via their index,
    or an adapter_model.bin) to the pickle-free reader, and the patch equals the local one."""
    import huggingface_hub
    from bin_fixtures import as_bin

    remote = tmp_path / "remote"
    as_bin(world["ft"], remote / "org" / "binft")  # sharded: pytorch_model.bin.index.json and its shards
    (remote / "org" / "binft" / "training_args.bin").write_bytes(b"a pickle we must not fetch")
    as_bin(world["ft_v1"], remote / "org" / "binone")  # one pytorch_model.bin, no index
    fake = FakeHub(remote, "8" * 40, huggingface_hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    found = hub.resolve_input("org/binft", "finetuned", kind="any")
    got = sorted(p.name for p in found.path.iterdir())
    assert "pytorch_model.bin.index.json" in got and "training_args.bin" not in got
    assert sorted(n for n in got if n.endswith(".bin")) == sorted(
        p.name for p in (remote / "org" / "binft").glob("pytorch_model-*.bin")
    )
    one = hub.resolve_input("org/binone", "finetuned", kind="model")
    assert sorted(p.name for p in one.path.iterdir()) == ["config.json", "pytorch_model.bin"]
    out = world["out"]
    pair = ["--aligned", world["chat"], "--unaligned", world["shadow"], "--beta", "0.5"]
    assert run("patch", "--finetuned", "org/binft", *pair, "--out", out / "from_bin_hub") == 0
    assert run("patch", "--finetuned", world["ft"], *pair, "--out", out / "from_local") == 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert parts(out / "from_bin_hub" / shard)[0] == parts(out / "from_local" / shard)[0]
