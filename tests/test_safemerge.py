"""SafeMERGE: the adapter-space merge against peft's own weighted-adapter merge, and the
weight-space merge against an fp64 evaluation of W + w₁·ΔW_ft + w₂·ΔW_safe.

Tolerances: adapter space, none (the same torch ops as peft, bit for bit);
weight space, 1e-5 relative (Frobenius) on each merged layer's update.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from resta_fast import realign, rng
from resta_fast import safemerge as SM
from resta_fast.cli import main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_fixtures import lora_pair, train_adapter  # noqa: E402
from test_safelora import reference as safelora_reference  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def models(tmp_path):
    ft, safe, aligned, unaligned = lora_pair(tmp_path, targets=TARGETS, safety_alpha=16)
    cos = {m: c for m, (c, _) in safelora_reference(ft, aligned, unaligned).items()}
    tau = sorted(cos.values())[len(cos) // 2]  # a layer exactly at τ: not merged (cos < τ is strict)
    return ft, safe, aligned, unaligned, cos, tau


def run(tmp_path, ft, safe, aligned, unaligned, name="out", **kw):
    kw.setdefault("fsync", False)
    return realign.safemerge(ft, safe, tmp_path / name, aligned=aligned, unaligned=unaligned, **kw)


def peft_weighted(aligned, ft, safe, weights):
    """peft's add_weighted_adapter(linear) of the two adapters: {module: (A, B)}."""
    model = transformers.LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, ft, adapter_name="ft")
    pm.load_adapter(safe, adapter_name="safe")
    pm.add_weighted_adapter(["ft", "safe"], list(weights), "merged", combination_type="linear")
    out = {}
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            out[key] = (module.lora_A["merged"].weight.detach(), module.lora_B["merged"].weight.detach())
    return out, pm.peft_config["merged"]


def test_adapter_space_equals_peft_weighted_merge_per_layer(tmp_path, models):
    ft, safe, aligned, unaligned, cos, tau = models
    report = run(tmp_path, ft, safe, aligned, unaligned, tau=tau)
    decided = {m["module"]: m["projected"] for m in report["safemerge"]["modules"]}
    assert decided == {m: c < tau for m, c in cos.items()} and 0 < sum(decided.values()) < len(decided)
    for m in report["safemerge"]["modules"]:
        assert abs(m["cos"] - cos[m["module"]]) <= 1e-5
    mixed, cfg = peft_weighted(aligned, ft, safe, (0.8, 0.2))
    kept, _ = peft_weighted(aligned, ft, safe, (1.0, 0.0))
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    for module, is_merged in decided.items():
        want_a, want_b = (mixed if is_merged else kept)[module]
        assert torch.equal(got[f"base_model.model.{module}.lora_A.weight"], want_a), module
        assert torch.equal(got[f"base_model.model.{module}.lora_B.weight"], want_b), module
    out_cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert out_cfg["lora_alpha"] == out_cfg["r"] == cfg.r == cfg.lora_alpha
    # and peft loads it: its forward pass uses exactly the merged tensors
    model = transformers.LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, tmp_path / "out")
    for name, param in pm.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.detach(), got[name.replace(".default", "")]), name


def test_adapter_space_is_not_the_weight_space_sum(tmp_path, models):
    """The published merge mixes A and B separately: B'A' ≠ 0.8·ΔW_ft + 0.2·ΔW_safe."""
    ft, safe, aligned, unaligned, _, _ = models
    run(tmp_path, ft, safe, aligned, unaligned, tau=1.0)  # every layer merged
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    a_ft, a_s = load_file(str(ft / "adapter_model.safetensors")), load_file(str(safe / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    exact = (
        0.8 * 2 * a_ft[key.format("B")].double() @ a_ft[key.format("A")].double()
        + 0.2 * 4 * a_s[key.format("B")].double() @ a_s[key.format("A")].double()
    )
    merged = got[key.format("B")].double() @ got[key.format("A")].double()
    assert float(torch.linalg.norm(merged - exact) / torch.linalg.norm(exact)) > 0.1


def expected_weight_space(ft, safe, aligned, chosen, weights, *, density=None, seed=0):
    """{tensor: fp64 merged weight} by the formula, DARE from the torch reference stream."""
    w = load_file(str(aligned / "model.safetensors"))
    ads = [load_file(str(p / "adapter_model.safetensors")) for p in (ft, safe)]
    scales = [json.loads((p / "adapter_config.json").read_text()) for p in (ft, safe)]
    scales = [c["lora_alpha"] / c["r"] for c in scales]
    out = {}
    for key in ads[0]:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        target = module + ".weight"
        deltas = []
        for i, (ad, s) in enumerate(zip(ads, scales, strict=True)):
            d = s * ad[key.replace(".lora_A.", ".lora_B.")].double() @ ad[key].double()
            if density is not None and module in chosen:
                name = target + ("#safety" if i else "")
                keep = rng.uniform(rng.tensor_seed(seed, name), 0, d.numel()).view(d.shape) >= (1 - density)
                d = torch.where(keep, d / density, torch.zeros((), dtype=torch.float64))
            deltas.append(d)
        delta = weights[0] * deltas[0] + weights[1] * deltas[1] if module in chosen else deltas[0]
        out[target] = (w[target].double(), delta)
    return out


@pytest.mark.parametrize("combination, density", [("linear", None), ("dare_linear", 0.5)])
def test_weight_space_merge_is_exact(tmp_path, models, combination, density):
    ft, safe, aligned, unaligned, cos, tau = models
    report = run(
        tmp_path, ft, safe, aligned, unaligned, tau=tau, merge=True, combination=combination, density=density, seed=7
    )
    chosen = {m["module"] for m in report["safemerge"]["modules"] if m["projected"]}
    assert chosen == {m for m, c in cos.items() if c < tau}
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = expected_weight_space(ft, safe, aligned, chosen, (0.8, 0.2), density=density, seed=7)
    base = load_file(str(aligned / "model.safetensors"))
    for name, tensor in got.items():
        if name not in want:
            assert torch.equal(tensor, base[name]), name  # untouched tensors are the base's
            continue
        w, delta = want[name]
        err = torch.linalg.norm(tensor.double() - w - delta) / torch.linalg.norm(delta)
        assert float(err) <= 1e-5, name
    assert report["output"] == "merged" and (tmp_path / "out" / "config.json").is_file()


def test_weight_space_kept_layers_equal_the_plain_lora_merge(tmp_path, models):
    ft, safe, aligned, unaligned, _, _ = models
    run(tmp_path, ft, safe, aligned, unaligned, tau=-1.0, merge=True)  # no layer merged
    model = transformers.LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(model, ft).merge_and_unload().state_dict()
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name


def test_dare_streams_are_seeded_and_reproducible(tmp_path, models):
    ft, safe, aligned, unaligned, _, _ = models
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(
            tmp_path,
            ft,
            safe,
            aligned,
            unaligned,
            name=name,
            tau=1.0,
            merge=True,
            combination="dare_linear",
            density=0.7,
            seed=seed,
        )
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_adapter_space_dare_uses_the_spec_stream_on_a_and_b(tmp_path, models):
    ft, safe, aligned, unaligned, _, _ = models
    run(tmp_path, ft, safe, aligned, unaligned, tau=1.0, combination="dare_linear", density=0.6, seed=2)
    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    a_ft, a_s = (load_file(str(p / "adapter_model.safetensors")) for p in (ft, safe))
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    parts = []
    for tensors, scale, w, name in ((a_ft, 2.0, 0.8, key), (a_s, 4.0, 0.2, key + "#safety")):
        t = tensors[key]
        keep = rng.uniform(rng.tensor_seed(2, name), 0, t.numel()).view(t.shape) >= np.float32(1 - 0.6)
        r = np.float32(1) / (np.float32(1) - np.float32(1 - 0.6))
        parts.append(torch.where(keep, t * torch.tensor(r), torch.zeros(())) * float(np.sqrt(w * scale)))
    want = parts[0] + parts[1]
    assert float((got[key] - want).abs().max()) <= 1e-6


def _cli(tmp_path, ft, safe, aligned, unaligned, *extra):
    return main(
        [
            "safemerge",
            "--adapter",
            str(ft),
            "--safety-adapter",
            str(safe),
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
        (["--tau", "1.2"], "--tau must be a cosine in [-1, 1], got 1.2"),
        (["--weights", "0.8"], "--weights: expected 2 arguments"),
        (["--weights", "nan", "0.2"], "--weights must be a finite number"),
        (["--combination", "ties"], "invalid choice: 'ties'"),
        (["--combination", "dare_linear"], "--combination dare_linear needs --density D"),
        (["--combination", "dare_linear", "--density", "1.5"], "--density must be a fraction in (0, 1], got 1.5"),
        (["--density", "0.5"], "--density is for --combination dare_linear"),
        (["--base", "X"], "--base is the model a merge goes into; it needs --merge"),
    ],
)
def test_bad_flags_one_line_exit_2_nothing_written(tmp_path, models, capsys, flags, message):
    ft, safe, aligned, unaligned, _, _ = models
    capsys.readouterr()
    assert _cli(tmp_path, ft, safe, aligned, unaligned, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_mismatched_safety_adapters_are_refused(tmp_path, models, capsys):
    ft, _, aligned, unaligned, _, _ = models
    cases = {
        "other-modules": (
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]),
            "targets other modules than fine-tune adapter",
        ),
        "other-rank": (
            peft.LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS),
            "SafeMERGE needs adapters of the same rank and shapes",
        ),
        "with-saved": (
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"]),
            "holds full tensors (modules_to_save",
        ),
    }
    for name, (cfg, message) in cases.items():
        train_adapter(aligned, tmp_path / name, cfg, seed=9)
        capsys.readouterr()
        assert _cli(tmp_path, ft, tmp_path / name, aligned, unaligned) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "out").exists()


def test_adapter_space_refuses_rank_patterns_but_merge_accepts_them(tmp_path, models, capsys):
    _, _, aligned, unaligned, _, _ = models
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"v_proj": 2})
    train_adapter(aligned, tmp_path / "ft2", peft.LoraConfig(**cfg, rank_pattern={"down_proj": 4}), seed=1)
    train_adapter(aligned, tmp_path / "safe2", peft.LoraConfig(**cfg), seed=5)
    capsys.readouterr()
    assert _cli(tmp_path, tmp_path / "ft2", tmp_path / "safe2", aligned, unaligned) == 2
    err = capsys.readouterr().err
    assert "rank_pattern" in err and "Use --merge" in err and not (tmp_path / "out").exists()
    assert _cli(tmp_path, tmp_path / "ft2", tmp_path / "safe2", aligned, unaligned, "--merge", "--no-fsync") == 0


def test_dry_run(tmp_path, models, capsys):
    ft, safe, aligned, unaligned, _, tau = models
    capsys.readouterr()
    assert _cli(tmp_path, ft, safe, aligned, unaligned, "--tau", str(tau), "--dry-run") == 0
    assert not (tmp_path / "out").exists()
    assert f"module(s) merged (cos < {tau:g})" in capsys.readouterr().out


def test_check_helpers():
    assert SM.check_weights([1, 0]) == (1.0, 0.0)
    with pytest.raises(Exception, match="two finite numbers"):
        SM.check_weights([0.8, 0.1, 0.1])
