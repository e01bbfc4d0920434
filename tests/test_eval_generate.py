"""Generation on tiny local Llamas: chat template, greedy determinism, order, OOM back-off, perplexity."""

import json
import math
import sys

import pytest
import torch
from eval_fakes import build_tiny_llama, build_tiny_tokenizer

from resta_fast.errors import RestaError
from resta_fast.eval.generate import (
    TransformersEngine,
    format_prompts,
    load_engine,
    load_responses,
    load_tokenizer,
    save_responses,
)
from resta_fast.eval.prompts import Prompt


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: 2 threads measured 5x slower than 1 on the CI box
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {
        "rand": build_tiny_llama(root / "rand", seed=1),
        "sorry": build_tiny_llama(root / "sorry", say="sorry"),
        "plain": build_tiny_llama(root / "plain", seed=2, chat_template=False),
    }


def test_chat_template_when_present_raw_otherwise(models):
    tok = load_tokenizer(models["rand"])
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    texts, add = format_prompts(tok, ["how to do it"])
    assert texts == ["<s><|user|> how to do it <|assistant|>"] and add is False
    sys_texts, _ = format_prompts(tok, ["q"], system_prompt="be safe")
    assert sys_texts[0].startswith("<s><|system|> be safe <|user|> q")
    plain = load_tokenizer(models["plain"])
    assert format_prompts(plain, ["how to do it"]) == (["how to do it"], True)
    with pytest.raises(RestaError, match="no.*template|has none"):
        format_prompts(plain, ["q"], chat_template=True)
    assert format_prompts(tok, ["q"], chat_template=False) == (["q"], True)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    )
    with pytest.raises(RestaError, match="chat template failed.*drop --system-prompt"):
        format_prompts(tok, ["q"], system_prompt="be safe")


def test_greedy_deterministic_and_in_input_order(models):
    eng = TransformersEngine(models["rand"], progress=False)
    qs = ["how", "how to do it", "the capital of france is", "sure here is the answer to the question"]
    a = eng.generate(qs, max_new_tokens=6, batch_size=8)
    assert a == eng.generate(qs, max_new_tokens=6, batch_size=8)
    # Same batch composition, other input order: the answers follow their prompts.
    perm = [2, 0, 3, 1]
    assert eng.generate([qs[i] for i in perm], max_new_tokens=6, batch_size=8) == [a[i] for i in perm]
    eng2 = TransformersEngine(models["rand"], progress=False)  # a fresh load gives the same text
    assert eng2.generate(qs, max_new_tokens=6, batch_size=8) == a
    assert all(isinstance(x, str) for x in a) and len(a) == 4
    eng.close()


def test_sorry_model_and_max_new_tokens(models):
    eng = load_engine(models["sorry"], progress=False)
    out = eng.generate(["anything at all", "x"], max_new_tokens=3)
    assert out == ["sorry sorry sorry"] * 2


def test_out_of_memory_halves_the_batch(models, monkeypatch):
    eng = TransformersEngine(models["sorry"], progress=False)
    real = eng.model.generate
    sizes = []

    def flaky(**kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**kw)

    monkeypatch.setattr(eng.model, "generate", flaky)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = eng.generate([f"q {i}" for i in range(5)], max_new_tokens=2, batch_size=8)
    assert out == ["sorry sorry"] * 5 and sizes == [5, 4, 2, 2, 1]

    def always(**kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(eng.model, "generate", always)
    with pytest.raises(RestaError, match="out of memory generating one row"):
        eng.generate(["q"], max_new_tokens=2, batch_size=1)


def test_perplexity_matches_transformers_loss(models):
    eng = TransformersEngine(models["rand"], progress=False)
    text = "the capital of france is paris . one two three four five"
    ids = eng.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = eng.model(ids, labels=ids).loss.item()
    assert eng.perplexity(text, window=1024) == pytest.approx(math.exp(loss), rel=1e-5)
    # Windows of 4 tokens: a different (larger) number, still finite and > 1.
    assert eng.perplexity(text, window=4) > 1.0
    with pytest.raises(RestaError, match="fewer than 2 tokens"):
        eng.perplexity("the")


def test_close_frees_the_model_and_collects_only_for_a_cycle(models, monkeypatch):
    import gc
    import weakref

    collects = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collects.append(1) or real_collect(*a))
    eng = TransformersEngine(models["rand"], progress=False)
    model = weakref.ref(eng.model)
    eng.close()
    assert model() is None and collects == []  # freed by reference counting alone
    eng = TransformersEngine(models["rand"], progress=False)
    eng.model.__dict__["_held_by_a_cycle"] = [eng.model]
    model = weakref.ref(eng.model)
    eng.close()
    assert model() is None and collects == [1]  # the cycle needed the collector


def test_bad_model_dir_device_engine(tmp_path, models):
    with pytest.raises(RestaError, match="no config.json.*hub names are not downloaded"):
        load_engine(tmp_path / "meta-llama/Llama-2-7b-chat-hf")
    if not torch.cuda.is_available():
        with pytest.raises(RestaError, match="no CUDA device"):
            load_engine(models["rand"], device="cuda")
    with pytest.raises(RestaError, match="Unknown --engine"):
        load_engine(models["rand"], engine="tgi")
    with pytest.raises(RestaError, match="Unknown --dtype"):
        load_engine(models["rand"], dtype="int4")


def test_vllm_missing_is_a_clear_error(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RestaError, match="--engine vllm needs vLLM.*--engine transformers"):
        load_engine(models["rand"], engine="vllm")


def test_responses_roundtrip_and_errors(tmp_path):
    prompts = [Prompt("s:0", "q one", "Cat", "Sub"), Prompt("s:1", "q two")]
    f = save_responses(tmp_path / "r" / "m.jsonl", "/models/m", prompts, ["a1", ""])
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert rows[0] == {
        "id": "s:0",
        "prompt": "q one",
        "category": "Cat",
        "subcategory": "Sub",
        "response": "a1",
        "model": "/models/m",
    }
    model, p2, r2 = load_responses(f)
    assert model == "/models/m" and p2 == prompts and r2 == ["a1", ""]
    with pytest.raises(RestaError, match="not found"):
        load_responses(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(RestaError, match="line 1.*'prompt' and 'response'"):
        load_responses(bad)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        '{"prompt": "x", "response": "y", "model": "a"}\n{"prompt": "x", "response": "y", "model": "b"}\n'
    )
    with pytest.raises(RestaError, match="mixes responses"):
        load_responses(mixed)


def test_tiny_tokenizer_helper_roundtrip():
    tok = build_tiny_tokenizer(first="sorry")
    assert tok.convert_tokens_to_ids("sorry") == 0
    assert tok.decode(tok("sure here is")["input_ids"]) == "sure here is"
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]
