"""End-to-end `patch`: bit-exact outputs, layout, metadata, transformers loading."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from checkpoints import llama_config, llama_tensors, three_models, write_model
from elementwise import patch_element, to_f32
from safetensors import safe_open
from safetensors.torch import load_file

from resta_fast import api, rng
from resta_fast.errors import RestaError

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}
NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> list[int]:
    width = 0xFFFF if t.element_size() == 2 else 0xFFFFFFFF
    return [int(x) & width for x in t.reshape(-1).view(INT_VIEW[t.dtype]).tolist()]


def expected(name, f, a, u, b, beta, p, seed, out_dtype, patched=None):
    """Element-by-element docs/spec.md §2 output bits for one tensor."""
    fb, ab = bits(f), bits(a)
    ub = bits(u) if u is not None else None
    bb = bits(b) if b is not None else None
    s = rng.tensor_seed(seed, name)
    n = len(fb) if patched is None else patched
    out = []
    for i in range(len(fb)):
        fv = to_f32(fb[i], NAMES[f.dtype])
        if i >= n:
            from elementwise import from_f32

            out.append(fb[i] if f.dtype == out_dtype else from_f32(fv, NAMES[out_dtype]))
            continue
        out.append(
            patch_element(
                fv,
                to_f32(ab[i], NAMES[a.dtype]),
                None if ub is None else to_f32(ub[i], NAMES[u.dtype]),
                None if bb is None else to_f32(bb[i], NAMES[b.dtype]),
                beta,
                p,
                s,
                i,
                NAMES[out_dtype],
            )
        )
    return out


def run_patch(tmp_path, ft, al, un, **kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("fsync", False)
    out = tmp_path / "out"
    report = api.patch(ft, out, aligned=al, unaligned=un, **kw)
    return out, report


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dare", [None, 0.3])
def test_patch_bit_exact_against_elementwise(tmp_path, dtype, dare):
    ft, al, un = three_models(tmp_path, dtype=dtype, **SMALL)
    # chunk_elems=7 puts chunk boundaries mid-counter and mid-row.
    out, report = run_patch(tmp_path, ft, al, un, beta=0.5, dare=dare, seed=11, chunk_elems=7)
    got = load_file(str(out / "model.safetensors"))
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    assert set(got) == set(F), "every fine-tuned tensor must be in the output, and nothing else"
    for name, t in got.items():
        want = expected(name, F[name], A[name], U[name], A[name] if dare else None, 0.5, dare or 0.0, 11, dtype)
        assert bits(t) == want, f"{name}: output differs from the docs/spec.md §2 element reference"
    assert report["plan"]["summary"]["patch"] == len(got)


def test_chunking_does_not_change_bits(tmp_path):
    ft, al, un = three_models(tmp_path, shards=2)
    outs = []
    for chunk in (5, 1000, 1 << 20):
        out = tmp_path / f"out{chunk}"
        api.patch(
            ft,
            out,
            aligned=al,
            unaligned=un,
            beta=0.7,
            dare=0.5,
            seed=3,
            backend="torch",
            fsync=False,
            chunk_elems=chunk,
        )
        outs.append({f: (out / f).read_bytes() for f in os.listdir(out) if f.endswith(".safetensors")})
    assert len(outs[0]) == 2, f"expected both shards in the output, found {sorted(outs[0])}"
    assert outs[0] == outs[1] == outs[2]


def test_vector_mode_is_bit_identical_to_pair(tmp_path):
    ft, al, un = three_models(tmp_path)
    api.make_vector(al, un, tmp_path / "vec", fsync=False)
    pair, _ = run_patch(tmp_path, ft, al, un, beta=0.5, dare=0.2, seed=9)
    vec = tmp_path / "out_vec"
    api.patch(ft, vec, vector=tmp_path / "vec", dare_base=al, beta=0.5, dare=0.2, seed=9, backend="torch", fsync=False)
    assert (pair / "model.safetensors").read_bytes()[-4096:] == (vec / "model.safetensors").read_bytes()[-4096:]
    a, b = load_file(str(pair / "model.safetensors")), load_file(str(vec / "model.safetensors"))
    assert a and a.keys() == b.keys(), f"pair only {a.keys() - b.keys()}, vector only {b.keys() - a.keys()}"
    assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)
    v = load_file(str(tmp_path / "vec" / "model.safetensors"))
    assert v.keys() == a.keys()
    assert all(t.dtype == torch.float32 for t in v.values())


def test_extra_vocab_rows_keep_finetune_values(tmp_path):
    ft, al, un = three_models(tmp_path, ft_extra_rows=5, **SMALL)
    out, report = run_patch(tmp_path, ft, al, un, beta=1.0)
    got = load_file(str(out / "model.safetensors"))
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape == F[name].shape
        assert torch.equal(got[name][16:].view(torch.int16), F[name][16:].view(torch.int16))
        want = expected(name, F[name][:16], A[name], U[name], None, 1.0, 0.0, 0, torch.bfloat16)
        assert bits(got[name][:16]) == want
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    assert "new vocabulary" in plan["lm_head.weight"]["reason"]


def test_other_shape_mismatch_is_an_error_naming_tensor(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(al / "model.safetensors"))
    t["model.norm.weight"] = torch.zeros(9, dtype=torch.bfloat16)
    write_model(al, t)
    with pytest.raises(RestaError, match=r"model.norm.weight.*finetuned \[8\].*aligned \[9\]"):
        run_patch(tmp_path, ft, al, un, beta=1.0)
    assert not (tmp_path / "out").exists()


def test_rules_include_exclude_and_copies(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(ft / "model.safetensors"))
    t["model.rotary.inv_freq_steps"] = torch.arange(4, dtype=torch.int64)
    write_model(ft, t)
    out, report = run_patch(
        tmp_path,
        ft,
        al,
        un,
        beta=1.0,
        beta_rules=[r"mlp\.=0.25"],
        exclude=[r"norm"],
        include=[r"layers|lm_head|norm|inv_freq"],
    )
    plan = {t["name"]: t for f in report["plan"]["files"] for t in f["tensors"]}
    assert plan["model.layers.0.mlp.up_proj.weight"]["beta"] == 0.25
    assert plan["model.layers.0.self_attn.q_proj.weight"]["beta"] == 1.0
    assert plan["model.norm.weight"]["action"] == "copy"
    assert plan["model.embed_tokens.weight"]["reason"] == "not matched by --include"
    assert "non-float" in plan["model.rotary.inv_freq_steps"]["reason"]
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["model.rotary.inv_freq_steps"], torch.arange(4))
    assert torch.equal(got["model.norm.weight"], t["model.norm.weight"])


def test_missing_tensor_is_copied_and_reported(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(un / "model.safetensors"))
    del t["model.norm.weight"]
    write_model(un, t)
    out, report = run_patch(tmp_path, ft, al, un, beta=1.0)
    assert any("missing from unaligned" in n for n in report["plan"]["notes"])
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["model.norm.weight"], load_file(str(ft / "model.safetensors"))["model.norm.weight"])


def test_dtype_mismatch_computes_in_fp32_and_keeps_finetune_dtype(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    for d in (al, un):
        t = {k: v.to(torch.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
        write_model(d, t)
    out, report = run_patch(tmp_path, ft, al, un, beta=0.5)
    assert any("different dtypes" in n for n in report["plan"]["notes"])
    got = load_file(str(out / "model.safetensors"))
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name].dtype == torch.bfloat16
    assert bits(got[name]) == expected(name, F[name], A[name], U[name], None, 0.5, 0.0, 0, torch.bfloat16)


def test_output_dtype_override_converts_copies_too(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    out, _ = run_patch(tmp_path, ft, al, un, beta=0.5, dtype="float32", exclude=["norm"])
    got = load_file(str(out / "model.safetensors"))
    F = load_file(str(ft / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in got.values())
    assert torch.equal(got["model.norm.weight"], F["model.norm.weight"].float())


def test_nonfinite_inputs_are_counted(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    t = load_file(str(ft / "model.safetensors"))
    t["model.norm.weight"][:3] = float("nan")
    write_model(ft, t)
    _, report = run_patch(tmp_path, ft, al, un, beta=0.5)
    assert report["stats"]["nonfinite_outputs"] == {"model.norm.weight": 3}
    assert any("non-finite" in n for n in report["plan"]["notes"])


def test_sharded_layout_metadata_and_side_files(tmp_path):
    ft, al, un = three_models(tmp_path, shards=3)
    (ft / "tokenizer_config.json").write_text("{}")
    (ft / "generation_config.json").write_text('{"do_sample": false}')
    out, report = run_patch(tmp_path, ft, al, un, beta=0.5, dare=0.1, seed=5)
    src_index = json.loads((ft / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    for shard in set(src_index["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f, safe_open(str(ft / shard), "pt") as g:
            assert list(f.keys()) == list(g.keys())
            meta = f.metadata()
            assert meta["format"] == "pt"
            prov = json.loads(meta["resta_fast"])
            assert prov["params"]["beta"] == 0.5 and prov["params"]["dare"] == 0.1
            assert prov["params"]["seed"] == 5 and "finetuned" in prov["inputs"]
    for side in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (ft / side).read_bytes()
    saved = json.loads((out / "resta_fast.json").read_text())
    import hashlib

    assert set(src_index["weight_map"].values()) <= set(saved["files"]), "every shard must have its digest"
    for name, digest in saved["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_inputs_are_never_modified(tmp_path):
    ft, al, un = three_models(tmp_path, shards=2)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in (ft, al, un) for p in d.iterdir()}
    run_patch(tmp_path, ft, al, un, beta=0.5, dare=0.3)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in (ft, al, un) for p in d.iterdir()}
    assert before == after


def test_tied_embeddings_stay_tied_with_dare(tmp_path):
    cfg = llama_config(**SMALL, tie=True)
    models = []
    for seed in (1, 2, 3):
        t = llama_tensors(seed, **SMALL)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        models.append(write_model(tmp_path / f"m{seed}", t, config=cfg))
    out = tmp_path / "out"
    api.patch(
        models[2], out, aligned=models[0], unaligned=models[1], beta=0.5, dare=0.5, seed=1, backend="torch", fsync=False
    )
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["lm_head.weight"].view(torch.int16), got["model.embed_tokens.weight"].view(torch.int16))


def test_transformers_loads_output_with_expected_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    kw = {"vocab": 64, "hidden": 32, "layers": 2, "inter": 48}
    ft, al, un = three_models(tmp_path, dtype=torch.float32, **kw)
    out, _ = run_patch(tmp_path, ft, al, un, beta=0.5)
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    F, A, U = (load_file(str(d / "model.safetensors")) for d in (ft, al, un))
    manual = {k: F[k] + torch.tensor(0.5) * (A[k] - U[k]) for k in F}  # fp32: separate ops
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(**kw, heads=4)))
    ref.load_state_dict(manual)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref.eval()(ids).logits)


def test_sigkill_mid_write_leaves_no_complete_looking_output(tmp_path):
    ft, al, un = three_models(tmp_path, vocab=4096, hidden=256, layers=2, inter=512, shards=2)
    out = tmp_path / "out"
    args = [
        "patch",
        "--finetuned",
        str(ft),
        "--aligned",
        str(al),
        "--unaligned",
        str(un),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--no-progress",
    ]
    script = (
        f"import sys, time; sys.path.insert(0, {os.getcwd()!r})\n"
        "import resta_fast.pipeline.engine as engine\n"
        "orig = engine._Pass._finish_tensor\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(0.05)\n"
        "engine._Pass._finish_tensor = slow\n"
        "from resta_fast.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not any(".resta-tmp-" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave the final output directory"
    leftovers = [p for p in tmp_path.iterdir() if ".resta-tmp-" in p.name]
    assert leftovers, "the test should have killed the run mid-write"
    assert not (leftovers[0] / "resta_fast.json").exists()


# --- the prepare step --------------------------------------------------------


def test_prepare_resolves_roles_and_shares_the_dare_base_with_aligned(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    options = api.PatchOptions(beta=0.5, dare=0.2, seed=7, backend="torch")
    with api.prepare(ft, aligned=al, unaligned=un, options=options) as prepared:
        inputs, cks = prepared.inputs, prepared.checkpoints
        assert inputs.dare_base is inputs.aligned is cks["aligned"] is cks["dare_base"]  # one object, read once
        assert inputs.finetuned is cks["finetuned"] and inputs.unaligned is cks["unaligned"]
        assert inputs.vector is None and cks["base"] is None
        assert prepared.roles.dare_base == str(al) and not prepared.roles.lora
        assert prepared.input_paths == [ft, al, un, al]
        assert (prepared.command, prepared.device, prepared.backend_name) == ("patch", "cpu", "torch")
        assert prepared.kernel is not None and prepared.plan.summary()["patch"] > 0
        assert prepared.provenance["params"] == options.params()
        assert set(prepared.provenance["inputs"]) == {"finetuned", "aligned", "unaligned", "dare_base"}
        report = api.execute(prepared, tmp_path / "out", fsync=False)
    assert report["params"] == options.params()
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name != api.REPORT_NAME}
    api.patch(ft, tmp_path / "ref", aligned=al, unaligned=un, beta=0.5, dare=0.2, seed=7, backend="torch", fsync=False)
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir() if p.name != api.REPORT_NAME}
    # the inputs were closed when the with block ended
    assert all(f._fd is None for ck in inputs.all() for f in ck.files.values())


def test_prepare_with_a_shared_opener_gives_one_object_per_path(tmp_path):
    from contextlib import ExitStack

    ft, al, un = three_models(tmp_path, **SMALL)
    with ExitStack() as stack:
        opener = api.Opener(stack)
        a = api.prepare(ft, aligned=al, unaligned=un, opener=opener, options=api.PatchOptions(backend="torch"))
        b = api.prepare(
            ft, aligned=al, unaligned=un, opener=opener, options=api.PatchOptions(beta=0.3, dare=0.1, backend="torch")
        )
        assert a.inputs.aligned is b.inputs.aligned is b.inputs.dare_base
        assert a.inputs.unaligned is b.inputs.unaligned and a.inputs.finetuned is b.inputs.finetuned
        assert a.stack is None  # the opener's stack owns the inputs
    with pytest.raises(RestaError, match="^dare needs the model"):
        api.prepare(ft, vector=al, options=api.PatchOptions(dare=0.1))


def test_prepare_here_false_checks_without_a_kernel(tmp_path):
    ft, al, un = three_models(tmp_path, **SMALL)
    with api.prepare(ft, aligned=al, unaligned=un, options=api.PatchOptions(device="cuda:3"), here=False) as prepared:
        assert prepared.kernel is None and prepared.device == "cuda:3"
        with pytest.raises(ValueError, match="here=True"):
            api.execute(prepared, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_api_imports_nothing_from_eval():
    code = (
        "import sys, resta_fast.api, resta_fast.cli, resta_fast.verify; "
        "print(sorted(m for m in sys.modules if m.startswith('resta_fast.eval')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
