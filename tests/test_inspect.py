"""`resta-fast inspect`: model summaries and the grouped dry-run plan."""

import json

import torch
from checkpoints import llama_config, llama_tensors, three_models, write_model
from safetensors.torch import load_file, save_file

from resta_fast.cli import main

SMALL = {"vocab": 16, "hidden": 8, "layers": 2, "inter": 12}


def run(capsys, *argv):
    code = main(["inspect", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_single_model_summary(tmp_path, capsys):
    t = llama_tensors(1, **SMALL)
    t["model.rotary.ids"] = torch.arange(3)
    del t["lm_head.weight"]
    model = write_model(tmp_path / "m", t, shards=2, config=llama_config(**SMALL, tie=True))
    code, out, _ = run(capsys, model)
    assert code == 0
    assert "architecture: LlamaForCausalLM  layers: 2" in out
    n_params = sum(v.numel() for v in t.values())
    assert f"tensors: {len(t)}" in out and "BF16 x" in out and "I64 x1" in out
    assert "2 file(s): model-00001-of-00002.safetensors" in out
    assert "vocab: config 16, embedding rows 16" in out
    assert "tied embeddings: yes (model.embed_tokens.weight only on disk" in out
    assert "plan" not in out

    code, out, _ = run(capsys, model, "--json")
    info = json.loads(out)["models"][0]
    assert info["parameters"] == n_params and info["tensors"] == len(t)
    assert info["dtypes"] == {"BF16": len(t) - 1, "I64": 1}
    assert info["quantization"] is None and json.loads(out)["plan"] is None


def test_three_models_print_the_plan_grouped_by_layer(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, **SMALL)
    code, out, _ = run(capsys, ft, al, un, "--beta-rule", r"mlp\.=0.25", "--exclude", "norm")
    assert code == 0
    assert out.count("(model)") == 3
    lines = out.splitlines()
    q = next(line for line in lines if "model.layers.*.self_attn.q_proj.weight" in line)
    assert q.split()[:3] == ["2", "patch", "1"]
    up = next(line for line in lines if "model.layers.*.mlp.up_proj.weight" in line)
    assert up.split()[:3] == ["2", "patch", "0.25"]
    assert any(
        "model.layers.*.input_layernorm.weight" in line and "copy" in line and "--exclude" in line for line in lines
    )
    n = len(load_file(str(ft / "model.safetensors")))
    assert f"{n} tensors in 1 file(s)" in out

    code, out, _ = run(capsys, ft, "--aligned", al, "--unaligned", un, "--json")
    plan = json.loads(out)["plan"]
    assert sum(g["count"] for g in plan["groups"]) == plan["summary"]["tensors"] == n
    assert len(plan["groups"]) < n


def test_two_models_check_compatibility(tmp_path, capsys):
    ft, al, _ = three_models(tmp_path, ft_extra_rows=3, **SMALL)
    code, out, _ = run(capsys, ft, al)
    assert code == 0
    assert "checked the fine-tune against the aligned model only" in out
    assert "rows 16..18 are new vocabulary" in out


def test_plan_problems_are_shown_before_any_io(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(al / "model.safetensors"))
    t["model.norm.weight"] = torch.zeros(9, dtype=torch.bfloat16)
    write_model(al, t)
    code, out, err = run(capsys, ft, al, un)
    assert code == 2
    assert out.count("(model)") == 3  # the summaries still print
    assert "cannot patch" in out and "model.norm.weight" in err


def test_quantized_and_metadata_flags(tmp_path, capsys):
    t = llama_tensors(1, **SMALL)
    t["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(2, 2, dtype=torch.int32)
    (tmp_path / "q").mkdir()
    save_file(t, str(tmp_path / "q" / "model.safetensors"))  # no format metadata
    (tmp_path / "q" / "config.json").write_text(json.dumps(llama_config(**SMALL)))
    code, out, _ = run(capsys, tmp_path / "q")
    assert code == 0
    assert "QUANTIZED: tensor 'model.layers.0.mlp.up_proj.qweight' is GPTQ/AWQ" in out
    assert "no {'format': 'pt'} metadata in 1 file(s)" in out


def test_lora_adapter_and_its_merge_plan(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, **SMALL)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": "org/chat",
            }
        )
    )
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj."
        weights[p + "lora_A.weight"] = torch.randn(2, 8, generator=g)
        weights[p + "lora_B.weight"] = torch.randn(8, 2, generator=g)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    code, out, _ = run(capsys, adapter, "--base", al, "--aligned", al, "--unaligned", un)
    assert code == 0
    assert "(lora adapter)" in out and "LoRA r=2 alpha=4 (scale alpha/r)" in out
    assert "trained on: org/chat" in out and "2 LoRA module(s)" in out
    q = next(line for line in out.splitlines() if "self_attn.q_proj.weight" in line)
    assert "F32->BF16" in q and "LoRA merged in fp32" in q
    assert "merged in fp32 into base" in out

    code, out, _ = run(capsys, adapter, "--base", al, "--json")  # no pair: the merge alone
    plan = json.loads(out)["plan"]
    assert any(g["reason"] == "LoRA merged in fp32" and g["count"] == 2 for g in plan["groups"])
