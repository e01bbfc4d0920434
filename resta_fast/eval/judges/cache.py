"""The verdict cache: judge verdicts in an append-only JSONL file, so a re-run asks only for what is missing."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from resta_fast.eval.judges.verdict import Verdict


class VerdictCache:
    """Verdicts on disk (JSONL, append-only), keyed by (judge id, question, response).

    A re-run — or a run resumed after the endpoint failed — asks only for what is missing.
    Only parseable verdicts are stored, so unparseable ones are retried next time.

    Args:
        path: cache file (created on first write); None keeps the cache in memory only.

    Example:
        >>> c = VerdictCache(None)
        >>> c.put("j", "q", "r", Verdict("harmful")); c.get("j", "q", "r").label
        'harmful'
    """

    def __init__(self, path=None):
        self.path = Path(path) if path else None
        self._data: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._data[row["key"]] = row["verdict"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash: that verdict is simply asked again

    @staticmethod
    def key(judge_id: str, question: str, response: str) -> str:
        return hashlib.sha256(json.dumps([judge_id, question, response]).encode("utf-8")).hexdigest()

    def get(self, judge_id: str, question: str, response: str) -> Verdict | None:
        d = self._data.get(self.key(judge_id, question, response))
        return Verdict.from_dict(d) if d else None

    def put(self, judge_id: str, question: str, response: str, verdict: Verdict) -> None:
        k = self.key(judge_id, question, response)
        with self._lock:
            self._data[k] = verdict.to_dict()
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": k, "judge": judge_id, "verdict": verdict.to_dict()}) + "\n")

    def __len__(self) -> int:
        return len(self._data)
