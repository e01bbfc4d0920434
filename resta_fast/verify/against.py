"""``verify --against``: the inputs' fingerprints, the plan rebuilt from them, and a recomputed sample.

The plan is rebuilt with ``api.plan_patch`` (what ``prepare`` builds) from the
opened inputs and the recorded parameters, and compared row by row with the
recorded one; a vector output's plan is its recorded rows (every common float
tensor), read back as ``plan.TensorPlan``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict, fields

from resta_fast import api
from resta_fast.errors import RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.options import PATCH, PatchOptions
from resta_fast.pipeline.job import Inputs
from resta_fast.plan import TensorPlan
from resta_fast.report import REPORT_NAME
from resta_fast.verify.checks import Check, recorded_plan
from resta_fast.verify.inputs import check_fingerprints, input_paths, open_inputs
from resta_fast.verify.samples import check_sample

PLAN_FIELDS = ("action", "shape", "in_dtype", "out_dtype", "beta", "patched_elems", "seed_name")


def recorded_rows(recorded: dict[str, dict]) -> list[TensorPlan]:
    """The recorded plan rows as TensorPlan (a key the report lacks is None).

    Example:
        >>> recorded_rows({"w": {"name": "w", "action": "patch", "shape": [2, 3]}})[0].numel
        6
    """
    return [TensorPlan(**{f.name: t.get(f.name) for f in fields(TensorPlan)}) for t in recorded.values()]


def _compare_plans(plan_c: Check, rebuilt: list[TensorPlan], recorded: dict[str, dict]) -> None:
    for t in rebuilt:
        rec = recorded.get(t.name)
        mine = asdict(t)
        if rec is None:
            plan_c.fail(f"{t.name}: in the rebuilt plan but not in the recorded one")
            continue
        for key in PLAN_FIELDS:
            a, b = mine[key], rec.get(key)
            if (list(a) if key == "shape" else a) != (list(b) if key == "shape" and b else b):
                plan_c.fail(f"{t.name}: {key} is {a!r} from the inputs but {b!r} in {REPORT_NAME}")
    for name in recorded.keys() - {t.name for t in rebuilt}:
        plan_c.fail(f"{name}: in the recorded plan but not in the rebuilt one")
    plan_c.detail = (
        f"rebuilt from the inputs and recorded parameters: identical ({len(rebuilt)} tensors)"
        if plan_c.ok
        else f"{len(plan_c.problems)} problem(s)"
    )


def check_against(
    out_ckpt: Checkpoint,
    report: dict,
    against: list[str],
    dare_base: str | None,
    samples: int,
    seed: int,
    base: str | None = None,
) -> list[Check]:
    """Fingerprints, rebuilt plan, and a bit-exact recomputed sample."""
    plan_c = Check("plan")
    command = report.get("command")
    params = report.get("params") or {}
    paths = input_paths(report, against, dare_base, base)
    with ExitStack() as stack:
        cks = open_inputs(paths, params, command, stack)
        inputs_c = check_fingerprints(report, cks)
        recorded = {t["name"]: t for ts in recorded_plan(report).values() for t in ts}
        if command == "vector":
            plan_tensors = recorded_rows(recorded)
            plan_c.detail = "recorded plan used (vector outputs are every common float tensor)"
            ft, a_src, u_src, b_src = None, cks["aligned"], cks["unaligned"], None
        else:
            ft = cks["finetuned"]
            a_src = cks.get("vector") or cks["aligned"]
            u_src = cks.get("unaligned")
            b_src = cks.get("dare_base")
            try:
                options = PatchOptions(**PATCH.recorded(params))
                plan = api.plan_patch(Inputs(ft, cks.get("aligned"), u_src, cks.get("vector"), b_src), options)
            except RestaError as exc:
                plan_c.fail(f"cannot rebuild the plan from the inputs: {exc}")
                return [inputs_c, plan_c]
            plan_tensors = list(plan.tensors())
            _compare_plans(plan_c, plan_tensors, recorded)
        sample_c = check_sample(out_ckpt, plan_tensors, ft, a_src, u_src, b_src, params, command, samples, seed)
    return [inputs_c, plan_c, sample_c]
