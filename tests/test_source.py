"""Both checkpoint kinds satisfy io.source.TensorSource, so the planner and the
engine call its members directly instead of probing with hasattr."""

import inspect

import pytest
import torch
from checkpoints import three_models

from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.source import TensorSource

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}


def protocol_members() -> set[str]:
    own = {
        n
        for n, v in vars(TensorSource).items()
        if inspect.isfunction(v) and (n == "__contains__" or not n.startswith("_"))
    }
    return own | set(TensorSource.__annotations__)


def assert_satisfies(obj) -> None:
    missing = sorted(n for n in protocol_members() if not hasattr(obj, n))
    assert not missing, f"{type(obj).__name__} lacks TensorSource members {missing}"
    assert isinstance(obj, TensorSource)
    for n in protocol_members() - set(TensorSource.__annotations__):
        want = inspect.signature(getattr(TensorSource, n)).parameters
        got = inspect.signature(getattr(type(obj), n)).parameters
        assert list(got) == list(want), f"{type(obj).__name__}.{n}{tuple(got)} vs TensorSource.{n}{tuple(want)}"


def test_protocol_lists_what_the_planner_and_engine_use():
    assert {
        "files",
        "location",
        "info",
        "array",
        "tensor_view",
        "prefetch",
        "release",
        "tied_embeddings",
        "quantization",
        "side_files",
        "fingerprint",
        "check_unchanged",
        "close",
        "config",
        "path",
        "root",
        "is_dir",
        "stored_dtype",
        "is_merged",
        "file_of",
        "__contains__",
    } <= protocol_members()


def test_checkpoint_satisfies_the_protocol_with_trivial_merge_hooks(tmp_path):
    ft, _, _ = three_models(tmp_path, dtype=torch.float16, **SMALL)
    ck = Checkpoint(ft)
    assert_satisfies(ck)
    name = "model.layers.0.mlp.up_proj.weight"
    assert ck.stored_dtype(name) == ck.info(name).dtype == "F16"
    assert not any(ck.is_merged(n) for n in ck.names())
    assert ck.file_of(name) is ck.files["model.safetensors"]
    ck.close()


def test_an_object_missing_a_member_does_not_satisfy_it(tmp_path):
    class Partial:
        def __init__(self, ck):
            self._ck = ck

        def __getattr__(self, n):
            if n == "is_merged":
                raise AttributeError(n)
            return getattr(self._ck, n)

    ft, _, _ = three_models(tmp_path, **SMALL)
    assert not isinstance(Partial(Checkpoint(ft)), TensorSource)


def test_lora_finetuned_satisfies_the_protocol(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from lora_fixtures import llama_base, train_adapter

    from resta_fast.lora import LoraFinetuned

    base = llama_base(tmp_path / "base")
    train_adapter(base, tmp_path / "adapter", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    ft = LoraFinetuned(tmp_path / "adapter", Checkpoint(base))
    assert_satisfies(ft)
    q, norm = "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    assert ft.is_merged(q) and not ft.is_merged(norm)
    assert (ft.info(q).dtype, ft.stored_dtype(q)) == ("F32", "BF16")  # merged in fp32, written in the base's dtype
    assert ft.stored_dtype(norm) == ft.info(norm).dtype == "BF16"
    assert ft.file_of(q) is None and ft.file_of(norm) is None  # read through array(), never from a file
    ft.close()
