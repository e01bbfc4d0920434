"""The one streaming engine: every path (patch, batch, CPU, GPU) runs ``run_jobs``."""

from __future__ import annotations

from resta_fast.pipeline.job import Job


def run_jobs(jobs: list[Job], *, kernel, device: str = "cpu", threads: int | None = None,
             chunk_elems: int | None = None, cache=None, **tuning) -> None:
    """Write every job's output in one pass over their shared inputs.

    Fills each job's ``stats`` or ``error``; never raises for one job's failure
    (KeyboardInterrupt and errors that stop every job do propagate).
    """
    # Transitional dispatch to the old pipelines; replaced by one scheduler.
    from resta_fast.pipeline import cpu, gpu
    if device.startswith("cuda") or tuning.pop("staged", False):
        for job in jobs:
            try:
                job.stats = gpu.run_plan_gpu(job.plan, job.inputs, job.out_dir, kernel=kernel, beta=1.0,
                                             dare=job.dare, seed=job.seed, metadata=job.metadata, device=device,
                                             progress=job.progress, cache=cache, chunk_elems=chunk_elems,
                                             **tuning)
            except Exception as exc:  # noqa: BLE001 - recorded on the job
                job.error = exc
        return
    if len(jobs) == 1 and not tuning:
        job = jobs[0]
        try:
            job.stats = cpu.run_plan(job.plan, job.inputs, job.out_dir, kernel=kernel, beta=1.0, dare=job.dare,
                                     seed=job.seed, metadata=job.metadata, threads=threads,
                                     chunk_elems=chunk_elems or cpu.DEFAULT_CHUNK_ELEMS, progress=job.progress)
        except Exception as exc:  # noqa: BLE001 - recorded on the job
            job.error = exc
        return
    fused = [cpu.FusedJob(j.plan, j.inputs, j.out_dir, j.dare, j.seed, j.metadata, j.progress) for j in jobs]
    cpu.run_fused(fused, kernel=kernel, threads=threads, **({"chunk_elems": chunk_elems} if chunk_elems else {}),
                  **tuning)
    for j, f in zip(jobs, fused, strict=True):
        j.stats, j.error = f.stats, f.error
