"""Small checkpoints and runners shared by the engine tests (test_engine.py, test_engine_gpu.py)."""

import hashlib

from checkpoints import three_models

from resta_fast.io.checkpoint import Checkpoint
from resta_fast.kernels import reference
from resta_fast.pipeline import engine
from resta_fast.pipeline.job import Inputs, Job
from resta_fast.plan import build_plan

META = {"format": "pt"}


def engine_models(tmp_path):
    """Three tiny Llamas, two shards each; the fine-tune has 3 extra vocabulary rows."""
    return three_models(tmp_path, shards=2, ft_extra_rows=3, vocab=16, hidden=8, layers=1, inter=12)


def plan_and_inputs(ft, al, un, dare=True):
    F, A, U = Checkpoint(ft), Checkpoint(al), Checkpoint(un)
    plan = build_plan(F, aligned=A, unaligned=U, dare_base=A if dare else None, beta=0.5)
    return plan, Inputs(F, A, U, None, A if dare else None)


def run(tmp_path, name, plan, inputs, *, n=1, dare=0.3, seed=4, kernel=reference, **kw):
    jobs = []
    for j in range(n):
        out = tmp_path / f"{name}{j}"
        out.mkdir()
        jobs.append(Job(plan, inputs, out, dare, seed, META))
    engine.run_jobs(jobs, kernel=kernel, **kw)
    for job in jobs:
        if job.error is not None:
            raise job.error
    return jobs


def file_digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}
