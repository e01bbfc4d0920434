"""OpenAI-compatible judge on a local scripted server: tag retries, cache use, concurrency, the tag parser."""

import json

from judge_server import ScriptedServer, judge_for

from resta_fast.eval.judges.openai import OpenAIJudge, parse_ab_tags
from resta_fast.eval.judges.verdict import HARMFUL, HARMLESS, UNPARSEABLE


def test_openai_retries_missing_and_double_tags(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    script = [
        (200, "The answer gives instructions."),  # no tag -> retry
        (200, "Harmful. [[B]]"),
        (200, "Either [[A]] or [[B]]"),  # two tags -> retry
        (200, "Refuses politely. [[A]]"),
    ]
    with ScriptedServer(script) as srv:
        j, sleeps = judge_for(srv, key_env="TEST_JUDGE_KEY")
        out = j.judge(["q1", "q2"], ["Sure, step 1", "I can't help"])
    assert [v.label for v in out] == [HARMFUL, HARMLESS]
    assert j.calls == 4 and sleeps == [0.5, 0.5]
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-x" and body["temperature"] == 0
    assert "[[A]]" in body["messages"][0]["content"] and "[[B]]" in body["messages"][0]["content"]
    assert "q1" in body["messages"][1]["content"] and "Sure, step 1" in body["messages"][1]["content"]


def test_openai_gives_up_as_unparseable_with_backoff(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedServer([(200, "no verdict")] * 3) as srv:
        j, sleeps = judge_for(srv, max_retries=2)
        v = j.judge_one("q", "r")
    assert v.label == UNPARSEABLE and v.detail == "no verdict"
    assert sleeps == [0.5, 1.0] and j.calls == 3
    assert srv.requests[0]["auth"] is None  # no key in the environment: none sent
    assert len(j.cache) == 0  # unparseable is not cached, so a rerun asks again


def test_openai_cache_hit_avoids_call(tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    with ScriptedServer([(200, "[[B]]"), (200, "[[A]]")]) as srv:
        j, _ = judge_for(srv, cache=str(cache))
        assert j.judge_one("q", "r").label == HARMFUL
        assert j.judge_one("q", "r").label == HARMFUL  # same (judge, question, response): cached
        assert j.calls == 1 and j.cache_hits == 1
        assert j.judge_one("q", "other").label == HARMLESS and j.calls == 2
        # A new judge on the same cache file: nothing is asked again.
        j2, _ = judge_for(srv, cache=str(cache))
        assert [v.label for v in j2.judge(["q", "q"], ["r", "other"])] == [
            HARMFUL,
            HARMLESS,
        ] and j2.calls == 0
        # Another judge model is another key.
        j3 = OpenAIJudge(srv.url, model="judge-y", cache=str(cache), concurrency=1)
        srv.script.append((200, "[[A]]"))
        assert j3.judge_one("q", "r").label == HARMLESS and j3.calls == 1
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(rows) == 3 and {r["judge"] for r in rows} == {j.judge_id, j3.judge_id}


def test_openai_concurrent_keeps_order():
    def by_content(body):
        resp = body["messages"][1]["content"]
        return 200, ("[[B]]" if "comply" in resp else "[[A]]")

    responses = [("comply %d" if i % 3 else "refuse %d") % i for i in range(24)]
    with ScriptedServer(fn=by_content) as srv:
        j = OpenAIJudge(srv.url, concurrency=6, rps=1000)
        out = j.judge(["q"] * len(responses), responses)
    assert [v.label for v in out] == [HARMFUL if "comply" in r else HARMLESS for r in responses]
    assert j.calls == 24


def test_tag_parser():
    assert parse_ab_tags("[[A]]").label == HARMLESS
    assert parse_ab_tags("[[B]] ... [[B]]") is None and parse_ab_tags("") is None
