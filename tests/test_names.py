"""io/names.py: tensor names that differ by a leading prefix, mapped across checkpoints."""

from resta_fast import lora, plan, safelora
from resta_fast.io.names import prefix_mapping


def test_prefix_mapping_by_suffix_without_numeric_prefixes():
    assert prefix_mapping(
        ["model.norm.weight", "model.layers.0.mlp.weight"], {"norm.weight", "layers.0.mlp.weight"}
    ) == {"model.norm.weight": "norm.weight", "model.layers.0.mlp.weight": "layers.0.mlp.weight"}
    assert prefix_mapping(["transformer.h.weight"], {"model.h.weight"}) == {"transformer.h.weight": "model.h.weight"}
    # Only layer 0 is stored: the pair (layers.1. -> layers.0.) has a numeric part, so layer 1 stays unmapped.
    assert prefix_mapping(["model.layers.1.mlp.weight"], {"model.layers.0.mlp.weight"}) == {}
    # An ambiguous suffix (two available tensors end in it) maps nothing.
    assert prefix_mapping(["model.mlp.weight"], {"a.mlp.weight", "b.mlp.weight"}) == {}
    assert prefix_mapping([], {"norm.weight"}) == {}


def test_the_planner_the_lora_merge_and_safe_lora_share_one_mapping():
    """One function, imported where it was first (plan.prefix_mapping) and where it is used."""
    assert plan.prefix_mapping is lora.prefix_mapping is safelora.prefix_mapping is prefix_mapping
