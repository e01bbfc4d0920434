"""`resta-fast batch` (resta_fast/batch/cli.py): exit codes, the JSON summary,
status lines, --dry-run, SIGTERM."""

import json
import signal
import subprocess
import time

from batch_fixtures import JOBS, load_and_run, make_world, slow_batch, write_manifest

from resta_fast.batch.cli import cmd_batch  # noqa: F401 - the subcommand must import
from resta_fast.cli import main as cli_main
from resta_fast.io.lock import OutputLock


def test_cli_exit_codes_summary_and_busy_output(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:3])
    summary = root / "summary.json"
    with OutputLock(root / "outs/dare"):  # another run is writing this output
        code = cli_main(["batch", str(path), "--json", "--no-progress", "--summary", str(summary)])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(summary.read_text())
    assert [j["status"] for j in out["jobs"]] == ["done", "failed", "done"]
    assert "another resta-fast run" in out["jobs"][1]["error"]
    assert cli_main(["batch", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dare: done" in err and "plain: skipped" in err and "1 done, 2 skipped of 3 job(s)" in err


def test_sigterm_stops_cleanly_keeps_finished_jobs_and_rerun_resumes(tmp_path):
    """SIGTERM (Slurm time limit, a cancelled CI job) mid-batch: exit 143, the finished
    job stays committed, the running one leaves no temp dir or lock, and a rerun resumes."""
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:3], group_size=1)
    proc = slow_batch(path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (root / "outs/plain/resta_fast.json").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # well into the second job (~20 tensors x 0.1 s each)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "resta-fast: terminated (SIGTERM); partial output removed"
    assert (root / "outs/plain").exists() and not (root / "outs/sweep").exists()
    assert not [p.name for p in (root / "outs").iterdir() if p.name.startswith(".")], "temp dir or lock left"
    first = {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()}
    results = load_and_run(path)
    assert [r.status for r in results] == ["skipped", "done", "done"]
    assert {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()} == first


def test_dry_run_prints_groups(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS, name="batch.json")
    assert cli_main(["batch", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 job(s) in 2 group(s)" in out and "[4] vec" in out
    assert not any((root / "outs").iterdir())


def test_progress_status_lines(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:2])
    assert cli_main(["batch", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resta-fast batch [1/2] plain: done" in err and "[2/2] dare: done" in err
