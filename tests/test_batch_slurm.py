"""`resta-fast batch --emit-slurm` (resta_fast/batch/slurm.py): the sbatch array script."""

import subprocess
from pathlib import Path

import torch
from batch_fixtures import JOBS, make_world, write_manifest

from resta_fast.cli import main as cli_main


def test_slurm_script_passes_bash_n_and_names_every_job(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS, group_size=2, slurm={"partition": "cpu", "time": "01:00:00"})
    assert cli_main(["batch", str(path), "--emit-slurm", str(root / "slurm")]) == 0
    script = root / "slurm" / "resta_batch.sbatch"
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for job in JOBS:
        assert Path(job["out"]).name in text
    assert "#SBATCH --array=0-2" in text and "#SBATCH --partition=cpu" in text
    assert '--group "$SLURM_ARRAY_TASK_ID"' in text and "--group-size 2" in text
    assert "--gres" not in text
    # A GPU manifest is emitted from a login node without GPUs: devices are checked on the nodes.
    write_manifest(root, JOBS, device="cuda")
    assert cli_main(["batch", str(path), "--emit-slurm", str(root / "slurm")]) == 0
    assert "#SBATCH --gres=gpu:1" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert not any((root / "outs").iterdir())
    if not torch.cuda.is_available():
        assert cli_main(["batch", str(path)]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err
