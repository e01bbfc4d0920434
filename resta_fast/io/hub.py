"""Hugging Face Hub ids as inputs: ``ORG/NAME[@REVISION]`` and ``hf://ORG/NAME[@REVISION]``.

The rule (``HUB_RULE``, also in every input flag's help): an existing local
path wins; otherwise a string shaped like a repo id is a Hub id, and anything
starting with ``hf://`` always is. A Hub id resolves, through
``huggingface_hub``, to a snapshot directory of its cache (``HF_HUB_CACHE``, or
``HF_HOME``/hub, read when resolving):

- the cache first: a snapshot that already holds every file the job reads is
  used without any network access, online or not;
- otherwise, unless ``HF_HUB_OFFLINE=1``, only those files are downloaded
  (config, tokenizer, chat template and generation files, the index, then
  exactly the weight shards it names, or the adapter's files), progress on stderr;
- offline and not cached, a missing or gated repo, an unknown revision: one
  ``RestaError`` line naming the id and how to make it available (exit 2 in the CLI).

``huggingface_hub`` is imported only when a Hub id is resolved: local paths
never import it.

Example:
    >>> resolve_input("./no-such-dir", "finetuned").repo_id is None
    True
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Light on purpose: the CLI's --help imports this module for HUB_RULE (numpy and the
# checkpoint reader are imported only when a Hub id is resolved).
HUB_RULE = (
    "an existing local path wins; otherwise ORG/NAME[@REV] or hf://ORG/NAME[@REV] is a Hugging Face "
    "Hub id (the cache first; HF_HUB_OFFLINE=1 never downloads)"
)
SCHEME = "hf://"
DEFAULT_REVISION = "main"
INDEX_NAME = "model.safetensors.index.json"  # = io.checkpoint's
SINGLE_NAME = "model.safetensors"
# = io.torch_bin's: a repo with only pickle weights is read by that reader (never unpickled)
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
ADAPTER_BIN = "adapter_model.bin"
KINDS = ("model", "adapter", "any")
# huggingface_hub's repo-id rule: each part starts and ends with a word character, at most 96 long.
_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")
_REVISION = re.compile(r"[^\s@/][^\s@]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ResolvedInput:
    """An input argument resolved to a local path; ``repo_id`` is set when it came from the Hub.

    Args:
        path: the local file or directory (a cache snapshot for a Hub id).
        repo_id, revision: the Hub id as named (revision ``main`` when none was named).
        commit: the commit sha of the snapshot used.
        spec: the argument as given (``org/name@v3``).

    Example:
        >>> ResolvedInput(Path("ft")).is_hub
        False
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    spec: str = ""

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def provenance(self) -> dict:
        """What ``resta_fast.json`` records of a Hub input (beside its path and fingerprints)."""
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}

    def __fspath__(self) -> str:
        return str(self.path)


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``text`` is shaped like a Hub id, else None.

    Example:
        >>> parse_hub_id("my-org/customer-ft@v3"), parse_hub_id("hf://gpt2/x"), parse_hub_id("./ft")
        (('my-org/customer-ft', 'v3'), ('gpt2/x', None), None)
    """
    if not isinstance(text, str):
        return None
    body = text[len(SCHEME) :] if text.startswith(SCHEME) else text
    repo, sep, revision = body.partition("@")
    parts = repo.split("/")
    if (
        len(parts) != 2
        or not all(_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts)
        or parts[1].endswith((".safetensors", ".json", ".git"))
    ):
        return None
    if sep and not _REVISION.fullmatch(revision):
        return None
    return repo, revision or None


def cache_dir() -> Path:
    """The Hub cache ``huggingface_hub`` uses, read from the environment now (not at its import)."""
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        return Path(os.path.expandvars(os.path.expanduser(hub_cache)))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_input(arg, role: str = "model", *, kind: str = "model", local: bool = True) -> ResolvedInput:
    """Resolve one model or adapter argument to a local path (``HUB_RULE``).

    Args:
        arg: a local path (``str`` or ``os.PathLike``; a ``Path`` is always local),
            ``ORG/NAME[@REVISION]`` or ``hf://ORG/NAME[@REVISION]``; a
            ``ResolvedInput`` is returned as it is.
        role: what the user called it (``finetuned``, ``aligned`` ...), for errors.
        kind: ``model`` (full weights), ``adapter`` (a PEFT adapter) or ``any``
            (either: a fine-tune); decides which files a snapshot must hold.
        local: look for a local path by that name first (False: the caller
            did, e.g. relative to a batch manifest's folder).
    Returns:
        A ResolvedInput; ``repo_id`` is None for a local path (which may not
        exist: opening it says so, as before).
    Raises:
        RestaError: one line naming the id and how to make it available.

    Example:
        >>> resolve_input("meta-llama/Llama-2-7b-chat-hf", "aligned").commit  # doctest: +SKIP
        'f5db02db724555f92da89c216ac04704f23d4590'
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(arg, ResolvedInput):
        return arg
    if isinstance(arg, os.PathLike):
        return ResolvedInput(Path(arg), spec=os.fspath(arg))
    text = str(arg)
    explicit = text.startswith(SCHEME)
    if not explicit and local and os.path.lexists(text):
        return ResolvedInput(Path(text), spec=text)
    parsed = parse_hub_id(text)
    if parsed is None:
        if explicit:
            raise RestaError(f"{role} {text}: not a Hub id; expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
        return ResolvedInput(Path(text), spec=text)
    repo_id, revision = parsed
    return _resolve_hub(text, role, kind, repo_id, revision or DEFAULT_REVISION)


class Resolver:
    """``resolve_input`` with a memory: each distinct input is resolved once per run (``resolve.resolve_all``,
    a batch manifest). A Hub id is one input however it is spelled (``org/x``, ``hf://org/x``, ``org/x@main``).

    Example:
        >>> resolve = Resolver()
        >>> resolve("ft", "finetuned") is resolve("ft", "finetuned")
        True
    """

    def __init__(self):
        self._done: dict[tuple, ResolvedInput | RestaError] = {}

    def __call__(self, arg, role: str = "model", *, kind: str = "model", local: bool = True) -> ResolvedInput:
        if isinstance(arg, ResolvedInput):
            return arg
        path_like = isinstance(arg, os.PathLike)
        text = os.fspath(arg) if path_like else str(arg)
        parsed = None if path_like else parse_hub_id(text)
        if parsed is not None and (text.startswith(SCHEME) or not (local and os.path.lexists(text))):
            # A Hub id, however it is spelled (org/x, hf://org/x, org/x@main) and whoever looked for a local
            # path first: one resolution per repo, revision and kind.
            key: tuple = ("hub", parsed[0], parsed[1] or DEFAULT_REVISION, kind)
        else:
            key = (path_like, text, kind, local)
        if key not in self._done:
            try:
                self._done[key] = resolve_input(arg, role, kind=kind, local=local)
            except RestaError as exc:
                self._done[key] = exc
        got = self._done[key]
        if isinstance(got, RestaError):
            raise got
        return got


# --- the Hub side ---------------------------------------------------------------------------


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise RestaError(
            "Hub ids need huggingface_hub, which is not installed: pip install huggingface_hub "
            "(or pass a local directory)"
        ) from None
    return huggingface_hub


def metadata_files() -> list[str]:
    """What a job reads besides the weights: small files, fetched first (the index names the shards)."""
    from resta_fast.io.checkpoint import SIDE_FILE_PATTERNS

    return [*SIDE_FILE_PATTERNS, INDEX_NAME, BIN_INDEX_NAME, ADAPTER_CONFIG]


def _snapshot(
    repo_id: str, revision: str, *, local_only: bool, allow: list[str], ignore: list[str] | None = None
) -> Path:
    """``huggingface_hub.snapshot_download`` into ``cache_dir()`` (tests replace this one call)."""
    return Path(
        _hub().snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache_dir()),
            local_files_only=local_only,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    )


def _error_name(exc: BaseException) -> str:
    """The huggingface_hub error class ``exc`` is, by name (stable across its versions and modules)."""
    names = [c.__name__ for c in type(exc).__mro__]
    for name in (
        "GatedRepoError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "OfflineModeIsEnabled",
        "LocalEntryNotFoundError",
        "HfHubHTTPError",
    ):
        if name in names:
            return name
    return type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _shards(index: Path) -> list[str] | None:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if shards and all(isinstance(s, str) for s in shards):
            return shards
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        pass  # a bad index is the checkpoint reader's error to report, with its file name
    return None


def _pickle_weights(kind: str) -> list[str]:
    """What a repo holding no safetensors weights is read from instead (``io.torch_bin``)."""
    return (
        [ADAPTER_BIN] if kind == "adapter" else [BIN_SINGLE_NAME, ADAPTER_BIN] if kind == "any" else [BIN_SINGLE_NAME]
    )


def _weights_needed(folder: Path) -> tuple[list[str], list[str] | None]:
    """(allow, ignore) patterns of the weight files a snapshot with these metadata files needs
    (safetensors first: a ``.bin`` index is followed only when the repo has no safetensors one)."""
    index = folder / INDEX_NAME
    if not index.is_file() and (folder / BIN_INDEX_NAME).is_file():
        return _shards(folder / BIN_INDEX_NAME) or [BIN_INDEX_NAME], None
    if index.is_file():
        return _shards(index) or [INDEX_NAME], None
    if (folder / ADAPTER_CONFIG).is_file():
        return [ADAPTER_WEIGHTS], None
    return ["*.safetensors"], ["*/*"]  # a single weight file at the top (Checkpoint's rule)


def _missing(folder: Path, kind: str) -> str:
    """What a snapshot lacks for a job reading it as ``kind`` ('' when complete)."""
    if not folder.is_dir():
        return "everything"
    if kind == "adapter" or (kind == "any" and (folder / ADAPTER_CONFIG).is_file()):
        if not (folder / ADAPTER_CONFIG).is_file():
            return ADAPTER_CONFIG
        return "" if (folder / ADAPTER_WEIGHTS).is_file() or (folder / ADAPTER_BIN).is_file() else ADAPTER_WEIGHTS
    if (folder / INDEX_NAME).is_file() or (folder / BIN_INDEX_NAME).is_file():
        allow, _ = _weights_needed(folder)
        absent = [s for s in allow if s not in (INDEX_NAME, BIN_INDEX_NAME) and not (folder / s).is_file()]
        return ", ".join(absent[:3]) + (f" and {len(absent) - 3} more shard(s)" if len(absent) > 3 else "")
    if (folder / SINGLE_NAME).is_file() or any(p.is_file() for p in folder.glob("*.safetensors")):
        return ""
    if (folder / BIN_SINGLE_NAME).is_file():
        return ""
    return f"{SINGLE_NAME} (or {INDEX_NAME} and its shards)"


def _download_hint(repo_id: str, revision: str) -> str:
    rev = "" if revision == DEFAULT_REVISION else f" --revision {revision}"
    return f"hf download {repo_id}{rev}"


def _resolve_hub(text: str, role: str, kind: str, repo_id: str, revision: str) -> ResolvedInput:
    label = repo_id if revision == DEFAULT_REVISION else f"{repo_id}@{revision}"
    where = f"{role} {text}"
    cache = cache_dir()
    hint = _download_hint(repo_id, revision)
    folder, missing = None, "everything"
    try:
        folder = _snapshot(repo_id, revision, local_only=True, allow=metadata_files())
        missing = _missing(folder, kind)
    except OSError as exc:  # LocalEntryNotFoundError (a FileNotFoundError) and friends: not cached
        if _error_name(exc) not in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") and not isinstance(
            exc, FileNotFoundError
        ):
            raise RestaError(f"{where}: cannot read the Hugging Face cache {cache} ({_first_line(exc)})") from None
    if folder is not None and not missing:
        return ResolvedInput(folder, repo_id, revision, folder.name, text)
    if offline():
        if folder is None:
            raise RestaError(
                f"{where}: no such local path, and the Hub model {label} is not in the Hugging Face "
                f"cache ({cache}) while HF_HUB_OFFLINE=1; download it once online ({hint}) or "
                "pass a local directory"
            )
        raise RestaError(
            f"{where}: the cached snapshot of {label} (commit {folder.name[:12]}) lacks {missing}, "
            f"and HF_HUB_OFFLINE=1 forbids downloading it; complete it once online ({hint}) or "
            "pass a local directory"
        )
    print(f"resta-fast: {role}: fetching {label} from the Hugging Face Hub into {cache}", file=sys.stderr)
    try:
        folder = _snapshot(repo_id, revision, local_only=False, allow=metadata_files())
        # The same commit for the weights, even if the branch moves meanwhile.
        commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
        allow, ignore = _weights_needed(folder)
        folder = _snapshot(repo_id, commit, local_only=False, allow=allow, ignore=ignore)
        if _missing(folder, kind) and not any(folder.glob("*.safetensors")):
            # No safetensors weights in the repo: its pickle weights, read without unpickling (io.torch_bin).
            folder = _snapshot(repo_id, commit, local_only=False, allow=_pickle_weights(kind))
    except (OSError, ValueError) as exc:
        raise RestaError(_hub_error(where, exc, repo_id, revision, label, cache, hint)) from None
    missing = _missing(folder, kind)
    if missing:
        what = "a PEFT adapter" if kind == "adapter" else "a model" if kind == "model" else "a model or adapter"
        raise RestaError(
            f"{where}: the Hub repo {label} (commit {folder.name[:12]}) has no {missing}, so it is "
            f"not {what} resta_fast can read (it needs safetensors or torch .bin weights); check the id"
        )
    return ResolvedInput(folder, repo_id, revision, folder.name, text)


def _hub_error(where: str, exc: BaseException, repo_id: str, revision: str, label: str, cache: Path, hint: str) -> str:
    """The one line for a failed Hub look-up or download."""
    name = _error_name(exc)
    page = f"https://huggingface.co/{repo_id}"
    if name == "GatedRepoError":
        return (
            f"{where}: the Hub model {repo_id} is gated; request access on {page}, log in (hf auth login "
            "or HF_TOKEN), then retry, or pass a local directory"
        )
    if name == "RepositoryNotFoundError":
        return (
            f"{where}: no such local path, and the Hub has no model {repo_id} you can read (it does not "
            "exist, or it is private: log in with hf auth login or HF_TOKEN); check the id or pass a local "
            "directory"
        )
    if name == "RevisionNotFoundError":
        return (
            f"{where}: the Hub model {repo_id} has no revision {revision!r}; name an existing branch, tag "
            f"or commit ({page}/tree/main), or pass a local directory"
        )
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (
            f"{where}: cannot reach the Hugging Face Hub ({_first_line(exc)}), and {label} is not in the "
            f"cache ({cache}); retry online ({hint}) or pass a local directory"
        )
    return (
        f"{where}: fetching {label} from the Hugging Face Hub failed ({name}: {_first_line(exc)}); retry, "
        "or pass a local directory"
    )
