"""Safe LoRA against an independent fp64 evaluation of the published formula.

The reference forms C = V·Vᵀ/‖V‖_F in fp64 (as the authors' code does, in
fp32), takes B' = C·B and cos = cosine(vec(B'·A), vec(B·A)) rounded to 5
decimals. Tolerances (the issue's): B' within 1e-5 relative (Frobenius) of the
fp64 value; cosines equal after rounding, or one rounding step (1e-5) apart
when the fp32 and fp64 values straddle a rounding boundary.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resta_fast import realign
from resta_fast import safelora as SL
from resta_fast.cli import main
from resta_fast.errors import RestaError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_fixtures import edit_config, gpt2_base, llama_base, shadow, train_adapter  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def reference(adapter, aligned, unaligned, *, transpose=False):
    """{module: (cos rounded, B' fp64)} by the formula, C formed in fp64."""
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    al = load_file(str(aligned / "model.safetensors"))
    un = load_file(str(unaligned / "model.safetensors"))
    out = {}
    for key in ad:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        a = ad[key].double()
        b = ad[key.replace(".lora_A.", ".lora_B.")].double()
        v = al[module + ".weight"].double() - un[module + ".weight"].double()
        v = v.T if transpose else v
        c = v @ v.T / torch.linalg.norm(v)
        b_proj = c @ b
        cos = torch.nn.functional.cosine_similarity((b_proj @ a).reshape(1, -1), (b @ a).reshape(1, -1)).item()
        out[module] = (float(np.round(cos, 5)), b_proj)
    return out


def setup_models(tmp_path, *, dtype=torch.float32, targets=TARGETS, adapter_dtype=None):
    aligned = llama_base(tmp_path / "aligned", dtype=dtype)
    unaligned = shadow(aligned, tmp_path / "unaligned")
    train_adapter(aligned, tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    if adapter_dtype is not None:
        path = tmp_path / "adapter" / "adapter_model.safetensors"
        save_file(
            {k: v.to(adapter_dtype) for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"}
        )
    return tmp_path / "adapter", aligned, unaligned


def run(tmp_path, adapter, aligned, unaligned, name="out", **kw):
    kw.setdefault("fsync", False)
    return realign.safelora(adapter, tmp_path / name, aligned=aligned, unaligned=unaligned, **kw)


def assert_cos_close(got, want):
    assert abs(got - want) <= 1e-5 + 1e-12, (got, want)


def rel_fro(x, y):
    return float(torch.linalg.norm(x.double() - y.double()) / torch.linalg.norm(y.double()))


def _fallback(monkeypatch):
    """Score as a build without the C++ kernel does: V by torch, the products by numpy's BLAS."""
    from resta_fast.kernels.difference import _TorchDifference

    monkeypatch.setattr(SL, "difference_kernel", lambda: ("torch", _TorchDifference))


@pytest.fixture(params=["native", "fallback"])
def scoring(request, monkeypatch):
    """Each test using it runs on the C++ products (kernels.cpp.diff_matmul) and on the fallback."""
    from resta_fast.kernels.difference import difference_kernel

    if request.param == "native" and difference_kernel()[0] != "cpp":
        pytest.skip("the C++ kernel is not built")
    if request.param == "fallback":
        _fallback(monkeypatch)
    calls = []
    real = SL.native_projection
    monkeypatch.setattr(SL, "native_projection", lambda *a: calls.append(1) or real(*a))
    yield request.param
    assert bool(calls) == (request.param == "native")  # the path under test is the one that ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosines_and_projection_match_fp64_reference(tmp_path, dtype, scoring):
    adapter, aligned, unaligned = setup_models(tmp_path, dtype=dtype)
    ref = reference(adapter, aligned, unaligned)
    report = run(tmp_path, adapter, aligned, unaligned, threshold=1.0)  # project everything
    mods = {m["module"]: m for m in report["safelora"]["modules"]}
    assert set(mods) == set(ref) and len(ref) == 2 * len(TARGETS)
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for module, (cos, b_proj) in ref.items():
        assert_cos_close(mods[module]["cos"], cos)
        assert mods[module]["projected"]
        key = f"base_model.model.{module}.lora_B.weight"
        assert rel_fro(out[key], b_proj) <= 1e-5, module


def test_factored_projection_never_forms_c_and_matches_formed_c():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(96, 40, generator=g)
    b = torch.randn(96, 8, generator=g)
    a = torch.randn(8, 40, generator=g)
    v64, b64, a64 = v.double(), b.double(), a.double()
    want = (v64 @ v64.T / torch.linalg.norm(v64)) @ b64
    got = SL.projected_b(v, b)
    assert rel_fro(got, want) <= 1e-5
    cos_want = torch.nn.functional.cosine_similarity((want @ a64).reshape(1, -1), (b64 @ a64).reshape(1, -1)).item()
    assert abs(SL.lora_cosine(a, b, got) - cos_want) <= 1e-6
    assert SL.projected_b(torch.zeros(96, 40), b) is None  # V = 0: nothing to project onto
    assert SL.lora_cosine(a, torch.zeros(96, 8), torch.zeros(96, 8)) == 0.0


def test_threshold_selects_cos_at_most_t_and_keeps_the_rest_byte_identical(tmp_path):
    adapter, aligned, unaligned = setup_models(tmp_path)
    ref = reference(adapter, aligned, unaligned)
    cosines = sorted(c for c, _ in ref.values())
    t = (cosines[2] + cosines[3]) / 2  # three modules below, the rest above
    report = run(tmp_path, adapter, aligned, unaligned, threshold=t)
    projected = {m["module"] for m in report["safelora"]["modules"] if m["projected"]}
    assert projected == {m for m, (c, _) in ref.items() if c <= t} and len(projected) == 3
    src = tmp_path / "adapter" / "adapter_model.safetensors"
    dst = tmp_path / "out" / "adapter_model.safetensors"
    with safe_open(str(src), "pt") as fs, safe_open(str(dst), "pt") as fd:
        assert list(fs.keys()) == list(fd.keys())
        for key in fs.keys():
            x, y = fs.get_tensor(key), fd.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            same = torch.equal(x.view(torch.uint8), y.view(torch.uint8))
            assert same == ("lora_A" in key or module not in projected), key
    # the config comes along unchanged but for the local path peft recorded of the base (its last
    # part: nothing private is published); the adapter's own card is replaced by the output's card
    cfg_in = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert Path(cfg_in["base_model_name_or_path"]).is_absolute()
    assert cfg_out == {**cfg_in, "base_model_name_or_path": Path(cfg_in["base_model_name_or_path"]).name}
    card = (tmp_path / "out" / "README.md").read_text()
    assert card != (tmp_path / "adapter" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert {"lora", "safelora"} <= set(front["tags"]) and front["library_name"] == "peft"
    assert "base_model" not in front and "base_model_relation" not in front  # no input came from the Hub
    assert "3 of 8 projected" in card and "resta-fast safelora --adapter" in card
    saved = json.loads((tmp_path / "out" / "resta_fast.json").read_text())
    assert saved["command"] == "safelora" and saved["safelora"]["projected"] == 3
    assert set(saved["files"]) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    assert set(saved["inputs"]) == {"adapter", "aligned", "unaligned"}


def test_num_layers_projects_the_k_lowest(tmp_path):
    adapter, aligned, unaligned = setup_models(tmp_path)
    ref = reference(adapter, aligned, unaligned)
    lowest = {m for m, _ in sorted(ref.items(), key=lambda kv: kv[1][0])[:3]}
    report = run(tmp_path, adapter, aligned, unaligned, num_layers=3)
    assert {m["module"] for m in report["safelora"]["modules"] if m["projected"]} == lowest
    assert report["safelora"]["selection"]["threshold_used"] == sorted(c for c, _ in ref.values())[2]


def test_select_ties_and_unchanged_modules():
    scores = [SL.ModuleScore(str(i), "w", "a", "b", [2, 2], 1, c) for i, c in enumerate([0.3, 0.1, 0.3, None, 0.9])]
    assert SL.select(scores, num_layers=2) == 0.3
    assert [s.projected for s in scores] == [True, True, True, False, False]  # ties at T project too, as published
    assert SL.select(scores, threshold=1.0) == 1.0 and not scores[3].projected  # V = 0: never projected
    with pytest.raises(RestaError, match="more than the 4 LoRA module"):
        SL.select(scores, num_layers=5)


def test_loads_in_peft_and_merge_equals_peft_merge_of_the_written_adapter(tmp_path):
    adapter, aligned, unaligned = setup_models(tmp_path)
    run(tmp_path, adapter, aligned, unaligned, num_layers=4)
    run(tmp_path, adapter, aligned, unaligned, name="merged", num_layers=4, merge=True)
    model = transformers.LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for name, param in pm.named_parameters():
        if "lora_B" in name:
            key = name.replace(".default", "")
            assert torch.equal(param.detach(), written[key]), name
    want = pm.merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(got) == set(want) - {"lm_head.weight"} or set(got) == set(want)
    for k, v in got.items():
        assert torch.equal(v, want[k].to(v.dtype)), k
    report = json.loads((tmp_path / "merged" / "resta_fast.json").read_text())
    assert report["output"] == "merged" and report["plan"]["mode"] == "merge"
    assert (tmp_path / "merged" / "config.json").is_file()


def test_gpt2_conv1d_layout(tmp_path, scoring):
    aligned = gpt2_base(tmp_path / "aligned")
    unaligned = shadow(aligned, tmp_path / "unaligned")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    train_adapter(aligned, tmp_path / "adapter", cfg, cls=transformers.GPT2LMHeadModel)
    ref = reference(tmp_path / "adapter", aligned, unaligned, transpose=True)
    report = run(tmp_path, tmp_path / "adapter", aligned, unaligned, threshold=1.0)
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for m in report["safelora"]["modules"]:
        cos, b_proj = ref[m["module"]]
        assert_cos_close(m["cos"], cos)
        assert rel_fro(out[f"base_model.model.{m['module']}.lora_B.weight"], b_proj) <= 1e-5


def test_bf16_adapter_rounds_b_once_to_bf16(tmp_path):
    adapter, aligned, unaligned = setup_models(tmp_path, adapter_dtype=torch.bfloat16)
    ref = reference(adapter, aligned, unaligned)
    run(tmp_path, adapter, aligned, unaligned, threshold=1.0)
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for module, (_, b_proj) in ref.items():
        got = out[f"base_model.model.{module}.lora_B.weight"]
        assert got.dtype == torch.bfloat16
        assert rel_fro(got, b_proj) <= 2**-8  # one bf16 rounding of a value within 1e-5 of b_proj


def test_dry_run_writes_nothing_and_prints_the_decisions(tmp_path, capsys):
    adapter, aligned, unaligned = setup_models(tmp_path)
    rc = main(
        [
            "safelora",
            "--adapter",
            str(adapter),
            "--aligned",
            str(aligned),
            "--unaligned",
            str(unaligned),
            "--num-layers",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--dry-run",
        ]
    )
    assert rc == 0 and not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "2 of 8 module(s) projected" in text and "model.layers.0.self_attn.q_proj" in text


def _cli(tmp_path, adapter, aligned, unaligned, *extra):
    return main(
        [
            "safelora",
            "--adapter",
            str(adapter),
            "--aligned",
            str(aligned),
            "--unaligned",
            str(unaligned),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threshold", "1.5"], "--threshold must be a cosine in [-1, 1], got 1.5"),
        (["--threshold", "nan"], "--threshold must be a finite number"),
        (["--num-layers", "9"], "--num-layers 9 is more than the 8 LoRA module(s)"),
        (["--num-layers", "0"], "--num-layers must be an integer >= 1"),
        ([], "one of the arguments --threshold --num-layers is required"),
        (["--threshold", "0.5", "--num-layers", "2"], "not allowed with argument"),
        (["--threshold", "0.5", "--base", "X"], "--base is the model a merge goes into; it needs --merge"),
    ],
)
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, capsys, flags, message):
    adapter, aligned, unaligned = setup_models(tmp_path)
    capsys.readouterr()
    assert _cli(tmp_path, adapter, aligned, unaligned, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys):
    adapter, aligned, unaligned = setup_models(tmp_path)
    other = llama_base(tmp_path / "other", dtype=torch.float32)
    cfg = json.loads((other / "config.json").read_text())
    # an unaligned model of another width: V cannot be formed
    small = {
        k: v[..., :16].contiguous() if v.ndim == 2 else v
        for k, v in load_file(str(other / "model.safetensors")).items()
    }
    (tmp_path / "narrow").mkdir()
    save_file(small, str(tmp_path / "narrow" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "narrow" / "config.json").write_text(json.dumps(cfg))
    cases = {
        "aligned": ((adapter, aligned, tmp_path / "narrow"), "they must be the same architecture"),
        "missing": ((adapter, aligned, tmp_path / "nowhere"), "does not exist"),
    }
    for what, ((ad, al, un), message) in cases.items():
        capsys.readouterr()
        assert _cli(tmp_path, ad, al, un, "--threshold", "0.5") == 2, what
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (what, err)
        assert not (tmp_path / "out").exists()
    for changes, message in (({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "peft_type IA3")):
        bad = tmp_path / f"bad-{next(iter(changes))}"
        bad.mkdir()
        for f in adapter.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        edit_config(bad, **changes)
        capsys.readouterr()
        assert _cli(tmp_path, bad, aligned, unaligned, "--threshold", "0.5") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists()


def test_adapter_targets_missing_from_the_models(tmp_path, capsys):
    adapter, aligned, unaligned = setup_models(tmp_path)
    gpt2 = gpt2_base(tmp_path / "gpt2")
    gpt2_un = shadow(gpt2, tmp_path / "gpt2-un")
    capsys.readouterr()
    assert _cli(tmp_path, adapter, gpt2, gpt2_un, "--threshold", "0.5") == 2
    err = capsys.readouterr().err
    assert "match no tensor of base" in err and "trained on as --aligned" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_embedding_lora_is_refused(tmp_path, capsys):
    aligned = llama_base(tmp_path / "aligned", dtype=torch.float32)
    unaligned = shadow(aligned, tmp_path / "unaligned")
    train_adapter(
        aligned, tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    )
    capsys.readouterr()
    assert _cli(tmp_path, tmp_path / "adapter", aligned, unaligned, "--threshold", "0.5") == 2
    err = capsys.readouterr().err
    assert "embedding LoRA" in err and "Safe LoRA projects linear LoRA layers only" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_projection_is_within_1e5_of_fp64_on_a_large_weight():
    """At 2048 × 2048, torch's fp32 norm alone is 9.5e-5 off; ‖V‖_F is accumulated in fp64."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(2048, 2048, generator=g) * 0.01
    b = torch.randn(2048, 16, generator=g) * 0.02
    v64, b64 = v.double(), b.double()
    want = v64 @ (v64.T @ b64) / torch.linalg.norm(v64)
    assert rel_fro(SL.projected_b(v, b), want) <= 1e-5


def test_alignment_delta_cpp_and_torch_agree_bit_for_bit(tmp_path):
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.kernels.difference import difference_kernel

    backend, kernel = difference_kernel()
    if backend != "cpp":
        pytest.skip("the C++ kernel is not built")
    aligned = llama_base(tmp_path / "aligned", dtype=torch.bfloat16)
    unaligned = shadow(aligned, tmp_path / "unaligned")
    al, un = Checkpoint(aligned), Checkpoint(unaligned)
    name = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(al.info(name).shape)
    fast = SL.alignment_delta(al, un, name, name, shape, kernel)
    ref = SL.alignment_delta(al, un, name, name, shape)
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32)) and fast.abs().sum() > 0


def _fp64_projection(v64, b64, a64):
    want = v64 @ (v64.T @ b64) / np.linalg.norm(v64)
    x, y = (want @ a64).reshape(-1), (b64 @ a64).reshape(-1)
    return want, float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_chunked_projection_reuses_one_buffer_across_shapes_and_layouts(monkeypatch):
    """Modules of different shapes in a row, bigger then smaller, in both layouts, V formed a few
    rows at a time into one Workspace poisoned with NaN before each: every element of V must be
    written (a stale or skipped one gives NaN) and B' and the cosine must match fp64."""
    monkeypatch.setattr(SL, "CHUNK_ELEMS", 3 * 40 + 7)  # chunks of a few rows, a partial last one
    rng = np.random.default_rng(5)
    work = SL.Workspace()
    chunks = []
    for d_out, d_in, transpose in [(96, 40, False), (40, 96, True), (128, 72, False), (7, 5, True), (1, 130, False)]:
        v64 = rng.standard_normal((d_out, d_in)) * 0.01
        b64, a64 = rng.standard_normal((d_out, 4)) * 0.02, rng.standard_normal((4, d_in)) * 0.02
        stored = np.ascontiguousarray((v64.T if transpose else v64).astype(np.float32)).reshape(-1)
        calls = []

        def fill(lo, hi, out, stored=stored, calls=calls):
            calls.append((lo, hi))
            out[:] = stored[lo:hi]

        if work._v.size:
            work._v[:] = np.nan
        b = b64.astype(np.float32)
        got = SL.module_projection(fill, (d_in, d_out) if transpose else (d_out, d_in), transpose, b, work)
        rows, cols = (d_in, d_out) if transpose else (d_out, d_in)
        assert len(calls) == -(-rows // max(1, SL.CHUNK_ELEMS // cols))
        chunks.append(len(calls))
        assert [lo for lo, _ in calls] == [0] + [hi for _, hi in calls[:-1]] and calls[-1][1] == d_out * d_in
        want, cos64 = _fp64_projection(v64.astype(np.float32).astype(np.float64), b64.astype(np.float32), a64)
        assert got.shape == (d_out, 4) and got.dtype == np.float32
        assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5, (d_out, d_in, transpose)
        assert abs(SL.lora_cosine(a64.astype(np.float32), b, got) - cos64) <= 1e-6
    assert chunks == [32, 32, 128, 1, 1]  # several chunks each, but the one-chunk weight and the single wide row
    assert work._v.size == 128 * 72  # grown to the largest, never shrunk
    assert (
        SL.module_projection(lambda lo, hi, out: out.fill(0), (9, 4), False, np.ones((9, 2), np.float32), work) is None
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_scoring_end_to_end_matches_fp64_reference(tmp_path, monkeypatch, arch):
    """The whole command with V in chunks of a few rows: q/v/up/down (shapes change module to module)
    and GPT-2's transposed Conv1D layout, against the fp64 formula."""
    monkeypatch.setattr(SL, "CHUNK_ELEMS", 200)
    if arch == "llama":
        adapter, aligned, unaligned = setup_models(tmp_path)
        ref = reference(adapter, aligned, unaligned)
    else:
        aligned = gpt2_base(tmp_path / "aligned")
        unaligned = shadow(aligned, tmp_path / "unaligned")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
        adapter = tmp_path / "adapter"
        train_adapter(aligned, adapter, cfg, cls=transformers.GPT2LMHeadModel)
        ref = reference(adapter, aligned, unaligned, transpose=True)
    report = run(tmp_path, adapter, aligned, unaligned, threshold=1.0)
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {m["module"] for m in report["safelora"]["modules"]} == set(ref)
    for m in report["safelora"]["modules"]:
        cos, b_proj = ref[m["module"]]
        assert_cos_close(m["cos"], cos)
        assert rel_fro(out[f"base_model.model.{m['module']}.lora_B.weight"], b_proj) <= 1e-5, m["module"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lora_array_and_stored_equal_the_torch_path_bit_for_bit(tmp_path, dtype):
    """The numpy reads of A and B widen exactly as ``lora_tensor`` does, and B' is rounded to the
    adapter's dtype with the same bits as the torch reference (docs/spec.md §2)."""
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.io.reader import NUMPY_STORAGE
    from resta_fast.kernels.reference import store
    from resta_fast.lora import LoraFinetuned

    adapter, aligned, _ = setup_models(tmp_path, adapter_dtype=dtype)
    view = LoraFinetuned(adapter, Checkpoint(aligned))
    for mod in SL.linear_modules(view):
        for key in (mod.a, mod.b):
            got, want = SL.lora_array(view, key), view.lora_tensor(key)
            assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.view(torch.int32).numpy())
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    x[0, :3] = torch.tensor([float("nan"), 2.0**-130, 65520.0])  # NaN, a subnormal, an fp16 overflow
    name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    got = realign._stored(x.numpy(), name)
    want = torch.empty(x.shape, dtype=dtype)
    store(want.view(-1), x.reshape(-1))
    assert got.shape == (64, 4) and got.dtype == np.dtype(NUMPY_STORAGE[name])
    back = realign._as_tensor(got, name)
    assert back.dtype == dtype
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(back), nan) and nan.sum() == 1  # NaN payloads may differ (docs/spec.md §2)
    assert torch.equal(back[~nan].view(torch.uint8), want[~nan].view(torch.uint8))


def test_the_adapter_path_does_not_import_torch(tmp_path):
    """torch's import alone took longer than reading a 1.2B model (docs/benchmarks.md): with the
    C++ kernel, `resta-fast safelora` writing an adapter never imports it."""
    import subprocess
    import sys

    from resta_fast.kernels.difference import difference_kernel

    if difference_kernel()[0] != "cpp":
        pytest.skip("the C++ kernel is not built")
    adapter, aligned, unaligned = setup_models(tmp_path, dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    code = (
        "import sys; from resta_fast.cli import main; "
        f"rc = main(['safelora', '--adapter', {str(adapter)!r}, '--aligned', {str(aligned)!r}, '--unaligned', "
        f"{str(unaligned)!r}, '--threshold', '1.0', '--out', {str(tmp_path / 'out')!r}, "
        "'--no-progress', '--no-fsync']); "
        "print(rc, 'torch' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split()[-2:] == ["0", "False"], res.stdout + res.stderr
    ref = reference(adapter, aligned, unaligned)
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for module, (_, b_proj) in ref.items():
        assert rel_fro(out[f"base_model.model.{module}.lora_B.weight"], b_proj) <= 2**-8, module


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_native_and_fallback_scoring_agree(tmp_path, monkeypatch, arch):
    """The C++ products and the fallback (torch V, numpy BLAS) give the same rounded cosines, and
    B' within 1e-6 of each other, in both layouts; and V = 0 gives no projection on either."""
    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.kernels.difference import difference_kernel
    from resta_fast.lora import LoraFinetuned

    if difference_kernel()[0] != "cpp":
        pytest.skip("the C++ kernel is not built")
    if arch == "llama":
        adapter, aligned, unaligned = setup_models(tmp_path, dtype=torch.bfloat16)
    else:
        aligned = gpt2_base(tmp_path / "aligned")
        unaligned = shadow(aligned, tmp_path / "unaligned")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
        adapter = tmp_path / "adapter"
        train_adapter(aligned, adapter, cfg, cls=transformers.GPT2LMHeadModel)

    def scored(un):
        view = LoraFinetuned(adapter, Checkpoint(aligned))
        return [(s.module, s.cos, None if b is None else b.copy()) for s, b in SL.score_modules(view, Checkpoint(un))]

    native = scored(unaligned)
    assert any(b is not None for _, _, b in native)
    with monkeypatch.context() as m:
        _fallback(m)
        fallback = scored(unaligned)
        fallback_same = scored(aligned)  # unaligned = aligned: V = 0 everywhere
    assert [(n, c) for n, c, _ in native] == [(n, c) for n, c, _ in fallback]
    for (module, _, x), (_, _, y) in zip(native, fallback, strict=True):
        assert x.dtype == np.float32 and np.linalg.norm(x - y) <= 1e-6 * np.linalg.norm(y), module
    assert all(c is None and b is None for _, c, b in scored(aligned)) and all(c is None for _, c, _ in fallback_same)


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


def test_scoring_leaves_no_adapter_page_mapped_and_keeps_b_proj_out_of_memory(tmp_path):
    """RSS does not grow with the adapter: its pages are dropped once read, and every module's B'
    goes to the spill file (read back, equal, for the selection that writes it)."""
    if not Path("/proc/self/smaps").is_file():
        pytest.skip("needs Linux's /proc/self/smaps")
    adapter, aligned, unaligned = setup_models(tmp_path, dtype=torch.bfloat16)
    weights = (adapter / "adapter_model.safetensors").resolve()
    with realign.Session(adapter, aligned=aligned, unaligned=unaligned) as session:
        session.ft.adapter.file.array(next(iter(session.ft.adapter.file.tensors)))[:].sum()  # touched: mapped
        assert _mapped_kib(weights) > 0
        scores = session.scores()
        assert _mapped_kib(weights) == 0
        kept = session._projections
        assert isinstance(kept, SL.Spill) and len(kept) == len(scores) == 2 * len(TARGETS)
        view = session.ft
        direct = {s.module: b for s, b in SL.score_modules(view, session.un) if b is not None}
        for s in scores:
            stored = kept[s.lora_b]
            want = realign._stored(direct[s.module], view.adapter.file.tensors[s.lora_b].dtype)
            assert np.array_equal(stored.view(np.uint8), want.view(np.uint8)) and stored.shape == want.shape
