"""LoRA fine-tunes merged in-stream, with the real ``peft`` library as the oracle.

Tolerance: none against peft's fp32 merge. We compute W + (B @ A)·s in fp32
with the same torch matmul and op order as peft's ``get_delta_weight`` +
``merge``, and round once to the base's dtype, so the output with β·V = 0 is
bit-identical to peft's fp32 ``merge_and_unload()`` rounded to bf16/fp16.
Where peft itself rounds twice we keep the single rounding (docs/spec.md §1 asks for
the fp32 merge) and the tests bound the difference by that extra rounding
(half a bf16 ulp of the delta plus the results' own half ulps): peft's merge
into a bf16/fp16 model rounds an *embedding* delta to the model dtype before
adding it, and rounds every delta of bf16 adapter weights
(``autocast_adapter_dtype=False``). Measured on the tiny Llama: 613 of 2048
embedding elements differ from peft's bf16 merge; linear layers: 0.
"""

import json
import re

import pytest
import torch
from elementwise import patch_element
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resta_fast import api, rng
from resta_fast.cli import main
from resta_fast.errors import RestaError, cli_flag

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_fixtures import edit_config, gpt2_base, llama_base, shadow, train_adapter  # noqa: E402

OUT_NAME = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def backends():
    from resta_fast.kernels import load_backend

    names = ["torch"]
    try:
        load_backend("cpp")
        names.append("cpp")
    except Exception:  # noqa: BLE001 - the native backend is optional
        pass
    return names


def int_bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bits_equal(got: dict, want: dict, names=None):
    if names is None:
        assert got.keys() == want.keys(), f"only in got {got.keys() - want.keys()}, in want {want.keys() - got.keys()}"
        names = got
    assert names, "nothing to compare"
    for k in names:
        assert got[k].dtype == want[k].dtype, k
        diff = int((int_bits(got[k]) != int_bits(want[k])).sum())
        assert diff == 0, f"{k}: {diff} element(s) differ"


def run(tmp_path, adapter, aligned, unaligned, name="out", **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("fsync", False)
    out = tmp_path / name
    report = api.patch(adapter, out, aligned=aligned, unaligned=unaligned, **kw)
    return load_file(str(out / "model.safetensors")), report


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 5},
    ),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_equals_peft_merge_and_unload(tmp_path, name, dtype):
    base = llama_base(tmp_path / "base", dtype=dtype)
    merged = train_adapter(base, tmp_path / "adapter", peft.LoraConfig(**CONFIGS[name]))
    want = {k: v.to(dtype) for k, v in merged.items()}
    base_t = load_file(str(base / "model.safetensors"))
    # β·(A − U) with A == U is exactly 0, so the output is the rounded merge.
    for backend in backends():
        got, report = run(tmp_path, tmp_path / "adapter", base, base, name=f"out_{backend}", beta=0.7, backend=backend)
        assert sorted(got) == sorted(base_t)
        assert_bits_equal(got, want)
    changed = [k for k in got if not torch.equal(got[k], base_t[k])]
    assert changed, "the adapter should change some weights"
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    for k in changed:
        if name != "modules_to_save" or k != "lm_head.weight":
            assert plan[k]["in_dtype"] == "F32" and "LoRA merged" in plan[k]["reason"], k
        assert plan[k]["out_dtype"] == OUT_NAME[dtype].upper(), k
    assert "adapter" in report["plan"]["notes"][0]
    assert "base" in report["inputs"] and "finetuned" in report["inputs"]


def assert_within_double_rounding(got: dict, want: dict, base: dict, names):
    """|ours − peft| within the extra rounding of the delta peft does: half an ulp
    of δ (2^-8·|δ| in bf16) plus each result's own half ulp (2^-8·|x| each).
    δ is estimated as peft − W, so the bound gets a factor-2 margin on that term."""
    for k in names:
        g, w, b = got[k].float(), want[k].float(), base[k].float()
        tol = 2.0**-7 * (w - b).abs() + 2.0**-7 * torch.maximum(g.abs(), w.abs())
        assert bool(((g - w).abs() <= tol).all()), f"{k}: beyond double-rounding distance of peft"
        assert not torch.equal(g, w), f"{k}: expected peft's double rounding to show"


def test_merge_equals_peft_on_bf16_model(tmp_path):
    """peft's own merge into a bf16 model (adapter autocast to fp32, its default):
    linear layers bit-identical; embeddings within double rounding, because peft's
    Embedding.merge rounds the delta to bf16 before adding it."""
    base = llama_base(tmp_path / "base")
    train_adapter(base, tmp_path / "adapter", peft.LoraConfig(**CONFIGS["patterns"]))
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    want = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    got, _ = run(tmp_path, tmp_path / "adapter", base, base, beta=0.0)
    embed = "model.embed_tokens.weight"
    assert_bits_equal(got, want, [k for k in got if k != embed])
    assert_within_double_rounding(got, want, load_file(str(base / "model.safetensors")), [embed])


def test_bf16_adapter_weights_within_double_rounding_of_peft(tmp_path):
    """peft merging bf16 adapter weights (autocast_adapter_dtype=False) rounds each
    delta to bf16 first; we keep it in fp32 (docs/spec.md §1)."""
    base = llama_base(tmp_path / "base")
    adapter = tmp_path / "adapter"
    train_adapter(base, adapter, peft.LoraConfig(**CONFIGS["plain"]))
    t = {k: v.to(torch.bfloat16) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    save_file(t, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    want = pm.merge_and_unload().state_dict()
    got, _ = run(tmp_path, adapter, base, base, beta=0.0)
    B = load_file(str(base / "model.safetensors"))
    targeted = [k for k in got if not torch.equal(got[k], B[k])]
    assert len(targeted) == 6
    assert_within_double_rounding(got, want, B, targeted)
    assert_bits_equal(got, want, [k for k in got if k not in targeted])


def test_gpt2_conv1d_fan_in_fan_out_rslora_and_lora_bias(tmp_path):
    base = gpt2_base(tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, fan_in_fan_out=True, lora_bias=True, target_modules=["c_attn", "c_proj"]
    )
    merged = train_adapter(base, tmp_path / "adapter", config, cls=transformers.GPT2LMHeadModel)
    for backend in backends():
        got, _ = run(tmp_path, tmp_path / "adapter", base, base, name=f"out_{backend}", beta=0.5, backend=backend)
        assert "lm_head.weight" not in got  # GPT-2 ties it; not on disk
        assert_bits_equal(got, {k: v for k, v in merged.items() if k != "lm_head.weight"})
    base_t = load_file(str(base / "model.safetensors"))
    bias = "transformer.h.0.attn.c_attn.bias"
    assert not torch.equal(got[bias], base_t[bias])


@pytest.mark.parametrize("dare", [None, 0.4])
def test_realigned_output_is_merge_then_spec_formula(tmp_path, dare):
    """θ = merge(base, adapter) [fp32, peft] then docs/spec.md §2 per element, bit for bit."""
    base = llama_base(tmp_path / "base")
    un = shadow(base, tmp_path / "unaligned")
    merged = train_adapter(base, tmp_path / "adapter", peft.LoraConfig(**CONFIGS["patterns"]))
    A = load_file(str(base / "model.safetensors"))
    U = load_file(str(un / "model.safetensors"))
    beta, seed = 0.75, 5
    for backend in backends():
        got, report = run(
            tmp_path,
            tmp_path / "adapter",
            base,
            un,
            name=f"out_{backend}",
            beta=beta,
            dare=dare,
            seed=seed,
            backend=backend,
            chunk_elems=100,
        )
        assert set(got) == set(merged)
        for name in got:
            f = merged[name].reshape(-1).numpy()
            a = A[name].float().reshape(-1).numpy()
            u = U[name].float().reshape(-1).numpy()
            s = rng.tensor_seed(seed, name)
            want = [
                patch_element(f[i], a[i], u[i], a[i] if dare else None, beta, dare or 0.0, s, i, "bf16")
                for i in range(f.size)
            ]
            got_bits = (int_bits(got[name]).reshape(-1).int() & 0xFFFF).tolist()
            assert got_bits == want, f"{backend}: {name} differs from merge-then-docs/spec.md §2"


def test_tied_embedding_lora_without_lm_head_on_disk(tmp_path):
    base = llama_base(tmp_path / "base", tie=True)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    merged = train_adapter(
        base, tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    )
    got, _ = run(tmp_path, tmp_path / "adapter", base, base, beta=0.5)
    assert "lm_head.weight" not in got
    assert_bits_equal(got, {k: v.bfloat16() for k, v in merged.items() if k != "lm_head.weight"})
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, merged["lm_head.weight"].bfloat16())


def test_tied_embedding_lora_with_lm_head_on_disk_keeps_them_equal(tmp_path):
    base = llama_base(tmp_path / "base", tie=True)
    merged = train_adapter(
        base, tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"])
    )
    t = load_file(str(base / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    un = shadow(base, tmp_path / "un")
    u = load_file(str(un / "model.safetensors"))
    u["lm_head.weight"] = u["model.embed_tokens.weight"].clone()  # tied there too
    save_file(u, str(un / "model.safetensors"), metadata={"format": "pt"})
    got, report = run(tmp_path, tmp_path / "adapter", base, un, beta=0.5, dare=0.3, seed=1)
    assert torch.equal(int_bits(got["lm_head.weight"]), int_bits(got["model.embed_tokens.weight"]))
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    assert "LoRA merged" in plan["lm_head.weight"]["reason"]
    assert not torch.equal(merged["model.embed_tokens.weight"].bfloat16(), t["model.embed_tokens.weight"])


def test_resized_vocab_modules_to_save(tmp_path):
    """Added tokens: embed/lm_head in modules_to_save with more rows than the base."""
    base = llama_base(tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "tokenizer_config.json").write_text('{"added": true}')
    merged = train_adapter(
        base,
        tmp_path / "adapter",
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        resize=70,
    )
    got, report = run(tmp_path, tmp_path / "adapter", base, shadow(base, tmp_path / "un"), beta=0.0)
    assert got["lm_head.weight"].shape == (70, 32)
    assert_bits_equal(got, {k: v.bfloat16() for k, v in merged.items()})
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    assert "new vocabulary" in plan["model.embed_tokens.weight"]["reason"]
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 70
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 64  # input untouched
    assert (out / "tokenizer_config.json").read_text() == '{"added": true}'
    transformers.LlamaForCausalLM.from_pretrained(out)


def test_key_spellings_default_adapter_name_and_prefixes(tmp_path):
    """``.default`` adapter names, no ``base_model.model.`` prefix, module names
    without the base's ``model.`` prefix: all read as the same adapter."""
    base = llama_base(tmp_path / "base")
    adapter = tmp_path / "adapter"
    train_adapter(base, adapter, peft.LoraConfig(**CONFIGS["plain"]))
    ref, _ = run(tmp_path, adapter, base, base, name="ref", beta=0.0)
    t = load_file(str(adapter / "adapter_model.safetensors"))
    for spell in (
        lambda k: k.replace("base_model.model.", "").replace(".weight", ".default.weight"),
        lambda k: k.replace("base_model.model.model.", "base_model.model."),
    ):
        save_file({spell(k): v for k, v in t.items()}, str(adapter / "adapter_model.safetensors"))
        got, _ = run(tmp_path, adapter, base, base, name="out", beta=0.0, overwrite=True)
        assert_bits_equal(got, ref)


def test_dare_base_defaults_to_base_and_cli_base_flag(tmp_path, capsys):
    """--base differs from --aligned: the output has the base's layout; DARE uses the base."""
    base = llama_base(tmp_path / "base", seed=3)
    al = llama_base(tmp_path / "aligned", seed=4)
    un = shadow(al, tmp_path / "un")
    merged = train_adapter(base, tmp_path / "adapter", peft.LoraConfig(**CONFIGS["plain"]))
    out = tmp_path / "out"
    code = main(
        [
            "patch",
            "--finetuned",
            str(tmp_path / "adapter"),
            "--base",
            str(base),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--out",
            str(out),
            "--beta",
            "0.5",
            "--dare",
            "0.5",
            "--seed",
            "2",
            "--backend",
            "torch",
            "--no-fsync",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    got = load_file(str(out / "model.safetensors"))
    B, A, U = (load_file(str(d / "model.safetensors")) for d in (base, al, un))
    name = "model.layers.1.self_attn.q_proj.weight"
    s = rng.tensor_seed(2, name)
    f, a, u, b = (x.float().reshape(-1).numpy() for x in (merged[name], A[name], U[name], B[name]))
    want = [patch_element(f[i], a[i], u[i], b[i], 0.5, 0.5, s, i, "bf16") for i in range(f.size)]
    assert (int_bits(got[name]).reshape(-1).int() & 0xFFFF).tolist() == want
    report = json.loads((out / "resta_fast.json").read_text())
    # The base is recorded by its content and its directory's name, not the aligned model's.
    from resta_fast.io.checkpoint import Checkpoint

    assert report["inputs"]["base"]["files"] == Checkpoint(base).fingerprint() != report["inputs"]["aligned"]["files"]
    assert report["sources"]["base"] == {"name": base.name}


# --- what we refuse, and how it is said -------------------------------------------------


@pytest.fixture()
def adapter_setup(tmp_path):
    base = llama_base(tmp_path / "base")
    train_adapter(base, tmp_path / "adapter", peft.LoraConfig(**CONFIGS["plain"]))
    return base, tmp_path / "adapter"


def edit_weights(adapter, fn):
    path = adapter / "adapter_model.safetensors"
    t = fn(load_file(str(path)))
    save_file(t, str(path), metadata={"format": "pt"})


def first_key(t, part):
    return next(k for k in t if part in k)


REFUSALS = {
    "dora_config": (lambda b, a: edit_config(a, use_dora=True), r"DoRA \(use_dora=true\) is not supported"),
    "dora_weights": (
        lambda b, a: edit_weights(
            a, lambda t: {**t, first_key(t, "lora_A").replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)}
        ),
        r"lora_magnitude_vector.*DoRA",
    ),
    "not_lora": (lambda b, a: edit_config(a, peft_type="IA3"), r"peft_type IA3 is not supported"),
    "rank_mismatch": (lambda b, a: edit_config(a, r=8), r"rank 4 in the weights but 8"),
    "quantized_config": (
        lambda b, a: (b / "config.json").write_text(
            json.dumps(
                {
                    **json.loads((b / "config.json").read_text()),
                    "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
                }
            )
        ),
        r"quantization_config \(bitsandbytes\).*unquantized",
    ),
    "gptq_tensors": (
        lambda b, a: save_file(
            {
                **load_file(str(b / "model.safetensors")),
                "model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 8, dtype=torch.int32),
            },
            str(b / "model.safetensors"),
        ),
        r"qweight.*GPTQ",
    ),
    "matches_nothing": (
        lambda b, a: edit_weights(a, lambda t: {k.replace("self_attn", "attention"): v for k, v in t.items()}),
        r"match no tensor of base",
    ),
    "embedding_layout": (
        lambda b, a: edit_weights(
            a,
            lambda t: {
                **t,
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 32),
                "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 4),
            },
        ),
        r"embedding layout is not supported",
    ),
    "pickle_only": (
        lambda b, a: ((a / "adapter_model.safetensors").unlink(), (a / "adapter_model.bin").write_bytes(b"x")),
        r"adapter_model.bin: not a zip-format torch checkpoint",
    ),
    "unknown_lora_part": (
        lambda b, a: edit_weights(
            a, lambda t: {**t, "base_model.model.model.layers.0.mlp.down_proj.lora_C.weight": torch.zeros(2)}
        ),
        r"LoRA part resta_fast does not know",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_adapters_get_a_clear_error(tmp_path, adapter_setup, capsys, case):
    base, adapter = adapter_setup
    damage, message = REFUSALS[case]
    damage(base, adapter)
    out = tmp_path / "out"
    code = main(
        [
            "patch",
            "--finetuned",
            str(adapter),
            "--aligned",
            str(base),
            "--unaligned",
            str(base),
            "--out",
            str(out),
            "--backend",
            "torch",
            "--no-fsync",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("resta-fast: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def test_base_flag_errors(tmp_path, adapter_setup):
    base, adapter = adapter_setup
    # The library speaks of its options by name; the CLI renders them as its flags.
    with pytest.raises(RestaError, match="^base is only for LoRA adapters") as info:
        api.patch(base, tmp_path / "o", aligned=base, unaligned=base, base=base)
    assert info.value.render(cli_flag).startswith("--base is only for LoRA adapters")
    api.make_vector(base, base, tmp_path / "vec", fsync=False)
    with pytest.raises(RestaError, match="is a LoRA adapter: pass base,") as info:
        api.patch(adapter, tmp_path / "o", vector=tmp_path / "vec")
    assert "is a LoRA adapter: pass --base," in info.value.render(cli_flag)
    with pytest.raises(RestaError, match="PEFT adapter, not a full model"):
        api.patch(base, tmp_path / "o", aligned=adapter, unaligned=base)


def test_vector_mode_with_base(tmp_path, adapter_setup):
    base, adapter = adapter_setup
    un = shadow(base, tmp_path / "un")
    api.make_vector(base, un, tmp_path / "vec", fsync=False)
    pair, _ = run(tmp_path, adapter, base, un, name="pair", beta=0.5, dare=0.2, seed=3)
    vec = tmp_path / "vec_out"
    api.patch(
        adapter, vec, vector=tmp_path / "vec", base=base, beta=0.5, dare=0.2, seed=3, backend="torch", fsync=False
    )
    assert_bits_equal(load_file(str(vec / "model.safetensors")), pair)


def test_prepare_shares_the_lora_base_with_aligned_and_dare(tmp_path, adapter_setup):
    """The LoRA base that is the aligned model, and the DARE base that is the
    LoRA base, are the same Checkpoint object (staged once per chunk)."""
    from resta_fast.lora import LoraFinetuned

    base, adapter = adapter_setup
    un = shadow(base, tmp_path / "un")
    options = api.PatchOptions(dare=0.2, backend="torch")
    with api.prepare(adapter, aligned=base, unaligned=un, options=options) as prepared:
        cks = prepared.checkpoints
        assert prepared.roles.lora and prepared.roles.base == str(base) == prepared.roles.dare_base
        assert isinstance(cks["finetuned"], LoraFinetuned)
        assert cks["base"] is cks["aligned"] is cks["dare_base"] is prepared.inputs.dare_base
        assert prepared.input_paths == [adapter, base, un, base, base]
        assert prepared.plan.notes[0].startswith(cks["finetuned"].summary()[:20])
    other = tmp_path / "base_copy"
    other.mkdir()
    for f in base.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    with api.prepare(adapter, aligned=base, unaligned=un, base=other, options=options) as prepared:
        cks = prepared.checkpoints
        assert cks["base"] is not cks["aligned"] and cks["dare_base"] is cks["base"]
        assert str(cks["base"].path) == str(other)


def test_modules_to_save_on_one_side_of_tied_embeddings_is_refused(tmp_path):
    base = llama_base(tmp_path / "base", tie=True)
    adapter = tmp_path / "adapter"
    train_adapter(base, adapter, peft.LoraConfig(**CONFIGS["plain"]))
    edit_weights(adapter, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(64, 32)})
    with pytest.raises(RestaError, match=r"replaces lm_head.weight \(modules_to_save\) but the base ties it"):
        run(tmp_path, adapter, base, base)
    # Both sides saved (peft's ensure_weight_tying): accepted, the output stays tied.
    edit_weights(adapter, lambda t: {**t, "base_model.model.model.embed_tokens.weight": torch.ones(64, 32)})
    got, _ = run(tmp_path, adapter, base, base, beta=0.0)
    assert "lm_head.weight" not in got and bool((got["model.embed_tokens.weight"] == 1).all())
