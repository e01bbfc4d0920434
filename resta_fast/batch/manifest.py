"""Batch manifests: many patch jobs in one YAML or JSON file.

Keys mirror the ``patch`` flags. Top-level keys are defaults, each entry of
``jobs`` is one fine-tune with its ``out`` and any overrides; relative paths
resolve against the manifest's folder, and any input may be a Hugging Face Hub
id (``ORG/NAME[@REV]``, ``hf://ORG/NAME[@REV]``; a local path relative to the
manifest's folder wins), resolved once per distinct id when the manifest is
loaded (``io.hub``: the cache first)::

    aligned: models/llama-2-7b-chat
    unaligned: models/llama-2-7b-chat-shadow
    beta: 0.5
    group_size: 8            # jobs fused into one pass (one Ray task / Slurm element)
    jobs:
      - {finetuned: ft/math, out: restored/math}
      - {finetuned: ft/code, out: restored/code, beta: 0.7, dare: 0.3, seed: 1}

Jobs that share the aligned/unaligned pair (or vector), device and backend are
grouped, in manifest order, ``group_size`` at a time; a group is the unit of
fused execution, of a Ray task and of a Slurm array element.

``load_manifest`` reads the manifest and checks everything that needs no
checkpoint opened — key names and types, parameters (``options.PatchOptions``),
input roles, that inputs exist, duplicate or nested outputs, outputs inside
inputs — and raises one error listing every problem. It is data only: the deep
check (every job's inputs opened and its plan built, existing outputs belong to
their job) is ``batch.local.check_manifest``, a step of the batch command whose
prepared jobs then run without being opened again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from resta_fast.errors import OptionError, RestaError
from resta_fast.io.hub import SCHEME, ResolvedInput, Resolver, parse_hub_id
from resta_fast.options import PATCH, PatchOptions
from resta_fast.resolve import resolve
from resta_fast.roles import ROLE_KINDS, resolve_roles
from resta_fast.spec import is_real, unknown_key

PATH_KEYS = ("aligned", "unaligned", "vector", "dare_base", "base")
JOB_KEYS = ("finetuned", "out", "name")


# The options a job sets (or the top level sets for every job), and the run settings at the top:
# both read from the one spec of patch's options (options.PATCH) when a manifest is read.
def job_options() -> tuple[str, ...]:
    return PATCH.manifest_keys("job")


def patch_keys() -> tuple[str, ...]:
    return PATH_KEYS + job_options()


def top_keys() -> tuple[str, ...]:
    return ("jobs", "group_size", "num_cpus", "num_gpus", *PATCH.manifest_keys("top"), "fsync", "slurm")


# Eight fine-tunes per pass already cut the shared reads to a quarter of a
# model per job; larger groups mostly cost parallelism across Ray/Slurm workers.
DEFAULT_GROUP_SIZE = 8


class ManifestError(RestaError):
    """The manifest cannot run as written; the message lists every problem."""


@dataclass(init=False)
class JobSpec:
    """One job: ``patch`` arguments with absolute paths.

    ``settings`` holds the job's options (the ``options.PATCH`` spec's job keys: beta,
    dare, seed ...), read as attributes too (``job.beta``); unset ones are the spec's
    defaults. An input named by a Hub id holds its cache snapshot's path, and ``hub``
    maps its key to the ``io.hub.ResolvedInput`` (repo id, revision, commit).

    Example:
        >>> JobSpec(0, "a", Path("/ft"), Path("/out"), vector=Path("/v"), beta=0.5).beta
        0.5
    """

    index: int
    name: str
    finetuned: Path
    out: Path
    aligned: Path | None
    unaligned: Path | None
    vector: Path | None
    dare_base: Path | None
    base: Path | None
    settings: dict
    hub: dict[str, ResolvedInput]

    def __init__(self, index, name, finetuned, out, *, hub=None, **given):
        self.index, self.name, self.finetuned, self.out = index, name, finetuned, out
        for key in PATH_KEYS:
            setattr(self, key, given.pop(key, None))
        unknown = [k for k in given if k not in job_options()]
        if unknown:
            raise TypeError(f"JobSpec got an unexpected keyword argument {unknown[0]!r}")
        self.settings = {k: given.get(k, PATCH.get(k).default) for k in job_options()}
        self.hub = dict(hub or {})

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(name)

    @property
    def label(self) -> str:
        return f"jobs[{self.index}] ({self.name})"

    def input_paths(self) -> list[Path]:
        return [p for p in (self.finetuned, *(getattr(self, k) for k in PATH_KEYS)) if p is not None]

    def input(self, key: str):
        """The input ``key`` as ``api.prepare`` takes it: its ResolvedInput when
        it came from the Hub, else its path as a string (None where unset)."""
        if key in self.hub:
            return self.hub[key]
        value = getattr(self, key)
        return None if value is None else str(value)

    def patch_kwargs(self) -> dict:
        """Keyword arguments of ``api.patch`` that run this job alone.

        Example:
            >>> api.patch(job.finetuned, job.out, **job.patch_kwargs())  # doctest: +SKIP
        """
        return {**self.input_kwargs(), **self.settings}

    def options(self, **tuning) -> PatchOptions:
        """The job's PatchOptions (``tuning``: threads, chunk_elems ...)."""
        return PatchOptions(**self.settings, **tuning)

    def input_kwargs(self) -> dict:
        """The inputs of ``api.prepare`` but the fine-tune (``input``: strings, Hub inputs resolved)."""
        return {k: self.input(k) for k in PATH_KEYS}

    def group_key(self) -> tuple:
        return (str(self.aligned), str(self.unaligned), str(self.vector), self.device, self.backend)


@dataclass
class Group:
    """Jobs run together: one fused pass, one Ray task, one Slurm array element."""

    index: int
    jobs: list[JobSpec]

    @property
    def device(self) -> str:
        return self.jobs[0].device


@dataclass
class Manifest:
    path: Path
    jobs: list[JobSpec]
    groups: list[Group]
    group_size: int = DEFAULT_GROUP_SIZE
    num_cpus: float | None = None
    num_gpus: float | None = None
    threads: int | None = None
    fsync: bool = True
    slurm: dict[str, str] = field(default_factory=dict)
    out_bytes: dict[int, int] = field(default_factory=dict)  # job index -> weight bytes (deep check)

    def select(self, groups: list[int] | None) -> list[Group]:
        """The groups to run (all when ``groups`` is None)."""
        if groups is None:
            return list(self.groups)
        bad = [g for g in groups if not 0 <= g < len(self.groups)]
        if bad:
            raise RestaError(
                f"--group {bad[0]}: {self.path} has {len(self.groups)} group(s), numbered 0..{len(self.groups) - 1}"
            )
        return [self.groups[g] for g in groups]


def load_manifest(path, *, group_size: int | None = None, resolver: Resolver | None = None) -> Manifest:
    """Read, normalise and statically check a manifest; raise ManifestError listing every problem.

    Opens no checkpoint: ``batch.local.check_manifest`` is the deep check. Hub
    ids are resolved here (each distinct one once: the cache first, else a
    download of the files a job reads); one that cannot be is a problem listed.

    Args:
        path: YAML (``.yaml``/``.yml``) or JSON manifest.
        group_size: overrides the manifest's ``group_size``.
        resolver: an ``io.hub.Resolver`` to share (default: a new one).
    Returns:
        The Manifest.

    Example:
        >>> m = load_manifest("batch.yaml")  # doctest: +SKIP
        >>> [len(g.jobs) for g in m.groups]  # doctest: +SKIP
    """
    path = Path(path)
    return manifest_from_mapping(_read(path), path, group_size=group_size, resolver=resolver)


def manifest_from_mapping(
    raw, source, *, root: Path | None = None, group_size: int | None = None, resolver: Resolver | None = None
) -> Manifest:
    """A manifest built in memory (``load_manifest`` reads one from a file and calls this), with the
    same checks and the same "every problem listed" error.

    Args:
        raw: the mapping a manifest file holds (defaults at the top, ``jobs``).
        source: what errors and the summary call it (the file's path).
        root: the folder relative paths are taken from (default: ``source``'s folder).

    Example:
        >>> manifest_from_mapping({"jobs": []}, "in memory")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        resta_fast.batch.manifest.ManifestError: manifest in memory: 1 problem(s); nothing was written: ...
    """
    path = Path(source)
    problems: list[str] = []
    manifest = _parse(raw, path, root, problems, group_size, resolver or Resolver())
    if manifest is not None:
        _check_static(manifest, problems)
    if problems:
        raise problems_error(path, problems)
    return manifest


def problems_error(path: Path, problems: list[str]) -> ManifestError:
    """One ManifestError listing ``problems`` (the first 50) of the manifest at ``path``."""
    shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
    return ManifestError(
        f"manifest {path}: {len(problems)} problem(s); nothing was written:\n  - " + "\n  - ".join(shown)
    )


def _read(path: Path):
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"manifest {path}: cannot read it ({exc.strerror})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"manifest {path}: not valid JSON ({exc})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {path}: not valid YAML ({exc})") from None


def _parse(
    raw, path: Path, root: Path | None, problems: list[str], group_size: int | None, resolver: Resolver
) -> Manifest | None:
    if not isinstance(raw, dict):
        raise ManifestError(
            f"manifest {path}: expected a mapping with a 'jobs' list at the top, got {type(raw).__name__}"
        )
    root = root if root is not None else path.resolve().parent
    job_level, top_level = patch_keys(), top_keys()
    defaults: dict = {}
    for key, value in raw.items():
        if key in job_level:
            defaults[key] = value
        elif key not in top_level:
            extra = " (it is set per job)" if key in JOB_KEYS else ""
            problems.append(unknown_key(key, job_level + top_level, "top level") + extra)
    jobs_raw = raw.get("jobs")
    if not isinstance(jobs_raw, list) or not jobs_raw:
        problems.append("top level: 'jobs' must be a non-empty list of {finetuned, out, ...}")
        return None
    opts = _parse_options(raw, problems, group_size)
    jobs, names = [], set()
    for i, entry in enumerate(jobs_raw):
        where = f"jobs[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with finetuned and out, got {type(entry).__name__}")
            continue
        for key in entry:
            if key not in job_level + JOB_KEYS:
                problems.append(
                    unknown_key(key, job_level + JOB_KEYS, where)
                    + (" (it is a top-level setting)" if key in top_level else "")
                )
        merged = {**defaults, **{k: v for k, v in entry.items() if k in job_level + JOB_KEYS}}
        job = _parse_job(i, merged, root, problems, resolver)
        if job is None:
            continue
        if job.name in names:
            problems.append(f"{where}: name {job.name!r} is used by another job; names must be unique")
        names.add(job.name)
        jobs.append(job)
    if len(jobs) != len(jobs_raw):
        return None
    return Manifest(path=path, jobs=jobs, groups=make_groups(jobs, opts["group_size"]), **opts)


def _parse_options(raw: dict, problems: list[str], group_size: int | None) -> dict:
    opts: dict = {"group_size": group_size if group_size is not None else raw.get("group_size", DEFAULT_GROUP_SIZE)}
    if not _is_int(opts["group_size"]) or opts["group_size"] < 1:
        problems.append(f"group_size must be an integer >= 1, got {opts['group_size']!r}")
        opts["group_size"] = DEFAULT_GROUP_SIZE
    for key, low in (("num_cpus", 0.0), ("num_gpus", 0.0)):
        value = raw.get(key)
        if value is not None and (not _is_number(value) or value < low or (key == "num_cpus" and value == 0)):
            problems.append(f"{key} must be a number {'> 0' if key == 'num_cpus' else '>= 0'}, got {value!r}")
            value = None
        opts[key] = value
    for key in PATCH.manifest_keys("top"):  # run settings with a patch option's check (threads)
        try:
            opts[key] = PATCH.get(key).run_check(raw.get(key, PATCH.get(key).default))
        except OptionError as exc:
            problems.append(str(exc))
            opts[key] = PATCH.get(key).default
    fsync = raw.get("fsync", True)
    if not isinstance(fsync, bool):
        problems.append(f"fsync must be true or false, got {fsync!r}")
        fsync = True
    opts["fsync"] = fsync
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float)) and "\n" not in f"{k}{v}" for k, v in slurm.items()
    ):
        problems.append(
            "slurm must map sbatch option names to single-line values, e.g. {partition: gpu, time: '04:00:00'}"
        )
        slurm = {}
    opts["slurm"] = {k: str(v) for k, v in slurm.items()}
    return opts


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_job(i: int, d: dict, root: Path, problems: list[str], resolver: Resolver) -> JobSpec | None:
    where = f"jobs[{i}]"
    start = len(problems)
    hub: dict[str, ResolvedInput] = {}

    def path(key, required=False):
        value = d.get(key)
        if value is None:
            if required:
                problems.append(f"{where}: '{key}' is required")
            return None
        if not isinstance(value, str) or not value or "\x00" in value:
            problems.append(f"{where}: {key} must be a path string, got {value!r}")
            return None
        # abspath, not resolve: the path is recorded in the output's provenance
        # exactly as `patch` would record it when given this path.
        local = Path(os.path.abspath(root / os.path.expanduser(value)))
        if key == "out" or not (value.startswith(SCHEME) or (parse_hub_id(value) and not os.path.lexists(local))):
            return local
        try:  # a Hub id: no local path by that name next to the manifest (the resolve step, each id once)
            found = resolve(value, key, accepts=ROLE_KINDS[key], resolver=resolver, local=False)
        except RestaError as exc:
            problems.append(f"{where}: {exc}")
            return None
        if found.is_hub:
            hub[key] = found.hub
        return Path(found.path)

    finetuned, out = path("finetuned", True), path("out", True)
    paths = {k: path(k) for k in PATH_KEYS}
    given = {k: d[k] for k in job_options() if k in d}
    errors = PATCH.problems(given)
    problems += [f"{where}: {exc}" for exc in errors]
    name = d.get("name")
    if name is None and out is not None:
        name = out.name
    if not isinstance(name, str) or not name or any(c in name for c in "\n\r\x00"):
        problems.append(f"{where}: name must be a non-empty single-line string, got {name!r}")
    if len(problems) > start:
        return None
    return JobSpec(i, name, finetuned, out, **paths, **_as_manifest_gave(given), hub=hub)


def _as_manifest_gave(given: dict) -> dict:
    """A job's settings as the manifest gave them, as a flag would give them: numbers in the
    option's kind (``beta: 1`` is 1.0, as ``--beta 1``), lists as tuples of strings."""
    out = {}
    for key, value in given.items():
        option = PATCH.get(key)
        if option.repeat:
            value = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
            value = (value,) if isinstance(value, str) else tuple(value or ())
        elif is_real(value) and option.kind in (int, float):
            value = option.kind(value)
        out[key] = value
    return out


def make_groups(jobs: list[JobSpec], group_size: int) -> list[Group]:
    """Jobs sharing the shared inputs, device and backend, in manifest order,
    ``group_size`` at a time. Deterministic: a Slurm element's ``--group K``
    always names the same jobs, finished or not."""
    by_key: dict[tuple, list[list[JobSpec]]] = {}
    order: list[list[JobSpec]] = []
    for job in jobs:
        chunks = by_key.setdefault(job.group_key(), [])
        if not chunks or len(chunks[-1]) >= group_size:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(job)
    return [Group(i, g) for i, g in enumerate(order)]


def _check_static(manifest: Manifest, problems: list[str]) -> None:
    """Checks that need no checkpoint opened: paths, roles, outputs."""
    from resta_fast.io.writer import check_output_location

    outs: dict[str, JobSpec] = {}
    inputs = [(job, p) for job in manifest.jobs for p in job.input_paths()]
    for job in manifest.jobs:
        where = job.label
        for key in ("finetuned",) + PATH_KEYS:
            p = getattr(job, key)
            if p is not None and not p.exists():
                problems.append(f"{where}: {key} {p} does not exist")
        try:
            resolve_roles(job.input("finetuned"), **job.input_kwargs(), dare=job.dare is not None)
        except OptionError as exc:
            problems.append(f"{where}: {exc}")
        real = os.path.realpath(job.out)
        if real in outs:
            problems.append(f"{where}: out {job.out} is also the out of {outs[real].label}")
        outs[real] = job
        # overwrite=True: an existing out is judged later (finished, corrupt, foreign).
        try:
            check_output_location(job.out, [], overwrite=True)
        except RestaError as exc:
            problems.append(f"{where}: {exc}")
        out_real = Path(real)
        for other, p in inputs:
            in_real = Path(os.path.realpath(p))
            if out_real == in_real or out_real.is_relative_to(in_real) or in_real.is_relative_to(out_real):
                whose = "its own" if other is job else f"{other.label}'s"
                problems.append(
                    f"{where}: out {job.out} overlaps {whose} input {p}; outputs must be "
                    "outside every input (inputs are never modified)"
                )
    for a, job_a in outs.items():
        for b, job_b in outs.items():
            if a != b and Path(b).is_relative_to(Path(a)):
                problems.append(f"{job_b.label}: out {job_b.out} is inside {job_a.label}'s out {job_a.out}")
