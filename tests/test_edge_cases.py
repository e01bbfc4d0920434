"""What real model zoos throw at a patcher: tied embeddings, padded vocabularies,
mixed dtypes, prefix mismatches, buffers, missing metadata, pickle and quantized inputs."""

import json
import re

import pytest
import torch
from checkpoints import llama_config, llama_tensors, three_models, write_model
from elementwise import patch_element
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resta_fast import api
from resta_fast.cli import main
from resta_fast.errors import RestaError

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}
OUT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def int_bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def spec_bits(name, f, a, u, beta, out_dtype, rows=None):
    """docs/spec.md §2 output bits (no DARE) of the first ``rows`` rows, element by element."""
    if rows is not None:
        f, a, u = f[:rows], a[:rows], u[:rows]
    fv, av, uv = (x.float().reshape(-1).numpy() for x in (f, a, u))
    return [patch_element(fv[i], av[i], uv[i], None, beta, 0.0, 0, i, OUT[out_dtype]) for i in range(fv.size)]


def bits_list(t):
    mask = 0xFFFF if t.element_size() == 2 else 0xFFFFFFFF
    return (int_bits(t).reshape(-1).long() & mask).tolist()


def patch(tmp_path, ft, al, un, name="out", **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("fsync", False)
    report = api.patch(ft, tmp_path / name, aligned=al, unaligned=un, **kw)
    return load_file(str(tmp_path / name / "model.safetensors")), report


def cli(capsys, *argv):
    code = main([*map(str, argv), "--backend", "torch", "--no-fsync", "--no-progress"])
    return code, capsys.readouterr().err


def tied_models(root, *, lm_head_on_disk=(False, False, False), kw=SMALL):
    """(ft, aligned, unaligned), all tie_word_embeddings; lm_head stored where asked."""
    paths = []
    for seed, keep, role in zip((3, 1, 2), lm_head_on_disk, ("ft", "aligned", "unaligned"), strict=True):
        t = llama_tensors(seed, **kw)
        if keep:
            t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        else:
            del t["lm_head.weight"]
        paths.append(write_model(root / role, t, config=llama_config(**kw, tie=True)))
    return paths


def set_config(path, **kw):
    """three_models writes the default (hidden 32) config; match the tensors for transformers."""
    (path / "config.json").write_text(json.dumps(llama_config(**kw)))


def load_causal_lm(path):
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_tied_embeddings_without_lm_head_on_disk(tmp_path):
    ft, al, un = tied_models(tmp_path)
    got, _ = patch(tmp_path, ft, al, un, beta=0.5)
    assert "lm_head.weight" not in got
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    name = "model.embed_tokens.weight"
    assert bits_list(got[name]) == spec_bits(name, F[name], A[name], U[name], 0.5, torch.bfloat16)
    model = load_causal_lm(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.model.embed_tokens.weight, got[name].float())


@pytest.mark.parametrize(
    "on_disk", [(True, False, False), (True, True, True), (False, True, True)], ids=["ft-only", "all", "aligned-only"]
)
def test_tied_embeddings_with_lm_head_on_disk_stay_tied(tmp_path, on_disk):
    """Whoever stores lm_head, a tied fine-tune's output keeps embed == lm_head."""
    ft, al, un = tied_models(tmp_path, lm_head_on_disk=on_disk)
    got, report = patch(tmp_path, ft, al, un, beta=0.5, dare=0.4, seed=7)
    if on_disk[0]:
        assert torch.equal(int_bits(got["lm_head.weight"]), int_bits(got["model.embed_tokens.weight"]))
        plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
        assert plan["lm_head.weight"]["action"] == "patch"
    if on_disk == (True, False, False):
        assert any("ties its LM head" in n for n in report["plan"]["notes"])
    model = load_causal_lm(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_untied_finetune_against_tied_aligned_pair(tmp_path):
    """lm_head of an untied fine-tune is patched with the tied pair's embedding difference."""
    _, al, un = tied_models(tmp_path)
    ft = write_model(tmp_path / "ft_untied", llama_tensors(3, **SMALL), config=llama_config(**SMALL))
    got, _ = patch(tmp_path, ft, al, un, beta=0.5)
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    embed = "model.embed_tokens.weight"
    assert bits_list(got["lm_head.weight"]) == spec_bits(
        "lm_head.weight", F["lm_head.weight"], A[embed], U[embed], 0.5, torch.bfloat16
    )


def test_added_tokens_and_vocab_padded_to_multiple_of_64(tmp_path):
    """Aligned vocab 100; the fine-tune added 1 token and padded to 128 rows."""
    kw = {"vocab": 100, "hidden": 8, "layers": 1, "inter": 12}
    ft, al, un = three_models(tmp_path, ft_extra_rows=28, **kw)
    set_config(ft, **{**kw, "vocab": 128})
    got, report = patch(tmp_path, ft, al, un, beta=1.0)
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == (128, 8)
        assert torch.equal(int_bits(got[name][100:]), int_bits(F[name][100:]))
        assert bits_list(got[name][:100]) == spec_bits(name, F[name], A[name], U[name], 1.0, torch.bfloat16, rows=100)
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    assert "rows 100..127 are new vocabulary" in plan["lm_head.weight"]["reason"]
    assert load_causal_lm(tmp_path / "out").lm_head.weight.shape == (128, 8)


def test_fewer_rows_than_aligned_is_an_error(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(al / "model.safetensors"))
    for d in (al, un):
        t = load_file(str(d / "model.safetensors"))
        t["lm_head.weight"] = torch.cat([t["lm_head.weight"], t["lm_head.weight"][:4]])
        write_model(d, t)
    with pytest.raises(RestaError, match=r"lm_head.weight: finetuned shape \[16, 8\] vs aligned \[20, 8\]"):
        patch(tmp_path, ft, al, un)


def test_fp16_finetune_with_bf16_aligned(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = {k: v.to(torch.float16) for k, v in load_file(str(ft / "model.safetensors")).items()}
    write_model(ft, t)
    got, report = patch(tmp_path, ft, al, un, beta=0.5)
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    assert set(got) == set(F), "every fine-tuned tensor must be in the output, and nothing else"
    assert all(v.dtype == torch.float16 for v in got.values())
    for name in got:
        assert bits_list(got[name]) == spec_bits(name, F[name], A[name], U[name], 0.5, torch.float16), name
    assert any("different dtypes" in n for n in report["plan"]["notes"])


def rename(path, fn):
    t = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    save_file({fn(k): v for k, v in t.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("spelling", ["no-prefix", "other-prefix"])
def test_prefix_mismatch_is_mapped(tmp_path, spelling):
    ft, al, un = three_models(tmp_path, **SMALL)
    ref, _ = patch(tmp_path, ft, al, un, name="ref", beta=0.5, dare=0.3, seed=4)
    if spelling == "no-prefix":  # e.g. a bare LlamaModel save: layers.0..., no lm_head
        rename(al, lambda k: k.removeprefix("model."))
    else:
        rename(un, lambda k: "transformer." + k.removeprefix("model."))
    got, report = patch(tmp_path, ft, al, un, beta=0.5, dare=0.3, seed=4)
    for k in ref:
        assert torch.equal(int_bits(got[k]), int_bits(ref[k])), k
    note = next(n for n in report["plan"]["notes"] if "under other names" in n)
    assert re.search(r"finetuned model\.\S+ = (aligned|unaligned) (transformer\.)?\S+", note), note


def test_unrelated_names_are_a_clear_error(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, **SMALL)
    rename(al, lambda k: k.replace("model.", "gpt_neox.").replace("layers", "blocks").replace("weight", "w"))
    code, err = cli(capsys, "patch", "--finetuned", ft, "--aligned", al, "--unaligned", un, "--out", tmp_path / "out")
    assert code == 2
    assert "aligned" in err and "shares no tensor names with finetuned" in err
    assert "model.embed_tokens.weight" in err and "gpt_neox." in err  # examples from both sides
    assert not (tmp_path / "out").exists()


def test_non_float_buffers_are_copied_byte_for_byte(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    buffers = {
        "model.causal_mask": torch.tril(torch.ones(4, 4, dtype=torch.bool)),
        "model.token_type": torch.arange(6, dtype=torch.uint8),
        "model.position_ids": torch.arange(8, dtype=torch.int64).reshape(1, 8),
        "model.layers.0.self_attn.rotary.inv_freq": torch.rand(4, dtype=torch.float64),
        "model.ids32": torch.arange(-3, 3, dtype=torch.int32),
    }

    def other(v):  # aligned/unaligned hold different values: the fine-tune's must win
        return ~v if v.dtype == torch.bool else v + 1

    for d in (ft, al, un):
        t = load_file(str(d / "model.safetensors"))
        write_model(d, {**t, **{k: v if d == ft else other(v) for k, v in buffers.items()}})
    got, report = patch(tmp_path, ft, al, un, beta=0.5)
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    for name, value in buffers.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
        assert plan[name]["action"] == "copy"
    assert "non-float dtype I64" in plan["model.position_ids"]["reason"]
    assert "float dtype F64 is not patched" in plan["model.layers.0.self_attn.rotary.inv_freq"]["reason"]


def test_inputs_without_format_metadata_are_accepted(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    for d in (ft, al, un):
        t = load_file(str(d / "model.safetensors"))
        save_file(t, str(d / "model.safetensors"))  # no __metadata__ at all
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert not (f.metadata() or {}).get("format")
    set_config(ft, **SMALL)
    patch(tmp_path, ft, al, un, beta=0.5)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["resta_fast"])["params"]["beta"] == 0.5
    load_causal_lm(tmp_path / "out")


def test_a_legacy_pytorch_model_bin_is_refused_with_a_resave_hint(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, **SMALL)
    (ft / "model.safetensors").unlink()
    (ft / "pytorch_model.bin").write_bytes(b"\x80\x02 not unpickled")
    code, err = cli(capsys, "patch", "--finetuned", ft, "--aligned", al, "--unaligned", un, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pytorch_model.bin" in err and "legacy (pre-1.6, non-zip) torch format" in err and "torch.save" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["config", "tensors"])
def test_quantized_full_finetune_is_refused(tmp_path, capsys, how):
    ft, al, un = three_models(tmp_path, **SMALL)
    if how == "config":
        cfg = json.loads((ft / "config.json").read_text())
        (ft / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    else:
        t = load_file(str(ft / "model.safetensors"))
        t["model.layers.0.mlp.up_proj.absmax"] = torch.ones(3)
        write_model(ft, t)
    code, err = cli(capsys, "patch", "--finetuned", ft, "--aligned", al, "--unaligned", un, "--out", tmp_path / "out")
    assert code == 2
    assert "finetuned" in err and ("gptq" in err if how == "config" else "bitsandbytes 4-bit" in err)
    assert "unquantized" in err
