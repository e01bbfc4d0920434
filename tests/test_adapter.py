"""io/adapter.py: a PEFT adapter directory's file names and how one is recognised, in one place."""

from resta_fast import lora
from resta_fast.io import adapter, hub
from resta_fast.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter


def test_an_adapter_is_a_directory_with_an_adapter_config(tmp_path):
    assert not is_adapter(tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    assert not is_adapter(tmp_path)  # the weights alone are not an adapter: peft needs the config
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    assert is_adapter(tmp_path) and is_adapter(str(tmp_path))
    assert not is_adapter(tmp_path / ADAPTER_CONFIG)  # a file is never an adapter directory
    assert not is_adapter(tmp_path / "missing")


def test_the_reader_the_hub_and_the_writer_use_the_same_names():
    assert (ADAPTER_CONFIG, ADAPTER_WEIGHTS) == ("adapter_config.json", "adapter_model.safetensors")
    assert (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, lora.is_adapter) == (ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter)
    assert (hub.ADAPTER_CONFIG, hub.ADAPTER_WEIGHTS) == (adapter.ADAPTER_CONFIG, adapter.ADAPTER_WEIGHTS)
