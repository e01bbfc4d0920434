"""The Ray executor: one task per job group, results collected as they finish.

``ray.init()`` starts a local cluster by default; ``address`` (or
``RAY_ADDRESS``) joins an existing one, after checking that the address
answers (``ray.init`` to a dead address hangs). Each task runs the local fused
executor on its group; jobs that failed with a plain OSError (a flaky network
filesystem) make the task raise, so Ray retries it (``retry_exceptions``): the
retry skips the jobs that finished and redoes the rest.

Needs the optional extra: ``pip install 'resta-fast[ray]'``.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from resta_fast.batch.local import JobResult, Reporter, run_group
from resta_fast.batch.manifest import Group, Manifest
from resta_fast.errors import RestaError

CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 3
GCS_PORT = 6379  # `ray start --head` default
CLIENT_PORT = 10001  # ray:// (Ray Client) default


class TransientJobError(OSError):
    """Some jobs of a group failed with I/O errors; raised so Ray retries the task.

    Carries the group's results so the last attempt still reports every job.
    """

    def __init__(self, message: str, results: list[dict]):
        super().__init__(message)
        self.results = results

    def __reduce__(self):
        return (TransientJobError, (self.args[0], self.results))


def import_ray():
    """The ``ray`` module, or a RestaError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise RestaError(
            f"--executor ray needs Ray, which is not installed ({exc}); install the extra "
            "with: pip install 'resta-fast[ray]'"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RestaError unless ``address`` (host:port, ray://host:port) accepts a TCP connection."""
    if address in ("auto", "local"):
        return  # 'auto' reads the local cluster file; 'local' starts one
    url = urlparse(address if "://" in address else f"tcp://{address}")
    default = CLIENT_PORT if url.scheme == "ray" else GCS_PORT
    try:
        host, port = url.hostname, url.port or default
    except ValueError:
        host, port = None, None
    if not host:
        raise RestaError(f"--ray-address {address!r}: expected HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RestaError(
            f"Ray cluster at {address} does not answer ({host}:{port}: "
            f"{exc.strerror or exc}) within {timeout:g} s; check --ray-address / "
            "RAY_ADDRESS, or start one with `ray start --head`"
        ) from None


def task_options(group: Group, num_cpus: float | None, num_gpus: float | None) -> dict:
    """Ray ``.options()`` for one group's task."""
    if num_gpus is None:
        num_gpus = 1 if group.device.startswith("cuda") else 0
    opts = {"num_cpus": num_cpus or 1, "num_gpus": num_gpus, "max_retries": MAX_RETRIES, "retry_exceptions": [OSError]}
    if not num_gpus:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for CPU tasks; hide the GPUs so a
        # CPU job never initialises CUDA on a GPU node.
        opts["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    return opts


def _group_task(
    manifest: Manifest, gid: int, num_gpus: float, threads: int | None, fsync: bool | None, fused_options: dict
) -> list[dict]:
    """Body of the Ray task (runs on a worker)."""
    if not num_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    results = run_group(manifest, gid, threads=threads, fsync=fsync, **fused_options)
    out = [r.to_json() for r in results]
    transient = [r for r in results if r.transient]
    if transient:
        raise TransientJobError(
            f"{len(transient)} job(s) of group {gid} failed with I/O errors, e.g. "
            f"{transient[0].name}: {transient[0].error}",
            out,
        )
    return out


def run_ray(
    manifest: Manifest,
    groups: list[int] | None = None,
    *,
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    threads: int | None = None,
    fsync: bool | None = None,
    reporter: Reporter | None = None,
    **fused_options,
) -> list[JobResult]:
    """Run the selected groups as Ray tasks; return every job's result in manifest order.

    Args:
        address: cluster address (default ``RAY_ADDRESS``; none: a local cluster).
        num_cpus, num_gpus: per task (default: the manifest's, else 1 CPU and
            1 GPU for cuda groups, 0 otherwise). The kernel and writer threads
            share ``num_cpus`` cores unless ``threads`` says otherwise.

    Example:
        >>> run_ray(load_manifest("batch.yaml"), address="10.0.0.1:6379")  # doctest: +SKIP
    """
    ray = import_ray()
    reporter = reporter or Reporter()
    num_cpus = num_cpus if num_cpus is not None else manifest.num_cpus
    num_gpus = num_gpus if num_gpus is not None else manifest.num_gpus
    threads = threads or manifest.threads
    # The task may use num_cpus cores (Ray does not pin it): kernel + writer threads fit in them.
    fused_options.setdefault("cores", max(1, int(num_cpus or 1)))
    selected = manifest.select(groups)
    started_here = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            check_reachable(address)
        # No address: a fresh local cluster, as documented. Ray's own default joins the
        # cluster an earlier `ray start` recorded on this machine, and hangs (ignoring
        # Ctrl-C) when that cluster has died.
        ray.init(address=address or "local", log_to_driver=False, include_dashboard=False)
        started_here = True
    try:
        remote = ray.remote(_group_task)
        pending = {}
        for group in selected:
            opts = task_options(group, num_cpus, num_gpus)
            ref = remote.options(**opts).remote(manifest, group.index, opts["num_gpus"], threads, fsync, fused_options)
            pending[ref] = group
        results: list[JobResult] = []
        while pending:
            # One at a time as they finish: a late failure loses nothing already done.
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                group = pending.pop(ref)
                for r in _collect(ray, ref, group):
                    reporter.job_progress(manifest.jobs[r.index], r.bytes_written)
                    reporter.job_done(r)
                    results.append(r)
    finally:
        if started_here:
            ray.shutdown()
    return sorted(results, key=lambda r: r.index)


def _collect(ray, ref, group: Group) -> list[JobResult]:
    try:
        return [JobResult(**d) for d in ray.get(ref)]
    except Exception as exc:  # noqa: BLE001 - the task's failure becomes its jobs' failures
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, TransientJobError):
            return [JobResult(**d) for d in cause.results]
        msg = f"Ray task for group {group.index} failed: {type(cause).__name__}: {cause}".splitlines()[0]
        return [JobResult(j.index, j.name, group.index, str(j.out), "failed", error=msg) for j in group.jobs]
