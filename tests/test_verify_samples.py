"""`resta-fast verify --against` end to end, and resta_fast/verify/samples.py: bit-exact recomputation of a
seeded sample (the inputs are in test_verify_inputs.py, the rebuilt plan in test_verify_against.py)."""

import json
import shutil

import pytest
import torch
from checkpoints import three_models
from safetensors.torch import load_file, save_file
from verify_fixtures import SMALL, checks, patched_output

from resta_fast import api, rng
from resta_fast.cli import main
from resta_fast.io.digest import sha256_file
from resta_fast.kernels import reference
from resta_fast.verify import samples as samples_module
from resta_fast.verify import verify
from resta_fast.verify.samples import patch_at, uniform_at


@pytest.fixture(params=["native", "torch"])
def recompute(request, monkeypatch):
    """Both ways verify recomputes its sample: the C++ kernel on numpy (no torch) and,
    where the kernel is not built, the torch reference."""
    if request.param == "native" and samples_module._native_kernel() is None:
        pytest.skip("the C++ kernel is not built")
    if request.param == "torch":
        monkeypatch.setattr(samples_module, "_native_kernel", lambda: None)
    return request.param


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return patched_output(tmp_path_factory.mktemp("verify"))


def test_clean_output_passes_every_check(patched, capsys, recompute):
    _, ft, al, un, out = patched
    for against in ([], [str(ft), str(al), str(un)]):
        result = verify(out, against, samples=100_000)  # more than the elements: all are checked
        assert result["ok"], result
        c = checks(result)
        assert set(c) == {"report", "sha256", "headers", "inputs", "plan", "sample"}
        assert c["sample"]["detail"].endswith("match bit for bit (seed 0)")
    assert main(["verify", str(out), "--against", "--samples", "2000"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[-1] == "PASS" and "sample: " in text


def test_sample_catches_a_wrong_value_even_with_matching_hashes(patched, tmp_path, recompute):
    """A wrong element whose file hash was 'fixed' up too: only recomputation can tell."""
    _, ft, al, un, out = patched
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    shard = bad / "model-00001-of-00002.safetensors"
    name = "model.layers.0.self_attn.q_proj.weight"
    if name not in load_file(str(shard)):
        shard = bad / "model-00002-of-00002.safetensors"
    from resta_fast.io.reader import SafetensorsFile

    f = SafetensorsFile(shard)
    start = f.tensors[name].start + 2 * 5  # element 5 (bf16)
    f.close()
    data = bytearray(shard.read_bytes())
    data[start] ^= 0x01
    shard.write_bytes(bytes(data))
    report = json.loads((bad / "resta_fast.json").read_text())
    report["files"][shard.name] = sha256_file(shard)
    (bad / "resta_fast.json").write_text(json.dumps(report))
    assert verify(bad)["ok"]  # hashes and headers alone cannot see it
    result = verify(bad, [], samples=100_000)
    c = checks(result)
    assert not result["ok"] and c["sha256"]["ok"] and not c["sample"]["ok"]
    assert c["sample"]["problems"][0].startswith(f"{name}: 1 of 64 sampled elements differ, e.g. element 5:")


def test_vector_mode_dtype_override_and_extra_vocab(tmp_path, recompute):
    ft, al, un = three_models(tmp_path, ft_extra_rows=3, dtype=torch.float16, **SMALL)
    vec = tmp_path / "vec"
    api.make_vector(al, un, vec, fsync=False)
    assert verify(vec, [str(al), str(un)], samples=100_000)["ok"]
    out = tmp_path / "out"
    api.patch(
        ft,
        out,
        vector=vec,
        dare_base=al,
        beta=0.75,
        dare=0.5,
        seed=3,
        dtype="bfloat16",
        exclude=["norm"],
        backend="torch",
        fsync=False,
    )
    result = verify(out, [str(ft), str(vec)], dare_base=str(al), samples=100_000)
    assert result["ok"], result
    with pytest.raises(Exception, match="pass it with --dare-base"):
        verify(out, [str(ft), str(vec)])


def test_uniform_at_and_patch_at_match_the_reference_backend():
    seed = rng.tensor_seed(5, "w")
    idx = torch.arange(3, 1000, dtype=torch.int64)
    assert torch.equal(uniform_at(seed, idx), rng.uniform(seed, 3, len(idx)))
    g = torch.Generator().manual_seed(0)
    f, a, u, b = (torch.randn(len(idx), generator=g).to(torch.bfloat16) for _ in range(4))
    want = torch.empty(len(idx), dtype=torch.bfloat16)
    reference.patch_into(want, f, a, u, b, beta=0.7, p=0.4, seed=seed, offset=3)
    got = torch.empty_like(want)
    patch_at(got, f, a, u, b, beta=0.7, p=0.4, seed=seed, idx=idx)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_lora_output_recomputes_through_the_merge(tmp_path):
    """A LoRA patch: verify opens the adapter on its base and recomputes the merged values."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    un = tmp_path / "un"
    un.mkdir()
    t = {k: (v.float() + 0.01).to(v.dtype) for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(t, str(un / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", un / "config.json")
    out = tmp_path / "out"
    api.patch(
        tmp_path / "adapter", out, aligned=base, unaligned=un, beta=0.5, dare=0.1, seed=2, backend="torch", fsync=False
    )
    # The inputs named (no paths recorded); the LoRA and DARE bases are the aligned model by content.
    result = verify(out, [str(tmp_path / "adapter"), str(base), str(un)], samples=100_000)
    assert result["ok"], result
    total = sum(v.numel() for v in load_file(str(out / "model.safetensors")).values())
    assert checks(result)["sample"]["detail"].startswith(f"{total} elements")  # every element
