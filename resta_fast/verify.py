"""`resta-fast verify OUT`: prove an output is what its resta_fast.json says it is.

Without inputs it re-hashes every file recorded in ``resta_fast.json`` and
re-validates every safetensors header with our reader (metadata format "pt",
provenance equal to the report's, tensors laid out as the recorded plan says).
With ``--against`` it also opens the inputs, checks their fingerprints, rebuilds
the plan from the recorded parameters, and recomputes a seeded random sample of
output elements, comparing them bit for bit: with the C++ kernel on numpy gathers
(no torch) where it is built, else with the torch reference arithmetic.

Example:
    $ resta-fast verify restored/ --against ft/ chat/ shadow/ --samples 10000
    ok    sha256: 4 files match resta_fast.json
    ...
    PASS
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from resta_fast import rng
from resta_fast.errors import CheckpointError, RestaError
from resta_fast.io.checkpoint import INDEX_NAME, Checkpoint
from resta_fast.io.digest import sha256_file
from resta_fast.io.hub import resolve_input
from resta_fast.io.reader import DTYPES, KERNEL_DTYPES, NUMPY_STORAGE
from resta_fast.options import ROLE_KINDS, PatchOptions, resolve_roles
from resta_fast.report import REPORT_NAME

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

MAX_LISTED = 10  # problems printed per check; --json has them all
PLAN_FIELDS = ("action", "shape", "in_dtype", "out_dtype", "beta", "patched_elems", "seed_name")


@dataclass
class Check:
    """One line of the verdict: a named check, its summary, and what failed."""

    name: str
    ok: bool = True
    detail: str = ""
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and "\x00" not in name


def check_hashes(out: Path, report: dict) -> Check:
    """Every recorded file exists and has its recorded sha256; no unrecorded weights."""
    c = Check("sha256")
    files = report.get("files")
    if not isinstance(files, dict) or not files:
        c.fail(f"{REPORT_NAME} records no files")
        return c
    present = {}
    for name, digest in sorted(files.items()):
        if not _plain_name(name):
            c.fail(f"{name!r}: not a plain file name; {REPORT_NAME} was tampered with")
        elif not (out / name).is_file():
            c.fail(f"{name}: recorded but missing")
        else:
            present[name] = digest
    # hashlib releases the GIL on large updates: shards hash in parallel.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        found = dict(zip(present, pool.map(lambda n: sha256_file(out / n), present), strict=True))
    for name, digest in present.items():
        if found[name] != digest:
            c.fail(f"{name}: sha256 {found[name][:16]}... but {REPORT_NAME} records {str(digest)[:16]}...")
    extra = sorted(p.name for p in out.iterdir()
                   if p.name != REPORT_NAME and p.name not in files
                   and (p.name.endswith(".safetensors") or p.name == INDEX_NAME))
    for name in extra:
        c.fail(f"{name}: weight file not recorded in {REPORT_NAME}; loaders would read it")
    c.detail = f"{len(files)} files match {REPORT_NAME}" if c.ok else f"{len(c.problems)} problem(s)"
    return c


def _recorded_plan(report: dict) -> dict[str, list[dict]]:
    plan = report.get("plan") or {}
    return {f["name"]: f["tensors"] for f in plan.get("files", [])}


def check_headers(out: Path, report: dict) -> tuple[Check, Checkpoint | None]:
    """Open the output with our reader and compare it with the recorded plan."""
    c = Check("headers")
    try:
        ckpt = Checkpoint(out, role="output")
    except CheckpointError as exc:
        c.fail(str(exc))
        return c, None
    recorded = _recorded_plan(report)
    provenance_keys = ("tool", "version", "command", "params", "inputs")
    want_prov = {k: report.get(k) for k in provenance_keys}
    if sorted(ckpt.files) != sorted(recorded):
        c.fail(f"weight files {sorted(ckpt.files)} but the recorded plan has {sorted(recorded)}")
    for fname, f in ckpt.files.items():
        if f.metadata.get("format") != "pt":
            c.fail(f"{fname}: metadata format is {f.metadata.get('format')!r}, expected 'pt'")
        try:
            prov = json.loads(f.metadata.get("resta_fast", "null"))
        except ValueError:
            prov = None
        if not isinstance(prov, dict) or {k: prov.get(k) for k in provenance_keys} != want_prov:
            c.fail(f"{fname}: provenance in the header differs from {REPORT_NAME}")
        tensors = recorded.get(fname)
        if tensors is None:
            continue
        got = [(i.name, list(i.shape), i.dtype) for i in f.tensors.values()]
        want = [(t["name"], list(t["shape"]), t["out_dtype"]) for t in tensors]
        if got != want:
            diff = next(((g, w) for g, w in zip(got, want, strict=False) if g != w),
                        (got[len(want):], want[len(got):]))
            c.fail(f"{fname}: tensors differ from the recorded plan (first difference: "
                   f"file has {diff[0]}, plan says {diff[1]})")
    c.detail = (f"{len(ckpt.files)} safetensors file(s) valid, format=pt, laid out as recorded"
                if c.ok else f"{len(c.problems)} problem(s)")
    return c, ckpt


# --- recomputation -----------------------------------------------------------

def uniform_at(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """DARE uniforms of the flat elements ``idx`` (int64), equal to ``rng.uniform`` there."""
    import torch
    q = idx // 4
    zero = torch.zeros_like(q)
    words = torch.stack(rng.philox4x32(q & 0xFFFFFFFF, q >> 32, zero, zero,
                                       seed & 0xFFFFFFFF, seed >> 32), dim=1)
    w = words.gather(1, (idx % 4).unsqueeze(1)).squeeze(1)
    x = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # x = ~x for negative x
    return x.to(torch.float32) * torch.tensor(rng.UNIFORM_SCALE, dtype=torch.float32)


def patch_at(out, f, a, u, b, *, beta, p, seed, idx):
    """``kernels.reference.patch_into`` for the scattered elements ``idx``.

    The same separate, individually rounded fp32 ops in SPEC §2 order; only the
    DARE stream is drawn at ``idx`` instead of a contiguous offset.
    """
    from resta_fast.kernels.reference import patch_values, store
    store(out, patch_values(f, a, u, b, beta=beta, p=p, uniforms=lambda: uniform_at(seed, idx)))


def _sample_indices(plan_tensors, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded sample: at least one element per non-empty tensor, the rest by size (sorted int64)."""
    sizes = [(t.name, t.numel) for t in plan_tensors if t.numel > 0]
    if not sizes or samples <= 0:
        return {}
    gen = np.random.default_rng(seed)
    if samples < len(sizes):  # fewer samples than tensors: one element in each of a random few
        chosen = gen.choice(len(sizes), size=samples, replace=False)
        sizes = [sizes[i] for i in sorted(chosen)]
    total = sum(n for _, n in sizes)
    spare = samples - len(sizes)
    picked = {}
    for name, n in sizes:
        k = min(n, 1 + (spare * n) // total)
        idx = np.arange(n, dtype=np.int64) if k == n else np.sort(gen.choice(n, size=k, replace=False))
        picked[name] = idx.astype(np.int64)
    return picked


def _native_kernel():
    """The C++ kernel, to recompute samples without torch; None where it is not built."""
    from resta_fast.kernels import BackendUnavailable, load_backend
    try:
        return load_backend("cpp")
    except BackendUnavailable:
        return None


class _NativeRecompute:
    """Scattered elements with the C++ kernel on numpy gathers (no torch). It is
    bit-identical to the torch reference (tests/test_patch_kernels.py); with DARE
    each element is recomputed at its own offset, so it draws the stream there."""

    def __init__(self, cpp):
        self.cpp = cpp

    def patch(self, out, f, a, u, b, *, beta, p, seed, idx: np.ndarray) -> None:
        if b is None:  # no random stream: one call for every element
            self.cpp.patch_arrays(out, f, a, u, beta=beta)
            return
        for k, j in enumerate(idx.tolist()):
            self.cpp.patch_arrays(out[k:k + 1], f[k:k + 1], a[k:k + 1], None if u is None else u[k:k + 1],
                                  b[k:k + 1], beta=beta, p=p, seed=seed, offset=j)

    def convert(self, out, x) -> None:
        self.cpp.convert_arrays(out, x)


class _TorchRecompute:
    """The same with the torch reference (``patch_at``), where the kernel is not built."""

    def patch(self, out, f, a, u, b, *, beta, p, seed, idx: np.ndarray) -> None:
        import torch

        from resta_fast.pipeline.compute import as_torch
        patch_at(as_torch(out), as_torch(f), as_torch(a), as_torch(u), as_torch(b), beta=beta, p=p, seed=seed,
                 idx=torch.from_numpy(idx))

    def convert(self, out, x) -> None:
        from resta_fast.kernels.reference import convert_into
        from resta_fast.pipeline.compute import as_torch
        convert_into(as_torch(out), as_torch(x))


def _expected(recompute, t, idx: np.ndarray, ft, a_src, u_src, b_src, params: dict, command: str) -> np.ndarray:
    """What the output tensor ``t`` must hold at ``idx``, as a host array of t.out_dtype."""
    want = np.empty(len(idx), dtype=NUMPY_STORAGE[t.out_dtype])
    patched = t.patched_elems if t.action == "patch" else 0
    head = idx < patched
    if head.any():
        i = idx[head]
        part = np.empty(len(i), dtype=want.dtype)
        if command == "vector":  # round(-0.0 + 1*(A - U)): exactly round(A - U)
            recompute.patch(part, np.full(len(i), -0.0, np.float32), a_src.array(t.name)[i],
                            u_src.array(t.name)[i], None, beta=1.0, p=0.0, seed=0, idx=i)
        else:
            dare = params.get("dare")
            seed = rng.tensor_seed(int(params.get("seed") or 0), t.seed_name or t.name) if dare is not None else 0
            recompute.patch(part, ft.array(t.name)[i], a_src.array(t.name)[i],
                            None if u_src is None else u_src.array(t.name)[i],
                            None if dare is None else b_src.array(t.name)[i],
                            beta=t.beta, p=dare or 0.0, seed=seed, idx=i)
        want[head] = part
    if not head.all():
        i = idx[~head]
        src = ft.array(t.name)[i]
        if t.in_dtype == t.out_dtype:
            want[~head] = src
        else:
            part = np.empty(len(i), dtype=want.dtype)
            recompute.convert(part, src)
            want[~head] = part
    return want


def _same(got: np.ndarray, want: np.ndarray, dtype: str) -> np.ndarray:
    """Elementwise bit equality of host arrays; NaN equals NaN for float dtypes."""
    width = DTYPES[dtype][1]
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    same = got.view(bits) == want.view(bits)
    if dtype in KERNEL_DTYPES:
        same |= _isnan(got, dtype) & _isnan(want, dtype)
    return same


def _isnan(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.view(np.uint16) & 0x7FFF) > 0x7F80
    return np.isnan(x)


def _shown(x: np.ndarray, dtype: str) -> float:
    """One host element as a number (BF16 bits widened to fp32)."""
    if dtype == "BF16":
        return float((x.astype(np.uint32) << 16).view(np.float32))
    return x.item()


def _input_fingerprints(report: dict, role: str, ck: Checkpoint, c: Check) -> None:
    recorded = ((report.get("inputs") or {}).get(role) or {}).get("files")
    if not isinstance(recorded, dict):
        c.fail(f"{role}: no fingerprint recorded in {REPORT_NAME}")
        return
    found = ck.fingerprint()
    if sorted(found) != sorted(recorded):
        c.fail(f"{role} {ck.path}: files {sorted(found)} but the run read {sorted(recorded)}")
        return
    for name, fp in found.items():
        # mtime is recorded for the record only: a copied but identical input still verifies.
        same = {k: v for k, v in fp.items() if k != "mtime_ns"} == \
            {k: v for k, v in recorded[name].items() if k != "mtime_ns"}
        if not same:
            c.fail(f"{role} {ck.path}: {name}: size or header differs from the input the run read")


def _default_from(role: str, paths: dict, recorded: dict, explicit: str | None, explicit_inputs: bool,
                  flag: str) -> str:
    """Path of an input that --against does not list (DARE base, LoRA base)."""
    if explicit:
        return explicit
    if recorded.get(role) and recorded.get(role) == recorded.get("aligned") and "aligned" in paths:
        return paths["aligned"]  # the default: the aligned model
    if recorded.get(role) and not explicit_inputs:
        return recorded[role]
    raise RestaError(f"verify --against: this output used a separate {role.replace('_', ' ')} model; "
                     f"pass it with {flag}")


def _resolve_inputs(report: dict, against: list[str], dare_base: str | None,
                    base: str | None = None) -> dict[str, str]:
    """role -> path of the inputs to recompute from."""
    command = report.get("command")
    params = report.get("params") or {}
    recorded = {role: info.get("path") for role, info in (report.get("inputs") or {}).items()}
    if command == "vector":
        roles = ["aligned", "unaligned"]
    elif command == "patch":
        mode = (report.get("plan") or {}).get("mode")
        roles = ["finetuned", "vector"] if mode == "vector" else ["finetuned", "aligned", "unaligned"]
    else:
        raise RestaError(f"verify --against: cannot recompute outputs of command {command!r} "
                         "(only patch and vector); hashes and headers were still checked")
    if against:
        if len(against) != len(roles):
            raise RestaError(f"verify --against: this output was made by `{command}` from "
                             f"{', '.join(roles).upper()}; give those {len(roles)} paths in that order "
                             f"(got {len(against)})")
        paths = dict(zip(roles, against, strict=True))
    else:
        missing = [r for r in roles if not recorded.get(r)]
        if missing:
            raise RestaError(f"verify --against: {REPORT_NAME} records no path for {', '.join(missing)}; "
                             "give the input paths explicitly")
        paths = {r: recorded[r] for r in roles}
    if command == "patch" and "base" in recorded:  # a LoRA adapter merged into its base
        paths["base"] = _default_from("base", paths, recorded, base, bool(against), "--base")
    if command == "patch" and params.get("dare") is not None:
        if not dare_base and recorded.get("dare_base") and recorded.get("dare_base") == recorded.get("base"):
            paths["dare_base"] = paths["base"]
        else:
            paths["dare_base"] = _default_from("dare_base", paths, recorded, dare_base, bool(against),
                                               "--dare-base")
    return {role: _local(report, role, path, recorded) for role, path in paths.items()}


def _local(report: dict, role: str, path: str, recorded: dict) -> str:
    """A path to open for ``role``: a Hub id given on the command line resolved to its snapshot, and a
    recorded Hub input whose cache snapshot is gone fetched again at its recorded commit."""
    hub = ((report.get("inputs") or {}).get(role) or {}).get("hub") or {}
    if path == recorded.get(role):  # as recorded: a local path stays one, even if it is gone
        if not (hub.get("repo_id") and hub.get("commit")) or os.path.lexists(path):
            return path
        path = f"hf://{hub['repo_id']}@{hub['commit']}"
    found = resolve_input(path, role.replace("_", " "), kind=ROLE_KINDS.get(role, "model"))
    return str(found.path) if found.is_hub else path


def _open_inputs(paths: dict[str, str], params: dict, command: str, stack: ExitStack) -> dict:
    """Open each role's input as ``patch`` did (``api.open_roles``: a DARE or LoRA
    base that is the aligned model is that same object); role -> Checkpoint."""
    from resta_fast import api
    opener = api.Opener(stack)
    if command == "vector":
        return {role: opener(paths[role], role) for role in ("aligned", "unaligned")}
    dare = params.get("dare") is not None
    roles = resolve_roles(paths["finetuned"], aligned=paths.get("aligned"), unaligned=paths.get("unaligned"),
                          vector=paths.get("vector"), base=paths.get("base"), dare_base=paths.get("dare_base"),
                          dare=dare)
    cks, _ = api.open_roles(roles, opener, dare=dare)
    return {role: ck for role, ck in cks.items() if ck is not None}


def check_against(out_ckpt: Checkpoint, report: dict, against: list[str], dare_base: str | None,
                  samples: int, seed: int, base: str | None = None) -> list[Check]:
    """Fingerprints, rebuilt plan, and a bit-exact recomputed sample."""
    inputs_c, plan_c, sample_c = Check("inputs"), Check("plan"), Check("sample")
    command = report.get("command")
    params = report.get("params") or {}
    paths = _resolve_inputs(report, against, dare_base, base)
    with ExitStack() as stack:
        cks = _open_inputs(paths, params, command, stack)
        for role, ck in cks.items():
            _input_fingerprints(report, role, ck, inputs_c)
        inputs_c.detail = (f"fingerprints of {', '.join(cks)} match" if inputs_c.ok
                           else f"{len(inputs_c.problems)} problem(s)")
        recorded = {t["name"]: t for ts in _recorded_plan(report).values() for t in ts}
        if command == "vector":
            plan_tensors = [_PlanRow(**{k: t.get(k) for k in _PlanRow.__dataclass_fields__})
                            for t in recorded.values()]
            plan_c.detail = "recorded plan used (vector outputs are every common float tensor)"
            ft, a_src, u_src, b_src = None, cks["aligned"], cks["unaligned"], None
        else:
            ft = cks["finetuned"]
            a_src = cks.get("vector") or cks["aligned"]
            u_src = cks.get("unaligned")
            b_src = cks.get("dare_base")
            try:
                from resta_fast import api
                from resta_fast.pipeline.job import Inputs
                options = PatchOptions(beta=float(params.get("beta", 1.0)), include=params.get("include") or (),
                                       exclude=params.get("exclude") or (),
                                       beta_rules=params.get("beta_rules") or (), dtype=params.get("dtype"))
                plan = api.plan_patch(Inputs(ft, cks.get("aligned"), u_src, cks.get("vector"), b_src), options)
            except RestaError as exc:
                plan_c.fail(f"cannot rebuild the plan from the inputs: {exc}")
                return [inputs_c, plan_c]
            plan_tensors = list(plan.tensors())
            for t in plan_tensors:
                rec = recorded.get(t.name)
                mine = asdict(t)
                if rec is None:
                    plan_c.fail(f"{t.name}: in the rebuilt plan but not in the recorded one")
                    continue
                for key in PLAN_FIELDS:
                    a, b = mine[key], rec.get(key)
                    if (list(a) if key == "shape" else a) != (list(b) if key == "shape" and b else b):
                        plan_c.fail(f"{t.name}: {key} is {a!r} from the inputs but {b!r} in {REPORT_NAME}")
            for name in recorded.keys() - {t.name for t in plan_tensors}:
                plan_c.fail(f"{name}: in the recorded plan but not in the rebuilt one")
            plan_c.detail = (f"rebuilt from the inputs and recorded parameters: identical "
                             f"({len(plan_tensors)} tensors)" if plan_c.ok
                             else f"{len(plan_c.problems)} problem(s)")
        picked = _sample_indices(plan_tensors, samples, seed)
        by_name = {t.name: t for t in plan_tensors}
        cpp = _native_kernel()  # torch only where the C++ kernel is not built
        recompute = _NativeRecompute(cpp) if cpp is not None else _TorchRecompute()
        checked = bad = 0
        for name, idx in picked.items():
            t = by_name[name]
            if name not in out_ckpt:
                sample_c.fail(f"{name}: missing from the output")
                continue
            info = out_ckpt.info(name)
            if info.dtype != t.out_dtype or info.shape != tuple(t.shape):
                sample_c.fail(f"{name}: output is {info.dtype} {list(info.shape)}, expected "
                              f"{t.out_dtype} {list(t.shape)}")
                continue
            want = _expected(recompute, t, idx, ft, a_src, u_src, b_src, params, command)
            got = out_ckpt.array(name)[idx]
            wrong = np.flatnonzero(~_same(got, want, t.out_dtype))
            checked += len(idx)
            if len(wrong):
                bad += len(wrong)
                i = int(wrong[0])
                sample_c.fail(f"{name}: {len(wrong)} of {len(idx)} sampled elements differ, e.g. element "
                              f"{int(idx[i])}: output {_shown(got[i], t.out_dtype)!r}, "
                              f"expected {_shown(want[i], t.out_dtype)!r}")
        sample_c.detail = (f"{checked} elements in {len(picked)} tensors match bit for bit (seed {seed})"
                           if sample_c.ok else f"{bad} of {checked} sampled elements differ")
    return [inputs_c, plan_c, sample_c]


@dataclass
class _PlanRow:
    """A recorded plan row, shaped like plan.TensorPlan for sampling."""

    name: str
    action: str
    shape: list
    in_dtype: str
    out_dtype: str
    beta: float | None = None
    patched_elems: int = 0
    seed_name: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def verify(out, against: list[str] | None = None, *, dare_base: str | None = None,
           base: str | None = None, samples: int = 10000, seed: int = 0) -> dict:
    """Check an output directory against its resta_fast.json (and its inputs).

    Args:
        out: a directory written by ``patch`` or ``vector``.
        against: None (hashes and headers only), [] (recompute from the input
            paths recorded in resta_fast.json), or the input paths in the order
            the command took them (finetuned, aligned, unaligned / finetuned,
            vector / aligned, unaligned).
        dare_base: the DARE base, when it was not the aligned model.
        base: the model a LoRA adapter was merged into, when it was not the aligned model.
        samples, seed: how many output elements to recompute, and which.
    Returns:
        ``{"out", "ok", "checks": [{"name", "ok", "detail", "problems"}]}``.

    Example:
        >>> verify("restored", ["ft", "chat", "shadow"])["ok"]  # doctest: +SKIP
        True
    """
    out = Path(out)
    if not out.is_dir():
        raise RestaError(f"verify {out}: not a directory; give the output directory of `patch`")
    checks = []
    report_check = Check("report")
    report = None
    try:
        report = json.loads((out / REPORT_NAME).read_text())
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
        report_check.detail = f"{REPORT_NAME}: {report.get('tool')} {report.get('version')}, " \
                              f"command {report.get('command')}"
    except FileNotFoundError:
        report_check.fail(f"{out / REPORT_NAME} is missing: this is not a finished resta-fast output")
    except (ValueError, OSError, RecursionError) as exc:
        report_check.fail(f"{out / REPORT_NAME} is unreadable ({exc})")
    checks.append(report_check)
    if report is not None:
        validation = report.get("validation")
        if isinstance(validation, dict):  # patch --validate-prompts recorded a safety verdict
            v = Check("validation", detail="the recorded safety validation passed")
            if not validation.get("passed", False):
                v.fail(f"patch --validate-prompts marked this output as failed: "
                       f"{validation.get('reason') or 'no reason recorded'}")
                v.detail = "the recorded safety validation failed"
            checks.append(v)
        checks.append(check_hashes(out, report))
        header_check, out_ckpt = check_headers(out, report)
        checks.append(header_check)
        try:
            if against is not None and out_ckpt is not None:
                checks += check_against(out_ckpt, report, list(against), dare_base, samples, seed,
                                        base)
        finally:
            if out_ckpt is not None:
                out_ckpt.close()
    result = {"out": str(out), "ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
    sources = hub_sources(report) if report is not None else {}
    if sources:
        result["hub_inputs"] = sources
    return result


def hub_sources(report: dict) -> dict[str, dict]:
    """role -> {repo_id, revision, commit} of the inputs an output's report says came from the Hub."""
    inputs = report.get("inputs") if isinstance(report.get("inputs"), dict) else {}
    return {role: info["hub"] for role, info in inputs.items()
            if isinstance(info, dict) and isinstance(info.get("hub"), dict)}


def format_result(result: dict) -> str:
    lines = [f"verify {result['out']}"]
    for role, hub in (result.get("hub_inputs") or {}).items():
        rev = hub.get("revision")
        lines.append(f"  from  {role.replace('_', ' ')}: {hub.get('repo_id')}"
                     + (f"@{rev}" if rev and rev != "main" else "") + f", commit {hub.get('commit')}")
    for c in result["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail'] or ''}".rstrip())
        for problem in c["problems"][:MAX_LISTED]:
            lines.append(f"          {problem}")
        if len(c["problems"]) > MAX_LISTED:
            lines.append(f"          ... {len(c['problems']) - MAX_LISTED} more (see --json)")
    lines.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(lines)
