"""Generation engines on tiny local Llamas: greedy determinism, order, OOM back-off, perplexity, bad options."""

import math
import sys

import pytest
import torch
from eval_fakes import build_tiny_llama

from resta_fast.errors import RestaError
from resta_fast.eval.generate import TransformersEngine, load_engine
from resta_fast.eval.options import GENERATION_DTYPES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {
        "rand": build_tiny_llama(root / "rand", seed=1),
        "sorry": build_tiny_llama(root / "sorry", say="sorry"),
    }


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
    with pytest.raises(RestaError, match="unknown --engine"):
        load_engine(models["rand"], engine="tgi")
    with pytest.raises(RestaError, match="unknown --dtype"):
        load_engine(models["rand"], dtype="int4")


def test_vllm_missing_is_a_clear_error(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RestaError, match="--engine vllm needs vLLM.*--engine transformers"):
        load_engine(models["rand"], engine="vllm")


def test_generation_dtypes_are_the_eval_clis_choices(models):
    import argparse

    from resta_fast.eval.cli import add_eval_parser

    assert GENERATION_DTYPES == ("auto", "float32", "bfloat16", "float16")
    sub = add_eval_parser(argparse.ArgumentParser().add_subparsers())
    dtype = next(a for a in sub._actions if a.dest == "dtype")
    assert tuple(dtype.choices) == GENERATION_DTYPES and dtype.default == "auto"
    # The engine's own check (the Python API has no argparse) names every choice, no trailing full stop.
    with pytest.raises(RestaError, match=r"unknown --dtype 'int4'; choose one of auto, float32, bfloat16, float16$"):
        load_engine(models["rand"], dtype="int4")


def test_unknown_device_and_unloadable_model(tmp_path, models):
    with pytest.raises(RestaError, match=r"unknown --device 'tpu'; use cpu, cuda or cuda:N$"):
        load_engine(models["rand"], device="tpu")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in models["rand"].iterdir():
        if not f.name.endswith(".safetensors"):
            (no_weights / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RestaError, match="no-weights: could not load the model"):
        load_engine(no_weights, progress=False)


def test_vllm_checks_dtype_before_loading(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", type(sys)("vllm"))  # an importable stand-in; LLM is never reached
    with pytest.raises(RestaError, match="unknown --dtype 'int4'"):
        load_engine(models["rand"], engine="vllm", dtype="int4")
