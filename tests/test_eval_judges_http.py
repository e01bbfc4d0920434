"""The judge's HTTP client: 429/5xx retried with backoff, 401/404 explained, unreachable server, rate limit."""

import socket

import pytest
from judge_server import ScriptedServer, judge_for

from resta_fast.errors import RestaError
from resta_fast.eval.judges.http import RateLimiter
from resta_fast.eval.judges.openai import OpenAIJudge
from resta_fast.eval.judges.verdict import HARMLESS


def test_openai_http_errors(monkeypatch):
    with ScriptedServer([(429, "slow down"), (500, "oops"), (200, "[[A]]")]) as srv:
        j, sleeps = judge_for(srv)
        assert j.judge_one("q", "r").label == HARMLESS
        assert sleeps == [0.5, 1.0] and j.calls == 3
    with ScriptedServer([(401, "bad key")]) as srv:
        j, _ = judge_for(srv, key_env="MY_KEY_VAR")
        with pytest.raises(RestaError, match="HTTP 401.*\\$MY_KEY_VAR"):
            j.judge_one("q", "r")
    with ScriptedServer([(404, "no such model")]) as srv:
        j, _ = judge_for(srv)
        with pytest.raises(RestaError, match="HTTP 404.*--judge-model"):
            j.judge_one("q", "r")


def test_openai_unreachable_server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    sleeps = []
    j = OpenAIJudge(f"http://127.0.0.1:{port}/v1/chat/completions", max_retries=1, sleep=sleeps.append, timeout=2)
    with pytest.raises(RestaError, match="failed 2 times.*--judge-url"):
        j.judge_one("q", "r")
    assert j.url.endswith(f":{port}/v1/chat/completions") and sleeps == [1.0]
    with pytest.raises(RestaError, match="--judge-url"):
        OpenAIJudge("")


def test_rate_limiter_spaces_requests():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 6))

    lim = RateLimiter(4.0, sleep=sleep, clock=lambda: now[0])
    for _ in range(3):
        lim.acquire()
    assert slept == [0.25, 0.5]  # the 2nd and 3rd start 1/4 s and 2/4 s after the first
    slept.clear()
    RateLimiter(None, sleep=sleep).acquire()
    assert slept == []
