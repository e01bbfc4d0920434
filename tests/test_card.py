"""The model card (README.md) of every output: Hub conventions, what was done, how to reproduce it."""

from __future__ import annotations

import json
import shlex
import struct

import pytest
import yaml
from checkpoints import hub_cache_model, three_models, write_adapter

from resta_fast import api
from resta_fast.card import CARD_NAME, front_matter, render_model_card, reproduce_command
from resta_fast.cli import main
from resta_fast.io.identity import short_id
from resta_fast.kernels import backend_status
from resta_fast.verify import verify

BACKEND = "cpp" if backend_status().get("cpp") == "ok" else "torch"


@pytest.fixture()
def models(tmp_path):
    ft, al, un = three_models(tmp_path / "in", shards=2)
    (ft / "README.md").write_text("---\nlicense: apache-2.0\n---\n# The fine-tune's own card\n")
    out = tmp_path / "out"
    out.mkdir()
    return ft, al, un, out


def card_of(out) -> tuple[dict, str]:
    """(front matter, body) of ``out``'s card, split and parsed with a YAML parser."""
    text = (out / CARD_NAME).read_text()
    assert text.startswith("---\n")
    head, sep, body = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head), body


def assert_publishable(out, *roots) -> None:
    """The card loads with huggingface_hub's ModelCard, every ``base_model`` entry is a valid Hub
    repo id, and no absolute path (of the test's tree, or any other) appears anywhere in it."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import validate_repo_id

    text = (out / CARD_NAME).read_text()
    card = ModelCard.load(out / CARD_NAME)
    assert str(ModelCard(text)) == text  # written as huggingface_hub's ModelCard would give it back
    for repo in card.data.to_dict().get("base_model") or []:
        validate_repo_id(repo)
        assert "/" in repo and not repo.startswith(("/", "."))
    for root in roots:
        assert str(root) not in text, f"{root} appears in the card"
    assert "/tmp/" not in text and "/root" not in text and "/home/" not in text


def data(path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :]


def run(*argv) -> int:
    return main([str(a) for a in argv] + ["--no-fsync", "--no-progress"])


def test_patch_card_has_the_hub_fields_and_says_what_was_done(models):
    ft, al, un, out = models
    argv = [
        "patch",
        "--finetuned",
        ft,
        "--aligned",
        al,
        "--unaligned",
        un,
        "--beta",
        "0.5",
        "--dare",
        "0.3",
        "--seed",
        "7",
        "--backend",
        BACKEND,
        "--out",
        out / "r",
    ]
    assert run(*argv) == 0
    meta, body = card_of(out / "r")
    assert "base_model" not in meta and "base_model_relation" not in meta  # no input came from the Hub
    assert meta["library_name"] == "transformers"
    assert {"resta", "safety-realignment", "dare"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    report = json.loads((out / "r" / "resta_fast.json").read_text())
    for needle in (
        "β = 0.5",
        "p = 0.3",
        "seed 7",
        f"resta_fast {report['version']}",
        "`resta_fast.json`",
        "not validated",
    ):
        assert needle in body, needle
    command = shlex.join(["resta-fast", *map(str, argv), "--no-fsync", "--no-progress"])
    assert command not in body, "the command as typed names local paths: only with --record-paths"
    # Local inputs by their directory's name and content id; the rebuilt command uses the names.
    ids = {role: short_id(info["files"]) for role, info in report["inputs"].items()}
    assert f"| fine-tune | `ft` (local) | | `{ids['finetuned']}` |" in body
    assert "--finetuned ft --aligned aligned --unaligned unaligned --beta 0.5 --dare 0.3 --seed 7" in body
    # The fine-tune's own card is not copied over ours; ours says it exists by name, not path.
    assert "license: apache-2.0" not in (out / "r" / CARD_NAME).read_text()
    assert "The fine-tune's own model card, if `ft` has one, is not copied here." in body
    assert_publishable(out / "r", ft.parent, out)
    # huggingface_hub reads it as a model card.
    card = pytest.importorskip("huggingface_hub").ModelCard.load(out / "r" / CARD_NAME)
    assert card.data.base_model is None and card.data.library_name == "transformers"
    # Asked for: the paths are recorded, and the card shows the command as typed.
    assert run(*argv[:-1], out / "rp", "--record-paths") == 0
    _, body = card_of(out / "rp")
    command = shlex.join(["resta-fast", *map(str, argv[:-1]), str(out / "rp"), "--record-paths"])
    assert f"```bash\n{command} --no-fsync --no-progress\n```" in body, "the exact command that wrote it"
    sources = json.loads((out / "rp" / "resta_fast.json").read_text())["sources"]
    assert sources["finetuned"] == {"name": "ft", "path": str(ft.absolute())}


def test_the_card_is_listed_in_the_report_and_verified(models):
    ft, al, un, out = models
    api.patch(ft, out / "r", aligned=al, unaligned=un, beta=0.5, fsync=False)
    report = json.loads((out / "r" / "resta_fast.json").read_text())
    assert CARD_NAME in report["files"]
    assert verify(out / "r")["ok"]
    with open(out / "r" / CARD_NAME, "a") as fh:
        fh.write("tampered\n")
    result = verify(out / "r")
    assert not result["ok"]
    assert any("README.md" in p for c in result["checks"] for p in c["problems"])


def test_an_api_patch_card_shows_a_command_that_reproduces_it(models, tmp_path, monkeypatch):
    ft, al, un, out = models
    api.patch(
        ft,
        out / "api",
        aligned=al,
        unaligned=un,
        beta=0.25,
        dare=0.2,
        seed=3,
        exclude=["norm"],
        beta_rules=[r"mlp\.=0.5"],
        dtype="float32",
        fsync=False,
    )
    _, body = card_of(out / "api")
    command = body.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith("resta-fast patch ") and command.endswith("--out OUT")
    argv = shlex.split(command)[1:-1] + [str(out / "again")]
    monkeypatch.chdir(ft.parent)  # local inputs are named by their directories' names
    assert run(*argv) == 0
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert data(out / "again" / shard) == data(out / "api" / shard)
    a = json.loads((out / "api" / "resta_fast.json").read_text())
    b = json.loads((out / "again" / "resta_fast.json").read_text())
    assert a["params"] == b["params"] and a["plan"] == b["plan"]


def test_vector_and_lora_cards(models):
    ft, al, un, out = models
    assert run("vector", "--aligned", al, "--unaligned", un, "--out", out / "vec") == 0
    meta, body = card_of(out / "vec")
    assert "base_model" not in meta and "safety-vector" in meta["tags"]
    assert_publishable(out / "vec", al.parent, out)
    assert "V = θ_aligned − θ_unaligned" in body and "resta-fast vector --aligned" in body
    pytest.importorskip("torch")
    adapter = write_adapter(out.parent / "adapter")
    assert (
        run(
            "patch",
            "--finetuned",
            adapter,
            "--base",
            al,
            "--aligned",
            al,
            "--unaligned",
            un,
            "--beta",
            "0.5",
            "--out",
            out / "lora",
        )
        == 0
    )
    meta, body = card_of(out / "lora")
    assert "lora" in meta["tags"] and "base_model" not in meta
    assert "The LoRA adapter `adapter` was merged in fp32 into its base `aligned`" in body
    assert "if `adapter` has one, is not copied here" in body
    assert_publishable(out / "lora", al.parent, out)


def test_every_batch_output_gets_a_card(models, tmp_path):
    ft, al, un, out = models
    manifest = tmp_path / "batch.json"
    manifest.write_text(
        json.dumps(
            {
                "aligned": str(al),
                "unaligned": str(un),
                "fsync": False,
                "backend": BACKEND,
                "jobs": [
                    {"name": "one", "finetuned": str(ft), "out": str(out / "b1")},
                    {"name": "two", "finetuned": str(ft), "out": str(out / "b2"), "beta": 0.7},
                ],
            }
        )
    )
    assert main(["batch", str(manifest), "--no-progress"]) == 0
    for name in ("b1", "b2"):
        meta, body = card_of(out / name)
        assert "base_model" not in meta and f"resta-fast batch {manifest}" not in body
        assert "A command that writes this output" in body and "--finetuned ft --aligned aligned" in body
        assert_publishable(out / name, tmp_path)
        assert verify(out / name)["ok"]
    assert "β = 0.7" in card_of(out / "b2")[1]
    # --record-paths: the batch command as typed, in each job's card.
    manifest.write_text(manifest.read_text().replace(str(out / "b"), str(out / "p")))
    assert main(["batch", str(manifest), "--no-progress", "--record-paths"]) == 0
    for name, job in (("p1", "one"), ("p2", "two")):
        _, body = card_of(out / name)
        assert f"job `{job}` of the batch" in body and f"resta-fast batch {manifest}" in body
        assert "The same output from one command" in body


def test_hub_inputs_name_their_ids_and_commits(models, tmp_path, monkeypatch):
    ft, al, un, out = models
    cache = tmp_path / "cache"
    commits = {"org/ft": "1" * 40, "org/chat": "2" * 40, "org/shadow": "3" * 40}
    for repo, src in (("org/ft", ft), ("org/chat", al), ("org/shadow", un)):
        hub_cache_model(cache, repo, src, commit=commits[repo], refs=("main", "v2"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert (
        run(
            "patch",
            "--finetuned",
            "org/ft@v2",
            "--aligned",
            "org/chat",
            "--unaligned",
            "org/shadow",
            "--beta",
            "0.5",
            "--out",
            out / "h",
        )
        == 0
    )
    meta, body = card_of(out / "h")
    assert meta["base_model"] == ["org/ft", "org/chat", "org/shadow"] and meta["base_model_relation"] == "merge"
    assert_publishable(out / "h", tmp_path)
    assert f"[org/ft](https://huggingface.co/org/ft) | v2 | `{commits['org/ft']}`" in body
    assert f"https://huggingface.co/org/ft/blob/{commits['org/ft']}/README.md" in body
    pinned = f"--finetuned org/ft@{commits['org/ft']} --aligned org/chat@{commits['org/chat']}"
    assert pinned in body, "the rebuilt command pins every Hub input to its commit"


def verdict(passed: bool) -> dict:
    return {
        "passed": passed,
        "reason": "restored: harmful_rate 0.0200 <= 0.0500"
        if passed
        else "restored: harmful_rate 0.4000 > max 0.0500 (n=50)",
        "gate_line": f"RESTA_GATE: {'PASS' if passed else 'FAIL'} ...",
        "summary": {
            "models": [
                {
                    "model": "/x/.restored.resta-tmp-1",
                    "n": 50,
                    "harmful": 1 if passed else 20,
                    "harmless": 49 if passed else 30,
                    "unparseable": 0,
                    "harmful_rate": 0.02 if passed else 0.4,
                    "ci95": [0.0035, 0.1050] if passed else [0.2761, 0.5382],
                }
            ],
            "gate": {"passed": passed},
        },
    }


@pytest.mark.parametrize("passed", [True, False])
def test_a_validated_output_card_carries_the_verdict(models, passed):
    ft, al, un, out = models
    api.patch(
        ft,
        out / "v",
        aligned=al,
        unaligned=un,
        beta=0.5,
        fsync=False,
        validate=lambda d: verdict(passed),
        command_line="resta-fast patch --validate-prompts catqa.json ...",
        record_paths=True,
    )
    _, body = card_of(out / "v")
    section = body.split("## Safety validation", 1)[1]
    assert ("**PASSED**" if passed else "**FAILED**") in section
    assert ("0.0200 | [0.0035, 0.1050] | 1 / 50" if passed else "0.4000 | [0.2761, 0.5382] | 20 / 50") in section
    assert "resta-fast patch --validate-prompts catqa.json ..." in body, "the command line survives the refresh"
    assert ("VALIDATION_FAILED" in section) is (not passed)
    assert verify(out / "v")["checks"][2]["ok"], "the refreshed card's sha256 is the one recorded"


def test_validate_prompts_puts_the_gate_verdict_in_the_card(tmp_path):
    """The real gate (``--validate-prompts builtin:smoke``) on a tiny Llama that refuses."""
    pytest.importorskip("transformers")
    import torch
    from eval_fakes import refusal_triple

    torch.set_num_threads(1)
    ft, al, un = refusal_triple(tmp_path)
    out = tmp_path / "restored"
    assert (
        run(
            "patch",
            "--finetuned",
            ft,
            "--aligned",
            al,
            "--unaligned",
            un,
            "--beta",
            "1.0",
            "--out",
            out,
            "--backend",
            "torch",
            "--validate-prompts",
            "builtin:smoke",
            "--max-harmful",
            "0.05",
            "--validate-max-new-tokens",
            "4",
        )
        == 0
    )
    report = json.loads((out / "resta_fast.json").read_text())
    _, body = card_of(out)
    section = body.split("## Safety validation", 1)[1]
    model = report["validation"]["summary"]["models"][0]
    assert "**PASSED**" in section and "RESTA_GATE: PASS" in section
    assert f"| {model['harmful_rate']:.4f} | [{model['ci95'][0]:.4f}, {model['ci95'][1]:.4f}] |" in section
    assert verify(out)["ok"]


def test_other_commands_get_a_generic_card():
    """safelora/safemerge (or any later command) render whatever their params and inputs hold."""
    report = {
        "tool": "resta_fast",
        "version": "9.9",
        "command": "safelora",
        "params": {"threshold": 0.35, "projection": "rank-8", "layers": ["q_proj", "v_proj"]},
        "inputs": {"finetuned": {"files": {}}, "aligned": {"files": {}}},
        "sources": {
            "finetuned": {"name": "adapter", "path": "/m/adapter"},
            "aligned": {"name": "chat", "hub": {"repo_id": "org/chat", "revision": "main", "commit": "7" * 40}},
        },
    }
    text = render_model_card(report, command_line="resta-fast safelora --adapter /m/adapter ...")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == front_matter(report)
    assert meta["base_model"] == ["org/chat"] and "safelora" in meta["tags"]
    for needle in (
        "`resta-fast safelora`",
        "| threshold | `0.35` |",
        '| layers | `["q_proj", "v_proj"]` |',
        "resta-fast safelora --adapter /m/adapter ...",
        "resta_fast 9.9",
    ):
        assert needle in text, needle
    assert reproduce_command(report) is None
    assert "Run `resta-fast safelora` on the inputs above" in render_model_card(report)
