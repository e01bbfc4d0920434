"""resta-fast push (push.py, push_cli.py) end to end, against the fake Hub of tests/hub_server.py.

Most tests run ``python -m resta_fast push`` in a subprocess with ``HF_ENDPOINT`` pointed at the
server, as a user would; the rest call the library or ``cli.main`` in this process, with
huggingface_hub's constants pointed at it (``hub_here``). ``HF_HUB_DISABLE_XET=1`` keeps uploads
on the LFS path the server speaks; a Xet request would land in ``hub.unexpected``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import three_models
from hub_server import USER, HubServer

from resta_fast import api
from resta_fast.cli import main
from resta_fast.errors import RestaError
from resta_fast.io.digest import sha256_file
from resta_fast.io.lock import OutputLock
from resta_fast.report import VALIDATION_FAILED

pytest.importorskip("huggingface_hub")

TOKEN = "hf_test_token"
REPO = "org/restored"
HUB_ROUTES = ("create", "info", "new_branch", "validate", "preupload", "lfs_batch", "commit")


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A finished, sharded patch output (never modified: tests that tamper work on a copy)."""
    root = tmp_path_factory.mktemp("push")
    ft, al, un = three_models(root, shards=2, vocab=16, hidden=8, layers=1, inter=12)
    out = root / "restored"
    api.patch(ft, out, aligned=al, unaligned=un, beta=0.5, fsync=False)
    return out


@pytest.fixture()
def copy(output, tmp_path):
    """A copy of the output that a test may tamper with."""
    return Path(shutil.copytree(output, tmp_path / "restored"))


@pytest.fixture()
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture()
def hub_here(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process talks to ``hub``; no saved token or cache of the user's is read or written."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf_home" / "agents.json"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def hub_env(tmp_path, endpoint: str, token: str | None = TOKEN) -> dict:
    """The environment of a push subprocess: the fake Hub, a fresh HF_HOME, and the token only in HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and "PROXY" not in k.upper()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1", NO_PROXY="*")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push_cli(env: dict, *argv) -> tuple[int, str, list[str]]:
    """``python -m resta_fast push ARGV``: (exit code, stdout, the non-empty stderr lines)."""
    proc = subprocess.run(
        [sys.executable, "-m", "resta_fast", "push", *map(str, argv), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return proc.returncode, proc.stdout, [ln for ln in proc.stderr.splitlines() if ln.strip()]


def snapshot(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


def hub_requests(hub) -> list[dict]:
    return [r for r in hub.requests if r["route"] in HUB_ROUTES]


def refused(code: int, lines: list[str], *words: str) -> str:
    """The refusal is exit 2 and one line that names every word."""
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("resta-fast: error: push"), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- what a push uploads --------------------------------------------------------------------------


def test_every_file_arrives_intact_in_one_commit(output, hub, tmp_path):
    before = snapshot(output)
    code, stdout, lines = push_cli(hub_env(tmp_path, hub.url), output, REPO)
    assert code == 0, lines
    assert hub.unexpected == []
    [commit] = hub.commits
    assert commit["repo_id"] == REPO and commit["revision"] == "main" and not commit["create_pr"]
    assert commit["files"] == before  # exactly the output's files, each with its local sha256
    assert hub.files(REPO) == before
    assert commit["lfs"] == sorted(n for n in before if n.endswith(".safetensors"))
    assert {n: sha256_file(output / n) for n in commit["lfs"]} == {n: before[n] for n in commit["lfs"]}
    assert stdout.strip() == f"{hub.url}/{REPO}/commit/{commit['oid']}"
    assert lines == [f"pushed {len(before)} files (0.0 MB) to {REPO}@main in one commit"]
    assert snapshot(output) == before  # the output is only read


def test_the_token_comes_from_hf_token_and_reaches_every_hub_call(output, hub, tmp_path):
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), output, REPO)
    assert code == 0, lines
    assert {r["route"] for r in hub_requests(hub)} >= {"create", "preupload", "lfs_batch", "commit"}
    assert {r["auth"] for r in hub_requests(hub)} == {f"Bearer {TOKEN}"}


def test_lfs_uploads_ask_for_the_basic_transfer(output, hub, tmp_path):
    """The server speaks 'basic' only; Xet (taken whenever hf_xet is installed) is off in the tests' environment."""
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), output, REPO)
    assert code == 0, lines
    assert hub.lfs_batches and all("basic" in b["transfers"] for b in hub.lfs_batches)
    assert not [r for r in hub.requests if "xet" in r["path"]]


def test_private_revision_and_commit_message_reach_the_hub(output, hub, tmp_path):
    argv = (output, REPO, "--private", "--revision", "v2", "--commit-message", "restored, beta 0.5")
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), *argv)
    assert code == 0, lines
    assert hub.creates == [{"name": "restored", "organization": "org", "visibility": "private"}]
    [commit] = hub.commits
    assert commit["revision"] == "v2" and commit["summary"] == "restored, beta 0.5"
    assert "verify` passed" in commit["description"]
    assert hub.files(REPO, "v2") == snapshot(output)
    assert hub.files(REPO, "main") == {}  # the branch was made from main, main itself untouched


def test_a_repo_is_not_made_public_unless_asked(output, hub_here):
    """Without --private no visibility is sent: a new repo follows its organization's default."""
    from resta_fast.push import push

    push(output, REPO, progress=False)
    assert hub_here.creates == [{"name": "restored", "organization": "org"}]


def test_create_pr_opens_a_pull_request_and_leaves_the_branch(output, hub_here, capsys):
    assert main(["push", str(output), REPO, "--create-pr", "--no-progress"]) == 0
    [commit] = hub_here.commits
    assert commit["create_pr"] and commit["revision"] == "main"
    assert hub_here.files(REPO) == {}
    preupload = [r for r in hub_here.requests if r["route"] == "preupload"]
    assert preupload and all(r["query"].get("create_pr") == "1" for r in preupload)
    assert capsys.readouterr().out.strip() == f"{hub_here.url}/{REPO}/discussions/1"


def test_the_library_returns_what_was_committed(output, hub_here):
    from resta_fast.push import push

    result = push(output, "restored", progress=False)  # no namespace: the token's own
    [commit] = hub_here.commits
    assert result["repo_id"] == f"{USER}/restored" == commit["repo_id"]
    assert result["commit_oid"] == commit["oid"] and result["commit_url"].endswith(commit["oid"])
    assert {n: f["sha256"] for n, f in result["files"].items()} == snapshot(output) == commit["files"]
    assert {n: f["size"] for n, f in result["files"].items()} == {p.name: p.stat().st_size for p in output.iterdir()}
    assert result["forced"] == [] and result["pr_url"] is None


def test_an_existing_repo_without_the_right_to_create_still_takes_the_push(output, hub_here):
    """create_repo answers 403 for a repo that exists in an organization the token may write to but not create in."""
    from resta_fast.push import push

    hub_here.add_repo(REPO)
    hub_here.create_status = 403
    push(output, REPO, progress=False)
    assert hub_here.files(REPO) == snapshot(output)


def test_a_second_push_to_the_same_repo_is_a_second_commit(output, copy, hub_here):
    """create_repo answers 409 for a repo that exists: the push goes on into it."""
    from resta_fast.push import push

    push(output, REPO, progress=False)
    (copy / "notes.txt").write_text("a file resta_fast.json does not list goes up too\n")
    push(copy, REPO, progress=False)
    assert [r["route"] for r in hub_here.requests].count("create") == 2 and len(hub_here.commits) == 2
    assert hub_here.commits[1]["files"]["notes.txt"] == sha256_file(copy / "notes.txt")
    assert hub_here.files(REPO) == snapshot(copy)


# --- refusals: exit 2, one line, nothing committed -------------------------------------------------


def tamper(out: Path) -> str:
    """Flip one byte in the last tensor of the first shard; return that shard's name."""
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard.name


def test_an_output_that_fails_verify_is_refused_before_any_network(copy, hub, tmp_path):
    shard = tamper(copy)
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), copy, REPO)
    line = refused(code, lines, "verify fails its sha256 check", shard, "--force", f"resta-fast verify {copy}")
    assert "nothing was uploaded" in line
    assert hub_requests(hub) == [] and hub.commits == []


def test_force_uploads_it_with_a_note_in_the_uploaded_card_only(copy, hub, tmp_path):
    shard = tamper(copy)
    before = snapshot(copy)
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), copy, REPO, "--force")
    assert code == 0, lines
    assert lines[-1].endswith("(forced: the uploaded README.md says why)")
    [commit] = hub.commits
    assert set(commit["files"]) == set(before)
    assert {n: d for n, d in commit["files"].items() if n != "README.md"} == {
        n: d for n, d in before.items() if n != "README.md"
    }  # the tampered shard goes up as it is on disk
    card = hub.blobs[commit["files"]["README.md"]].decode()
    local = (copy / "README.md").read_text()
    assert card != local and snapshot(copy) == before  # a modified copy was uploaded; the output is untouched
    assert card.startswith("---\n") and card.split("\n---\n", 1)[0] == local.split("\n---\n", 1)[0]
    body = card.split("\n---\n", 1)[1]
    assert body.startswith("> **Uploaded with `resta-fast push --force`.**")
    assert f"verify fails its sha256 check ({shard}: sha256" in body.splitlines()[0]
    assert body.endswith(local.split("\n---\n", 1)[1])
    assert "--force" in commit["description"]


def test_force_without_a_card_uploads_one_that_holds_only_the_note(copy, hub_here):
    from resta_fast.push import push

    (copy / "README.md").unlink()
    result = push(copy, REPO, force=True, progress=False)
    assert result["forced"] == ["verify fails its sha256 check (README.md: recorded but missing)"]
    [commit] = hub_here.commits
    assert set(commit["files"]) == {p.name for p in copy.iterdir()} | {"README.md"}
    card = hub_here.blobs[commit["files"]["README.md"]].decode()
    assert (
        card.startswith("> **Uploaded with `resta-fast push --force`.**") and "README.md: recorded but missing" in card
    )
    assert not (copy / "README.md").exists()


def test_validation_failed_is_refused_and_force_says_why(copy, hub_here, capsys):
    (copy / VALIDATION_FAILED).write_text("harmful rate 0.31 > 0.05\n")
    code = main(["push", str(copy), REPO, "--no-progress"])
    refused(
        code,
        capsys.readouterr().err.splitlines(),
        "failed its safety validation (harmful rate 0.31 > 0.05)",
        VALIDATION_FAILED,
        "--force",
    )
    assert hub_requests(hub_here) == []
    assert main(["push", str(copy), REPO, "--no-progress", "--force"]) == 0
    [commit] = hub_here.commits
    assert VALIDATION_FAILED in commit["files"]  # every file goes up, the marker too
    assert "harmful rate 0.31 > 0.05" in hub_here.blobs[commit["files"]["README.md"]].decode().split("\n---\n")[1]


def test_a_rejected_token_is_one_line_saying_how_to_log_in(output, hub, tmp_path):
    code, _, lines = push_cli(hub_env(tmp_path, hub.url, token="hf_wrong"), output, REPO)
    refused(code, lines, "401", "hf auth login", "HF_TOKEN")
    assert hub.commits == [] and hub.repos == {}


def test_no_token_at_all_is_refused_before_any_network(output, hub_here, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    code = main(["push", str(output), REPO])
    refused(code, capsys.readouterr().err.splitlines(), "not logged in", "hf auth login", "HF_TOKEN")
    assert hub_requests(hub_here) == []


def test_a_missing_repo_the_token_may_not_create_is_refused(output, hub, tmp_path):
    hub.create_status = 403
    code, _, lines = push_cli(hub_env(tmp_path, hub.url), output, REPO)
    refused(code, lines, "does not exist and this token may not create it", "403")
    assert hub.commits == [] and [r["route"] for r in hub_requests(hub)] == ["create", "info"]


def test_a_pull_request_against_a_missing_branch_is_refused(output, hub_here, capsys):
    code = main(["push", str(output), REPO, "--create-pr", "--revision", "nope"])
    refused(code, capsys.readouterr().err.splitlines(), f"push {REPO}@nope: the repo has no such branch")
    assert hub_here.commits == []


def test_offline_is_refused_before_any_network(output, hub_here, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["push", str(output), REPO])
    refused(code, capsys.readouterr().err.splitlines(), "HF_HUB_OFFLINE=1", "nothing was uploaded")
    assert hub_here.requests == []


def test_an_unreachable_hub_is_one_line(output, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    code, _, lines = push_cli(hub_env(tmp_path, endpoint), output, REPO)
    refused(code, lines, "cannot reach the Hugging Face Hub at " + endpoint, "nothing was committed")


@pytest.mark.parametrize("repo_id", ["org/a/b", "org/bad name", "org/x--y", "org/x.git"])
def test_a_bad_repo_id_is_refused_before_any_network(output, hub_here, capsys, repo_id):
    code = main(["push", str(output), repo_id])
    refused(code, capsys.readouterr().err.splitlines(), f"{repo_id!r} is not a Hugging Face repo id", "ORG/NAME")
    assert hub_here.requests == []


@pytest.mark.parametrize(
    "leftover", [".restored.resta-tmp-host-123-0123abcd", ".restored.old-0123abcd", ".x.resta-lock"]
)
def test_a_leftover_of_an_interrupted_run_is_refused(copy, hub_here, capsys, leftover):
    (copy / leftover).mkdir()
    code = main(["push", str(copy), REPO, "--force"])  # --force does not upload leftovers either
    refused(code, capsys.readouterr().err.splitlines(), leftover, "interrupted resta-fast run")
    assert hub_requests(hub_here) == []


def test_an_output_being_written_now_is_refused(copy, hub_here, capsys):
    with OutputLock(copy):
        code = main(["push", str(copy), REPO])
    refused(code, capsys.readouterr().err.splitlines(), "a resta-fast run is writing this output now")
    assert hub_here.requests == []
    assert main(["push", str(copy), REPO, "--no-progress"]) == 0  # the lock is gone: it goes


@pytest.mark.parametrize("in_memory", [True, False], ids=["small-file", "large-file"])
def test_a_file_changed_after_verify_is_never_committed(copy, hub_here, monkeypatch, in_memory):
    """Small files are hashed when read, large ones when uploaded: either way a change is caught before the commit."""
    from resta_fast import push as push_module

    verified = push_module.refusals

    def verify_then_tamper(out):
        result = verified(out)
        tamper(out)
        return result

    monkeypatch.setattr(push_module, "refusals", verify_then_tamper)
    if not in_memory:
        monkeypatch.setattr(push_module, "IN_MEMORY_BYTES", 0)
    with pytest.raises(RestaError, match="changed after it was verified" if in_memory else "changed while it was"):
        push_module.push(copy, REPO, progress=False)
    assert hub_here.commits == []


def test_a_card_the_hub_rejects_is_refused_before_uploading_weights(output, hub_here, capsys):
    hub_here.card_errors = ['"base_model" must be a model id']
    code = main(["push", str(output), REPO])
    line = refused(code, capsys.readouterr().err.splitlines(), "rejects the model card's metadata", "--force")
    assert '("base_model" must be a model id)' in line
    assert hub_here.commits == [] and hub_here.lfs_batches == []


def test_a_push_never_imports_torch(output, hub, tmp_path):
    """Like verify, push reads hashes and headers only: the CPU path stays torch-free (tests/test_cli_startup.py)."""
    run = (
        "import sys\nfrom resta_fast.cli import main\ncode = main(sys.argv[1:])\n"
        "print('HEAVY:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton'))))\n"
        "sys.exit(code)"
    )
    argv = [sys.executable, "-c", run, "push", str(output), REPO, "--no-progress"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=hub_env(tmp_path, hub.url), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:"
    assert len(hub.commits) == 1


# --- the command's start-up -------------------------------------------------------------------------


def test_push_help_imports_no_huggingface_hub():
    code = (
        "import sys\nfrom resta_fast.cli import main\n"
        "try:\n    main(['push', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('huggingface_hub', 'torch')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: resta-fast push" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_json_prints_what_was_committed(output, hub_here, capsys):
    assert main(["push", str(output), REPO, "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["commit_oid"] == hub_here.commits[0]["oid"]
