"""Stop signals (resta_fast/pipeline/interrupt.py): SIGINT and SIGTERM stop a run at a tensor boundary and
leave nothing (exit 130 / 143), or the run finishes and verifies; nested signal contexts keep a signal that
lands between them; a host's own SIGTERM handler is left alone. Random-moment runs are forked from one
worker (tests/fault_fixtures.py)."""

import os
import random
import shutil
import signal
import time

import pytest
from checkpoints import three_models
from fault_fixtures import SMALL, TRIALS, Worker, calibrate, leftovers, one_line_error, patch_argv, snapshot

from resta_fast.verify import verify


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize(
    "signum, code_if_stopped, trials", [(signal.SIGINT, 130, TRIALS), (signal.SIGTERM, 143, TRIALS // 2)]
)
def test_stop_signal_at_random_points(tmp_path, worker, capsys, signum, code_if_stopped, trials):
    """SIGINT (20) or SIGTERM (10) at seeded random moments: exit 130 / 143 with nothing
    left, or a finished, verified output; a stopped run stops at a tensor boundary.
    A SIGTERM that lands before the run takes it over, or after it has committed and
    given the signal back, kills the child (as it would kill any process); that must
    leave nothing, or the finished, verified output."""
    ft, al, un = three_models(tmp_path / "in", shards=2, **SMALL)
    before = snapshot(ft, al, un)
    work = tmp_path / "runs"
    work.mkdir()
    out = work / "out"
    name = signal.Signals(signum).name

    def argv_for(o):
        return patch_argv(ft, al, un, o, "--no-fsync")

    span = 1.3 * calibrate(worker, tmp_path, argv_for, delay=0.01)
    rng = random.Random(20240901 + signum)
    outcomes = []
    for trial in range(trials):
        log, origin = tmp_path / f"{name}{trial}.log", tmp_path / f"origin{trial}"
        pid = worker.start(argv=argv_for(out), log=str(log), delay=0.01, origin=str(origin))
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signum)
        code = worker.wait()
        if code == code_if_stopped:
            word = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
            assert one_line_error(log).startswith(f"resta-fast: {word}"), trial
            assert not out.exists(), f"trial {trial}: a stopped run left --out"
            outcomes.append("stopped at a tensor boundary" if origin.exists() else "stopped before writing")
        elif code == -signum:
            assert signum == signal.SIGTERM, (trial, code)
            if out.exists():  # killed after the run committed and gave SIGTERM back, before it exited
                assert (out / "resta_fast.json").is_file() and verify(out)["ok"], (
                    f"trial {trial}: a killed run left an incomplete --out"
                )
                shutil.rmtree(out)
                outcomes.append("killed after the run finished")
            else:
                outcomes.append("killed before the run took the signal over")
        else:
            assert code == 0, (trial, code, log.read_text())
            assert verify(out)["ok"], trial
            shutil.rmtree(out)
            outcomes.append("finished before the signal")
        assert leftovers(work) == [], f"trial {trial}: {leftovers(work)}"
    assert snapshot(ft, al, un) == before
    summary = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    with capsys.disabled():
        print(f"\n{name} trials: {trials}: {summary}")
    # Loose floors: timing varies on shared machines; they only prove the paths were exercised.
    assert summary.get("stopped at a tensor boundary", 0) >= trials // 4, summary


@pytest.fixture()
def default_sigterm():
    """SIGTERM at its default action for the test (an in-process Ray, started by an
    earlier test, installs its own), restored afterwards."""
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, old)


def test_stop_signal_between_nested_runs_is_kept(default_sigterm):
    """A GPU batch group wraps each job's api.patch in its own signal context: a SIGTERM
    that lands between two jobs must stop the next one, not be cleared by it; and the
    handlers are back to what they were once the outer context ends."""
    from resta_fast.pipeline import interrupt

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interrupt.tensor_boundary_signals():
        with interrupt.tensor_boundary_signals():  # job 1
            interrupt.raise_if_interrupted()
        os.kill(os.getpid(), signal.SIGTERM)  # between the jobs
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        with pytest.raises(KeyboardInterrupt), interrupt.tensor_boundary_signals():  # job 2
            interrupt.raise_if_interrupted()
        assert interrupt.stop_signal() == signal.SIGTERM
    assert not interrupt.interrupt_requested()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_host_sigterm_handler_is_left_alone():
    """Whoever embeds us and handles SIGTERM (Ray's workers) keeps its handler."""
    from resta_fast.pipeline import interrupt

    def host_handler(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, host_handler)
    try:
        with interrupt.tensor_boundary_signals():
            assert signal.getsignal(signal.SIGTERM) is host_handler
        assert signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        signal.signal(signal.SIGTERM, old)
