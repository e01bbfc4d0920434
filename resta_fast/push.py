"""Publish a finished output to the Hugging Face Hub: verified first, every file, one commit.

Before anything leaves the machine, ``push`` checks the repo id with huggingface_hub's own
rule, refuses leftovers of an interrupted run and an output a run is writing now, and runs
``verify`` (hashes and headers, as ``resta-fast verify OUT``). An output that fails it, or
that carries the ``VALIDATION_FAILED`` marker, is refused unless ``force``; a forced upload's
model card opens with a note that says why it was refused. The token is huggingface_hub's:
``HF_TOKEN``, else the one ``hf auth login`` saved; ``HF_HUB_OFFLINE=1`` refuses.

Then the repo is created if it is missing (``create_repo(exist_ok=True)``), a named branch
too, every file is uploaded (LFS or Xet, as huggingface_hub chooses), each upload's sha256 is
compared with the verified one, and everything lands in a single commit (``create_commit``):
a refusal or a failure at any step commits nothing. The output directory is only read.
huggingface_hub is imported when a push runs, never by ``--help``.

Example:
    $ HF_TOKEN=hf_... resta-fast push restored/ my-org/llama-chat-restored --private
    https://huggingface.co/my-org/llama-chat-restored/commit/4f0e...
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import sys
import traceback
from pathlib import Path

from resta_fast import __version__
from resta_fast.errors import OptionError, RestaError
from resta_fast.io.digest import sha256_file
from resta_fast.io.hub import offline
from resta_fast.io.lock import LOCK_SUFFIX, OLD_MARKER, lock_path
from resta_fast.io.writer import TMP_MARKER
from resta_fast.report import REPORT_NAME, VALIDATION_FAILED

__all__ = ["forced_card", "output_files", "push"]

CARD_NAME = "README.md"  # = card.CARD_NAME (not imported: card.py pulls in the card builder)
# Files up to this size are read once, hashed and sent from memory, so what the commit carries is
# exactly what was checked; the Hub stores anything larger through LFS/Xet, whose sha256 is checked.
IN_MEMORY_BYTES = 16 << 20
_LEFTOVER = re.compile(
    rf"^\..+(?:{re.escape(LOCK_SUFFIX)}|{re.escape(TMP_MARKER)}.*|{re.escape(OLD_MARKER)}[0-9a-f]+)$"
)


def push(
    out,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Upload the output directory ``out`` to the Hub model repo ``repo_id`` in one commit.

    Args:
        out: a directory written by ``patch``, ``vector``, ``batch``, ``safelora`` ... (only read).
        repo_id: ``ORG/NAME`` (or ``NAME``: the token's own namespace); created if missing.
        revision: the branch to commit to (created from ``main`` when missing); default ``main``.
        private: create the repo private (a repo that exists keeps its visibility).
        commit_message: the commit's title (default: "Upload with resta-fast push").
        create_pr: open a pull request with the commit instead of committing to the branch.
        force: upload an output that fails ``verify`` or carries ``VALIDATION_FAILED``; the
            uploaded model card (never the one on disk) then says so.
        progress: huggingface_hub's upload progress bars on stderr.
    Returns:
        ``{"repo_id", "revision", "commit_url", "commit_oid", "pr_url", "files": {name: {"sha256",
        "size"}}, "forced": [reasons a plain push refused, or none]}``.
    Raises:
        RestaError: one line, and nothing was committed: a bad repo id, leftovers, a failed
        verify or validation (an ``OptionError`` naming ``force``), offline, no token or a
        rejected one, no right to create the repo or write to it, the Hub unreachable.

    Example (skipped as a doctest: it needs a token and the network):
        >>> push("restored", "my-org/restored", private=True)["commit_url"]  # doctest: +SKIP
        'https://huggingface.co/my-org/restored/commit/4f0e...'
    """
    out = Path(out)
    check_repo_id(repo_id)
    if not out.is_dir():
        raise RestaError(f"push {out}: not a directory; give an output directory written by resta-fast")
    names = output_files(out)
    check_not_being_written(out)
    if offline():
        raise RestaError(
            f"push {repo_id}: HF_HUB_OFFLINE=1 forbids uploading, nothing was uploaded; unset HF_HUB_OFFLINE "
            "and retry online"
        )
    hf = _hub()
    try:
        token = hf.get_token()
    except Exception as exc:  # noqa: BLE001 - HF_OIDC_RESOURCE set and its token exchange failed
        raise RestaError(
            f"push {repo_id}: no Hugging Face token ({_first_line(exc)}), nothing was uploaded; run `hf auth login` "
            "or set HF_TOKEN"
        ) from None
    if not token:
        raise RestaError(
            f"push {repo_id}: not logged in to the Hugging Face Hub, nothing was uploaded; run `hf auth login` "
            "or set HF_TOKEN to a token with write access"
        )
    reasons, hashes_ok = refusals(out)
    if reasons and not force:
        raise OptionError(
            "force",
            "push {out}: {why}, nothing was uploaded; see `resta-fast verify {out}`, or pass {force} to upload "
            "it anyway",
            out=out,
            why=", and ".join(reasons),
        )
    contents, expected = _contents(out, names, hashes_ok)
    if reasons:  # the note goes into an uploaded copy of the card (one is made if there is none)
        contents[CARD_NAME] = forced_card(_text(contents.get(CARD_NAME, b"")), reasons).encode("utf-8")
        expected[CARD_NAME] = hashlib.sha256(contents[CARD_NAME]).hexdigest()
        names = sorted(contents)
    sizes = {n: len(c) if isinstance(c, bytes) else (out / n).stat().st_size for n, c in contents.items()}
    api = hf.HfApi()
    where = repo_id if revision is None else f"{repo_id}@{revision}"
    if progress:
        total = sum(sizes.values())
        print(f"resta-fast: pushing {len(names)} files ({total / 1e6:.1f} MB) to {where}", file=sys.stderr)
    step = "create"
    try:
        with _progress_bars(progress):
            repo = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
            if revision is not None and not create_pr:
                step = "branch"
                _ensure_branch(api, repo, revision)
            ops = [hf.CommitOperationAdd(path_in_repo=n, path_or_fileobj=contents[n]) for n in names]
            step = "card"
            validate_card = getattr(api, "_validate_yaml", None)  # create_commit checks it too, but after uploading
            if validate_card is not None and CARD_NAME in contents:
                validate_card(_text(contents[CARD_NAME]))
            step = "upload"
            api.preupload_lfs_files(repo, additions=ops, revision=revision, create_pr=create_pr, free_memory=False)
            _check_uploaded(out, ops, expected)
            step = "commit"
            info = api.create_commit(
                repo,
                ops,
                commit_message=commit_message or "Upload with resta-fast push",
                commit_description=_description(out, reasons),
                revision=revision,
                create_pr=create_pr,
            )
    except RestaError:
        raise
    except Exception as exc:  # noqa: BLE001 - only what huggingface_hub and its HTTP client raise becomes a line
        error = _hub_error(exc, out, where, step, api.endpoint)
        if error is None:
            raise
        raise error from None
    return {
        "repo_id": repo,
        "revision": revision or "main",
        "create_pr": create_pr,
        "commit_url": str(info.commit_url),
        "commit_oid": info.oid,
        "pr_url": info.pr_url,
        "files": {n: {"sha256": expected[n], "size": sizes[n]} for n in names},
        "forced": reasons,
    }


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id huggingface_hub would refuse, before any network access.

    Example:
        >>> check_repo_id("my-org/restored")
        >>> check_repo_id("org/a/b")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: push: 'org/a/b' is not a Hugging Face repo id (...); name it ORG/NAME, ...
    """
    _hub()  # says how to install it when it is missing
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise RestaError(
            f"push: {repo_id!r} is not a Hugging Face repo id ({_first_line(exc)}); name it ORG/NAME, with "
            "letters, digits, '-', '_' and '.'"
        ) from None


def output_files(out: Path) -> list[str]:
    """Every file under ``out``, as sorted repo paths; refuses links, special files and run leftovers.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text("{}"); (d / ".x.resta-lock").touch()
        >>> output_files(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: push ...: .x.resta-lock is left over from an interrupted resta-fast run, ...
    """
    out = Path(out)
    names = []
    for root, dirs, files in os.walk(out):
        for entry in sorted(dirs + files):
            path = Path(root, entry)
            rel = path.relative_to(out).as_posix()
            if _LEFTOVER.match(entry):
                raise RestaError(
                    f"push {out}: {rel} is left over from an interrupted resta-fast run, not part of the output; "
                    "remove it, then push again"
                )
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise RestaError(
                    f"push {out}: {rel} is a symbolic link; resta-fast writes plain files only, so upload a copy "
                    "without it"
                )
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise RestaError(f"push {out}: {rel} is not a plain file; remove it, then push again")
            if stat.S_ISREG(mode):
                names.append(rel)
    if not names:
        raise RestaError(f"push {out}: the directory is empty; give an output directory written by resta-fast")
    return sorted(names)


def check_not_being_written(out: Path) -> None:
    """Refuse an output whose lock a live resta-fast run holds (``patch --overwrite`` replacing it now).

    The lock file is opened read-only and never created: pushing writes nothing beside the output.
    A lock file that nobody holds is a dead run's, and harmless.
    """
    path = lock_path(Path(out))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or not one we can read): nobody is writing through resta-fast
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RestaError(
            f"push {out}: a resta-fast run is writing this output now (lock {path}); wait for it to finish, "
            "then push again"
        ) from None
    except OSError:
        pass  # no flock on this filesystem: the writer's own lock degrades the same way
    finally:
        os.close(fd)


def refusals(out: Path) -> tuple[list[str], bool]:
    """Why a plain push refuses ``out`` (empty: it may go), and whether its recorded sha256s all match.

    Example:
        >>> import tempfile
        >>> refusals(Path(tempfile.mkdtemp()))[0]  # doctest: +ELLIPSIS
        ['verify fails its report check (.../resta_fast.json is missing: this is not a finished resta-fast output)']
    """
    from resta_fast.verify import verify

    reasons = []
    marker = out / VALIDATION_FAILED
    if marker.exists():
        why = marker.read_text(errors="replace").strip().splitlines()
        reasons.append(
            f"it failed its safety validation ({why[0] if why else 'no reason recorded'}) and carries the "
            f"{VALIDATION_FAILED} marker"
        )
    result = verify(out)
    failed = [c for c in result["checks"] if not c["ok"] and not (c["name"] == "validation" and reasons)]
    if failed:
        first = failed[0]["problems"][0] if failed[0]["problems"] else failed[0]["detail"]
        more = sum(len(c["problems"]) for c in failed) - 1
        names = " and ".join(c["name"] for c in failed)
        reasons.append(
            f"verify fails its {names} check{'s' if len(failed) > 1 else ''} ({first}"
            + (f", and {more} more problem(s)" if more > 0 else "")
            + ")"
        )
    sha = next((c for c in result["checks"] if c["name"] == "sha256"), None)
    return reasons, sha is not None and sha["ok"]


def forced_card(card: str, reasons: list[str]) -> str:
    """The model card ``card`` with a note on top saying the upload was forced, and why.

    Example:
        >>> card = forced_card("---\\nlicense: mit\\n---\\n# restored\\n", ["verify fails its sha256 check (x)"])
        >>> print(card.split(" A plain push")[0])
        ---
        license: mit
        ---
        > **Uploaded with `resta-fast push --force`.**
    """
    from huggingface_hub import ModelCard

    note = (
        f"> **Uploaded with `resta-fast push --force`.** A plain push refused it: {'; '.join(reasons)}. Check the "
        f"files before use: this card is not the one `{REPORT_NAME}` records.\n\n"
    )
    if not card.strip():
        return note
    parsed = ModelCard(card, ignore_metadata_errors=True)
    parsed.text = note + parsed.text.lstrip("\n")
    return str(parsed)


# --- helpers ----------------------------------------------------------------------------------


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise RestaError("push needs huggingface_hub, which is not installed: pip install huggingface_hub") from None
    return huggingface_hub


def _contents(out: Path, names: list[str], hashes_ok: bool) -> tuple[dict[str, bytes | str], dict[str, str]]:
    """What each file is uploaded from (its bytes when small, else its path) and the sha256 it must arrive with."""
    try:
        recorded = json.loads((out / REPORT_NAME).read_text()).get("files") if hashes_ok else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    recorded = recorded if isinstance(recorded, dict) else {}
    contents: dict[str, bytes | str] = {}
    expected: dict[str, str] = {}
    for name in names:
        path = out / name
        if path.stat().st_size <= IN_MEMORY_BYTES:
            contents[name] = path.read_bytes()
            expected[name] = hashlib.sha256(contents[name]).hexdigest()
        else:
            contents[name] = str(path)
            # verify just hashed the recorded files; anything else is hashed here
            expected[name] = recorded.get(name) or sha256_file(path)
        if name in recorded and recorded[name] != expected[name]:
            raise RestaError(
                f"push {out}: {name} changed after it was verified, nothing was uploaded; push again once "
                "nothing writes to the output"
            )
    return contents, expected


def _text(content: bytes | str) -> str:
    """A file's text from what it is uploaded from: its bytes, or its path."""
    return (content if isinstance(content, bytes) else Path(content).read_bytes()).decode("utf-8", "replace")


def _check_uploaded(out: Path, ops, expected: dict[str, str]) -> None:
    """Every file sent by path was uploaded with the sha256 it was verified with (else: commit nothing)."""
    for op in ops:
        if isinstance(op.path_or_fileobj, bytes):
            continue  # hashed when read; the bytes sent are those bytes
        if not op.upload_info.is_hashed:  # a large file the Hub takes inline: send the checked bytes
            data = Path(op.path_or_fileobj).read_bytes()
            op.upload_info.sha256 = hashlib.sha256(data).digest()
            op.path_or_fileobj = data
        if op.upload_info.sha256.hex() != expected[op.path_in_repo]:
            raise RestaError(
                f"push {out}: {op.path_in_repo} changed while it was uploading (sha256 "
                f"{op.upload_info.sha256.hex()[:16]}... instead of {expected[op.path_in_repo][:16]}...), nothing "
                "was committed; push again once nothing writes to the output"
            )


def _ensure_branch(api, repo: str, revision: str) -> None:
    """Create ``revision`` from main when the repo has no such branch (as ``hf upload --revision`` does)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        api.repo_info(repo, revision=revision)
    except RevisionNotFoundError:
        api.create_branch(repo, branch=revision, exist_ok=True)


def _description(out: Path, reasons: list[str]) -> str:
    try:
        report = json.loads((out / REPORT_NAME).read_text())
        command = report.get("command") if isinstance(report, dict) else None
    except (OSError, ValueError):
        command = None
    made = f"A `resta-fast {command}` output" if isinstance(command, str) else "A resta-fast output"
    if reasons:
        return f"{made}, uploaded by resta-fast {__version__} with --force: {'; '.join(reasons)}."
    return f"{made}, uploaded by resta-fast {__version__} after `resta-fast verify` passed."


@contextlib.contextmanager
def _progress_bars(on: bool):
    """huggingface_hub's progress bars off for the push when ``on`` is False (its switch is process-wide)."""
    from huggingface_hub import utils

    was_off = utils.are_progress_bars_disabled()
    if not on and not was_off:
        utils.disable_progress_bars()
    try:
        yield
    finally:
        if not on and not was_off:
            utils.enable_progress_bars()


# The HTTP client's "no answer came back" errors (httpx2 and httpx share the names), and huggingface_hub's offline one.
_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ProtocolError", "OfflineModeIsEnabled"}
_HUB_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore", "hf_xet")


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _raised_by_hub(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside huggingface_hub or its HTTP client (not by a bug of ours)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(f"{os.sep}{m}{os.sep}" in frames[-1].filename for m in _HUB_MODULES)


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip().rstrip(".")
    return type(exc).__name__


def _hub_error(exc: BaseException, out: Path, where: str, step: str, endpoint: str) -> RestaError | None:
    """The one line for a push that failed at ``step`` (create, branch, card, upload, commit); None: not the Hub's."""
    chain = list(_chain(exc))
    http = next((e for e in chain if isinstance(getattr(getattr(e, "response", None), "status_code", None), int)), None)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    done = "nothing was committed"
    if "Invalid metadata in README.md" in str(exc):
        problems = "; ".join(ln.strip("- ").strip() for ln in str(exc).splitlines()[1:] if ln.strip())
        return OptionError(
            "force",
            "push {where}: the Hub rejects the model card's metadata ({problems}), {done}; fix the front matter "
            "of {card}, then push with {force} (the card no longer matches {report})",
            where=where,
            problems=problems or _first_line(exc),
            done=done,
            card=out / CARD_NAME,
            report=REPORT_NAME,
        )
    if http is None:
        if names & _NETWORK_ERRORS or any(isinstance(e, ConnectionError) for e in chain):
            cause = next(
                e
                for e in chain
                if {c.__name__ for c in type(e).__mro__} & _NETWORK_ERRORS or isinstance(e, ConnectionError)
            )
            return RestaError(
                f"push {where}: cannot reach the Hugging Face Hub at {endpoint} ({_first_line(cause)}), {done}; "
                "check the network (and HF_ENDPOINT), then push again"
            )
        if isinstance(exc, OSError) and exc.filename and Path(exc.filename).is_relative_to(out):
            return RestaError(
                f"push {where}: {exc.filename} changed while pushing ({exc.strerror}), {done}; push again"
            )
        if any(_raised_by_hub(e) for e in chain):
            return RestaError(
                f"push {where}: the {step} step failed ({type(exc).__name__}: {_first_line(exc)}), {done}"
            )
        return None
    code = http.response.status_code
    server = " ".join(str(getattr(http, "server_message", None) or _first_line(http)).split())
    if code == 401:
        return RestaError(
            f"push {where}: the Hub rejected the token (401 Unauthorized), {done}; run `hf auth login` or set "
            "HF_TOKEN to a token with write access"
        )
    if code == 403 and step == "create":
        return RestaError(
            f"push {where}: the repo does not exist and this token may not create it (403 Forbidden: {server}), "
            f"{done}; create it on the Hub first, or use a token with write access to its namespace"
        )
    if code == 403:
        return OptionError(
            "create_pr",
            "push {where}: this token may not write to the repo (403 Forbidden: {server}), {done}; use a token "
            "with write access, or pass {create_pr} to propose the upload",
            where=where,
            server=server,
            done=done,
        )
    if "RevisionNotFoundError" in names:
        return RestaError(f"push {where}: the repo has no such branch, {done}; name an existing branch")
    if "RepositoryNotFoundError" in names:
        return RestaError(
            f"push {where}: the Hub has no such repo this token can write to, {done}; check the id and the token "
            "(hf auth whoami)"
        )
    return RestaError(f"push {where}: the Hub refused the {step} step ({code}: {server}), {done}; push again later")
