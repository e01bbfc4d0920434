"""The one resolve step (resta_fast/resolve.py, with roles.py's rules): what the user typed -> Input.

Every command resolves its inputs here, so a Hub id (faked offline, as in tests/test_hub.py: a
Hub cache under tmp_path, ``HF_HUB_OFFLINE=1``, every socket refused) gives the same input, the same
origin and the same identity to patch, verify, safelora and compare, and is resolved once per run.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import pytest
from checkpoints import hub_cache_model, three_models, write_adapter

from resta_fast import api, realign
from resta_fast.eval import compare as compare_mod
from resta_fast.eval.compare import Candidate, Grid
from resta_fast.io import hub
from resta_fast.resolve import Input, Resolver, resolve, resolve_all
from resta_fast.roles import realign_inputs, resolve_roles, vector_roles
from resta_fast.verify import verify
from resta_fast.verify.inputs import open_inputs

pytest.importorskip("huggingface_hub")

C_FT, C_CHAT, C_SHADOW, C_LORA = ("a" * 40, "c" * 40, "d" * 40, "e" * 40)


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """Local models and the same models in a Hub cache: org/ft, org/chat, org/shadow, org/lora (on org/chat)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    local = tmp_path / "local"
    ft, chat, shadow = three_models(local)
    lora = write_adapter(local / "lora")
    cache = tmp_path / "hf_cache"
    snaps = {
        "ft": hub_cache_model(cache, "org/ft", ft, commit=C_FT),
        "chat": hub_cache_model(cache, "org/chat", chat, commit=C_CHAT),
        "shadow": hub_cache_model(cache, "org/shadow", shadow, commit=C_SHADOW),
        "lora": hub_cache_model(cache, "org/lora", lora, commit=C_LORA),
    }
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative ids are looked up as local paths here first: none exist
    return {"local": {"ft": ft, "chat": chat, "shadow": shadow, "lora": lora}, "snap": snaps}


@pytest.fixture()
def calls(monkeypatch) -> list[tuple]:
    """Every Hub resolution: one cache look-up (``io.hub._snapshot``, local only) per resolved id."""
    seen: list[tuple] = []
    real = hub._snapshot

    def counting(repo_id, revision, **kw):
        seen.append((repo_id, revision))
        return real(repo_id, revision, **kw)

    monkeypatch.setattr(hub, "_snapshot", counting)
    return seen


def test_an_input_knows_its_role_path_hub_origin_and_kind(world):
    snap, local = world["snap"], world["local"]
    got = resolve("hf://org/lora", "finetuned", accepts="any")
    assert (got.role, got.path, got.kind, got.is_adapter, got.given) == (
        "finetuned",
        str(snap["lora"]),
        "adapter",
        True,
        "hf://org/lora",
    )
    assert got.hub_origin == {"repo_id": "org/lora", "revision": "main", "commit": C_LORA}
    assert got.origin()["hub"] == got.hub_origin and got.origin()["name"] == "lora"
    here = resolve(local["chat"], "aligned")
    assert (here.path, here.kind, here.hub, here.hub_origin) == (str(local["chat"]), "model", None, None)
    assert here.origin(record_path=True) == {"name": "aligned", "path": str(Path(local["chat"]).absolute())}
    assert resolve(None, "vector") is None
    assert resolve(got, "adapter") == Input("adapter", got.path, got.hub, "adapter")  # already resolved: renamed


def test_a_defaulted_role_is_the_same_input_hub_origin_included(world):
    """The one rule for patch and adapter realignment: a LoRA base defaults to the aligned model."""
    patch = resolve_roles("org/lora", aligned="org/chat", unaligned="org/shadow", dare=True)
    assert patch.lora and patch.inputs["base"] == patch.inputs["aligned"].as_role("base")
    assert patch.hub["base"] is patch.hub["aligned"] and patch.hub["dare_base"] is patch.hub["aligned"]
    session = realign_inputs("org/lora", aligned="org/chat", unaligned="org/shadow")
    assert session["base"] == session["aligned"].as_role("base")
    assert session["base"].origin() == patch.inputs["base"].origin()
    assert session["safety_adapter"] is None
    full = resolve_roles("org/ft", aligned="org/chat", unaligned="org/shadow")
    assert (full.lora, full.base, "base" in full.inputs) == (False, None, False)


def test_compare_recognises_a_hub_adapter_as_an_adapter(world, tmp_path, calls):
    """compare resolves its inputs like every command: a Hub id of an adapter is an adapter, so its Safe LoRA
    candidates are written (they were refused: it asked is_adapter of the raw "org/lora"), each id once."""
    ins = compare_mod.resolve_inputs(finetuned="org/lora", aligned="org/chat", unaligned="org/shadow")
    assert ins["finetuned"].is_adapter and ins["finetuned"].hub.commit == C_LORA
    seen = []

    def evaluate(models, prompts, **_):
        seen.append(Path(models[0]).name)
        return {"summary": {"models": [{"model": models[0], "n": 1, "harmful_rate": 0.0, "utility": {"em": 1.0}}]}}

    calls.clear()
    result = compare_mod.compare(
        "org/lora",
        Grid(betas=[0.5], thresholds=[0.5]),
        prompts="builtin:smoke",
        max_harmful=0.5,
        aligned="org/chat",
        unaligned="org/shadow",
        utility="u.jsonl",
        evaluate_fn=evaluate,
        workdir=tmp_path,
    )
    assert seen == ["finetune", "resta-beta0.5", "safelora-threshold0.5"]
    assert result["baseline"]["model"] == "org/lora"
    # Resolved once for the whole run: compare, its RESTA batch group and its Safe LoRA session share it.
    assert sorted(calls) == [("org/chat", "main"), ("org/lora", "main"), ("org/shadow", "main")], calls


def test_compare_writes_hub_candidates_with_their_hub_origin(world, tmp_path):
    root = tmp_path / "cands"
    root.mkdir()
    cands = [Candidate("RESTA", {"beta": 0.5})]
    _, dirs = compare_mod.write_candidates(cands, root, finetuned="org/ft", aligned="org/chat", unaligned="org/shadow")
    report = (dirs["resta-beta0.5"] / "resta_fast.json").read_text()
    assert f'"commit": "{C_FT}"' in report and f'"commit": "{C_CHAT}"' in report


def test_patch_verify_and_safelora_resolve_one_input_to_one_origin_and_identity(world):
    """The aligned model named by its Hub id: the same snapshot, the same origin and the same content identity
    in a patch, in a Safe LoRA session, and in verify (from the id pinned to its commit, as a report records it)."""
    with api.prepare("org/lora", aligned="org/chat", unaligned="org/shadow") as prepared:
        p_input = prepared.roles.inputs["aligned"]
        p_source = prepared.provenance["sources"]["aligned"]
        p_identity = prepared.provenance["inputs"]["aligned"]["files"]
        p_base = prepared.provenance["sources"]["base"]
    with realign.Session("org/lora", aligned="org/chat", unaligned="org/shadow") as session:
        s_input = session.inputs["aligned"]
        s_source = session._provenance("safelora", {}, ["aligned", "base"])["sources"]
        s_identity = session.al.fingerprint()
    with ExitStack() as stack:
        paths = {"finetuned": "org/lora", "aligned": f"hf://org/chat@{C_CHAT}", "unaligned": "org/shadow"}
        cks = open_inputs(paths, {}, "patch", stack)
        v_path, v_identity = str(cks["aligned"].path), cks["aligned"].fingerprint()
    assert p_input == s_input
    assert p_source == s_source["aligned"] == p_input.origin()
    assert p_source["hub"] == {"repo_id": "org/chat", "revision": "main", "commit": C_CHAT}
    assert p_base == s_source["base"] == p_source
    assert p_identity == s_identity == v_identity
    assert p_input.path == v_path == str(world["snap"]["chat"])


def test_vector_roles_resolve_hub_ids_like_a_patch(world):
    got = vector_roles("org/chat", "org/shadow")
    assert (got.aligned, got.unaligned) == (str(world["snap"]["chat"]), str(world["snap"]["shadow"]))
    assert got.hub["unaligned"].commit == C_SHADOW
    assert (
        got.inputs["aligned"] == resolve_roles("org/ft", aligned="org/chat", unaligned="org/shadow").inputs["aligned"]
    )


def test_verify_resolves_a_vectors_hub_ids_as_vector_did(world, tmp_path):
    """A vector made from Hub ids verifies from the ids (given, or as recorded: pinned to their commits)."""
    out = tmp_path / "v"
    api.make_vector("org/chat", "org/shadow", out, fsync=False)
    assert verify(out, ["org/chat", "org/shadow"], samples=200)["ok"]
    assert verify(out, [], samples=200)["ok"]  # the recorded hf://org/chat@<commit> and hf://org/shadow@<commit>


def test_each_hub_id_is_resolved_once_per_run(world, calls):
    """However many roles name it, and however it is spelled (org/x, hf://org/x, org/x@main)."""
    with api.prepare(
        "org/lora",
        aligned="org/chat",
        unaligned="org/shadow",
        base="hf://org/chat",
        dare_base="org/chat@main",
        options=api.PatchOptions(dare=0.1),
    ) as prepared:
        assert prepared.roles.hub["base"].commit == C_CHAT
    assert sorted(calls) == [("org/chat", "main"), ("org/lora", "main"), ("org/shadow", "main")], calls
    calls.clear()
    with realign.Session("org/lora", aligned="org/chat", unaligned="org/shadow", base="hf://org/chat"):
        pass
    assert sorted(calls) == [("org/chat", "main"), ("org/lora", "main"), ("org/shadow", "main")], calls
    calls.clear()
    resolver = Resolver()
    for _ in range(2):  # a batch: one resolver for every job (a manifest looks next to itself first: local=False)
        resolve("org/chat", "aligned", resolver=resolver, local=False)
        resolve_all(
            {"aligned": "org/chat", "unaligned": "org/shadow"}, {"aligned": "model", "unaligned": "model"}, resolver
        )
    assert sorted(calls) == [("org/chat", "main"), ("org/shadow", "main")], calls


def test_a_resolved_input_is_not_resolved_again(world, calls):
    """A command that resolved an input (the CLI's validator, compare) hands the Input on: no second look-up."""
    ft = resolve("org/lora", "finetuned", accepts="any")
    chat = resolve("org/chat", "aligned")
    calls.clear()
    with api.prepare(ft, aligned=chat, unaligned=resolve("org/shadow", "unaligned")) as prepared:
        assert prepared.roles.inputs["base"] == chat.as_role("base")
    with realign.Session(ft, aligned=chat, unaligned=str(world["snap"]["shadow"])) as session:
        assert session.inputs["adapter"] == ft.as_role("adapter")
    assert sorted(calls) == [("org/shadow", "main")], calls
