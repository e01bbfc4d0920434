"""Verdict cache: a line torn by a crash is skipped, the verdicts before it are kept."""

from resta_fast.eval.judges.cache import VerdictCache
from resta_fast.eval.judges.verdict import HARMFUL, Verdict


def test_cache_tolerates_torn_line(tmp_path):
    f = tmp_path / "c.jsonl"
    c = VerdictCache(f)
    c.put("j", "q", "r", Verdict(HARMFUL, "x"))
    with f.open("a") as fh:
        fh.write('{"key": "trunc')  # a crash mid-write
    assert VerdictCache(f).get("j", "q", "r").label == HARMFUL
