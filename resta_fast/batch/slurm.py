"""Slurm: an sbatch array script with one element per job group.

Each element runs the same command, ``resta-fast batch MANIFEST --group
$SLURM_ARRAY_TASK_ID``, so a requeued or resubmitted array skips the jobs that
already finished (their outputs are verified) and redoes the rest.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from resta_fast.batch.manifest import Manifest
from resta_fast.errors import RestaError

SCRIPT_NAME = "resta_batch.sbatch"


def emit_slurm(
    manifest: Manifest,
    out_dir,
    *,
    num_cpus: float | None = None,
    gpus: bool | None = None,
    python: str | None = None,
    fsync: bool | None = None,
    record_paths: bool = False,
) -> Path:
    """Write ``out_dir/resta_batch.sbatch`` and return its path.

    Args:
        num_cpus: ``--cpus-per-task`` (default: the manifest's ``num_cpus``, else 4).
        gpus: request ``--gres=gpu:1`` (default: when any group runs on cuda or
            the manifest asks for ``num_gpus``).
        python: interpreter on the compute nodes (default: this one; override
            at submit time with ``RESTA_PYTHON=...``).
        record_paths: the elements record their inputs' local paths (``--record-paths``).

    Example:
        >>> emit_slurm(load_manifest("batch.yaml"), "slurm/")  # doctest: +SKIP
        PosixPath('slurm/resta_batch.sbatch')
    """
    out_dir = Path(out_dir).absolute()
    try:
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestaError(f"--emit-slurm {out_dir}: cannot create it ({exc.strerror})") from None
    cpus = int(num_cpus or manifest.num_cpus or 4)
    if gpus is None:
        gpus = bool(manifest.num_gpus) or any(g.device.startswith("cuda") for g in manifest.groups)
    n = len(manifest.groups)
    name = manifest.slurm.get("job-name", manifest.slurm.get("job_name", "resta-batch"))
    lines = [
        "#!/bin/bash",
        f"# resta-fast batch: {len(manifest.jobs)} job(s) in {n} group(s) from {manifest.path}",
        "# Submit with: sbatch " + shlex.quote(str(out_dir / SCRIPT_NAME)),
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array=0-{n - 1}",
        f"#SBATCH --cpus-per-task={cpus}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --output={out_dir}/logs/%x-%A_%a.out",
    ]
    if gpus:
        lines.append("#SBATCH --gres=gpu:1")
    for key, value in manifest.slurm.items():
        if key in ("job-name", "job_name"):
            continue
        lines.append(f"#SBATCH --{key.replace('_', '-')}={value}")
    lines += ["#", "# Array element -> jobs (name: fine-tune -> out):"]
    for g in manifest.groups:
        for job in g.jobs:
            lines.append(f"#   {g.index}: {job.name}: {job.finetuned} -> {job.out}")
    cmd = [
        '"$PYTHON"',
        "-m",
        "resta_fast",
        "batch",
        shlex.quote(str(manifest.path.absolute())),
        '--group "$SLURM_ARRAY_TASK_ID"',
        f"--group-size {manifest.group_size}",
        "--no-progress",
        f'--summary {shlex.quote(str(out_dir))}/summary-"$SLURM_ARRAY_TASK_ID".json',
    ]
    if fsync is False or (fsync is None and not manifest.fsync):
        cmd.append("--no-fsync")
    if record_paths:
        cmd.append("--record-paths")
    lines += [
        "",
        "set -euo pipefail",
        f"PYTHON=${{RESTA_PYTHON:-{shlex.quote(python or sys.executable)}}}",
        'echo "resta-fast batch: group $SLURM_ARRAY_TASK_ID on $(hostname)"',
        "exec " + " \\\n    ".join(cmd),
        "",
    ]
    path = out_dir / SCRIPT_NAME
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path
