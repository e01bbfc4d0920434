"""Helpers for the tests that break runs on purpose (signals, faults mid-run, concurrent runs).

Runs that must be signalled or resource-limited run in children forked from
one long-lived worker process that has already imported torch, so ~50 child
runs cost milliseconds each instead of a fresh interpreter start each.

Invariants the tests check with these helpers:
* inputs are never modified (``snapshot``);
* ``--out`` either does not exist or is complete (``verify`` passes); no
  temp dir, lock file or old-output dir outlives the next run (``leftovers``);
* a failed run says so in one line (``one_line_error``).
"""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from resta_fast.verify import verify

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}
MID = {"vocab": 256, "hidden": 32, "layers": 1, "inter": 48}
TESTS = Path(__file__).resolve().parent
HOST = socket.gethostname()
TRIALS = 20  # signals sent per random-moment test

WORKER = r"""
import json, os, resource, signal, sys, time, traceback
sys.path[:0] = [%(repo)r, %(tests)r]
import torch
torch.set_num_threads(1)  # no thread pools exist when we fork
import resta_fast.pipeline.engine as engine
import resta_fast.pipeline.interrupt as interrupt
from resta_fast import executor
from resta_fast.cli import main


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 99
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if req.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], resource.RLIM_INFINITY))
        if req.get("delay"):
            orig, done = engine._Pass._finish_tensor, [0]

            def slow(*a, **k):
                orig(*a, **k)
                done[0] += 1
                if req.get("marker") and done[0] == req.get("marker_after", 1):
                    open(req["marker"], "w").close()
                time.sleep(req["delay"])
            engine._Pass._finish_tensor = slow

        def recording():  # where the KeyboardInterrupt came from: a tensor boundary
            if interrupt.interrupt_requested() and req.get("origin"):
                open(req["origin"], "w").write("boundary")
            interrupt.raise_if_interrupted()
        engine.raise_if_interrupted = executor.raise_if_interrupted = recording
        code = main(req["argv"])
    except KeyboardInterrupt:
        code = 130  # before main() got going: nothing was written
        print("resta-fast: interrupted before the run started", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    # Reap only when asked: until then a finished child stays a zombie, so a
    # signal sent late hits nothing instead of a recycled pid.
    sys.stdin.readline()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Worker:
    """Forks patch runs on request; ``start`` returns the child pid, ``wait`` its exit code
    (negative: killed by that signal)."""

    def __init__(self):
        script = WORKER % {"repo": str(TESTS.parent), "tests": str(TESTS)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert json.loads(self.proc.stdout.readline())["ready"], "worker failed to start"

    def start(self, **req) -> int:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "worker died"
        return json.loads(line)["pid"]

    def wait(self) -> int:
        self.proc.stdin.write("wait\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "worker died"
        return json.loads(line)["code"]

    def run(self, **req) -> int:
        self.start(**req)
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def patch_argv(ft, al, un, out, *extra):
    return [
        "patch",
        "--finetuned",
        str(ft),
        "--aligned",
        str(al),
        "--unaligned",
        str(un),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--no-progress",
        *extra,
    ]


def snapshot(*dirs) -> dict:
    """Content hash, size and mtime of every file under ``dirs`` (to prove inputs untouched)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def leftovers(parent: Path, out_name: str = "out") -> list[str]:
    """Temp dirs, lock files and old-output dirs of ``out`` in its parent."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}."))


def one_line_error(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def calibrate(worker, tmp_path, argv_for, **req) -> float:
    """Wall time of one uninterrupted run (kill times are drawn over ~1.3x of it)."""
    out = tmp_path / "calibration"
    t0 = time.perf_counter()
    code = worker.run(argv=argv_for(out), log=str(tmp_path / "calibration.log"), **req)
    elapsed = time.perf_counter() - t0
    assert code == 0, (tmp_path / "calibration.log").read_text()
    assert verify(out)["ok"]
    shutil.rmtree(out)
    return elapsed
