"""plan.py on tiny fake checkpoints: which tensors are patched, how, and why not."""

import pytest
import torch
from checkpoints import llama_config, write_model

from resta_fast.errors import OptionError, RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.plan import BetaRule, build_plan, copy_plan

BF = torch.bfloat16


def w(*shape, dtype=BF):
    return torch.ones(*shape, dtype=dtype)


BASE = {
    "model.embed_tokens.weight": w(6, 4),
    "model.layers.0.self_attn.q_proj.weight": w(4, 4),
    "model.layers.0.mlp.up_proj.weight": w(8, 4),
    "model.norm.weight": w(4),
    "lm_head.weight": w(6, 4),
}


def ck(tmp_path, name, tensors, *, shards=1, config=None) -> Checkpoint:
    return Checkpoint(write_model(tmp_path / name, tensors, shards=shards, config=config), role=name)


def trio(tmp_path, ft=None, al=None, un=None, **kw):
    """(finetuned, aligned, unaligned) Checkpoints, each defaulting to BASE."""
    return (
        ck(tmp_path, "finetuned", BASE if ft is None else ft, **kw),
        ck(tmp_path, "aligned", BASE if al is None else al),
        ck(tmp_path, "unaligned", BASE if un is None else un),
    )


def by_name(plan):
    return {t.name: t for t in plan.tensors()}


def test_every_tensor_is_patched_in_the_fine_tunes_files_and_order(tmp_path):
    F, A, U = trio(tmp_path, shards=2)
    plan = build_plan(F, aligned=A, unaligned=U, beta=0.7)
    assert [f.name for f in plan.files] == list(F.files)
    assert [[t.name for t in f.tensors] for f in plan.files] == [list(s.tensors) for s in F.files.values()]
    for t in plan.tensors():
        assert (t.action, t.reason, t.beta, t.seed_name) == ("patch", "", 0.7, t.name), t
        assert (t.in_dtype, t.out_dtype, t.patched_elems) == ("BF16", "BF16", t.numel), t
    assert plan.summary() == {"tensors": 5, "patch": 5, "files": 2}
    assert (plan.mode, plan.dare, plan.notes) == ("pair", False, [])


def test_vector_mode_and_dare_flag(tmp_path):
    F, A, U = trio(tmp_path)
    plan = build_plan(F, vector=A, dare_base=U)
    assert (plan.mode, plan.dare, plan.summary()["patch"]) == ("vector", True, 5)
    with pytest.raises(OptionError):
        build_plan(F, aligned=A, unaligned=U, vector=A)
    with pytest.raises(OptionError):
        build_plan(F, aligned=A)


def test_missing_tensor_is_copied_with_a_note(tmp_path):
    un = {k: v for k, v in BASE.items() if k != "model.norm.weight"}
    al = {k: v for k, v in un.items() if k != "lm_head.weight"}
    F, A, U = trio(tmp_path, al=al, un=un)
    plan = by_name(build_plan(F, aligned=A, unaligned=U))
    norm = plan["model.norm.weight"]
    assert (norm.action, norm.reason) == ("copy", "missing from aligned and unaligned")
    assert (plan["lm_head.weight"].action, plan["lm_head.weight"].reason) == ("copy", "missing from aligned")
    assert plan["model.norm.weight"].beta is None and plan["model.norm.weight"].patched_elems == 0
    notes = build_plan(F, aligned=A, unaligned=U).notes
    assert "2 tensor(s) missing from aligned, copied unpatched from the fine-tune" in notes[0]
    assert "1 tensor(s) missing from unaligned" in notes[1] and "model.norm.weight" in notes[1]


def test_extra_vocabulary_rows_patch_only_the_shared_rows(tmp_path):
    ft = dict(BASE, **{"model.embed_tokens.weight": w(9, 4), "lm_head.weight": w(9, 4)})
    F, A, U = trio(tmp_path, ft=ft)
    plan = by_name(build_plan(F, aligned=A, unaligned=U))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = plan[name]
        assert (t.action, t.shape, t.patched_elems, t.numel) == ("patch", (9, 4), 24, 36), t
        assert t.reason == "rows 6..8 are new vocabulary: kept from the fine-tune"
    assert plan["model.norm.weight"].patched_elems == 4


def test_extra_rows_outside_the_vocabulary_are_an_error(tmp_path):
    F, A, U = trio(tmp_path, ft=dict(BASE, **{"model.layers.0.mlp.up_proj.weight": w(9, 4)}))
    with pytest.raises(
        RestaError,
        match=r"1 tensor\(s\) disagree:\n  model\.layers\.0\.mlp\.up_proj\.weight: "
        r"finetuned shape \[9, 4\] vs aligned \[8, 4\]; shapes must be equal",
    ):
        build_plan(F, aligned=A, unaligned=U)


def test_inputs_disagreeing_on_shape_are_all_listed(tmp_path):
    un = dict(BASE, **{"model.norm.weight": w(5), "model.layers.0.self_attn.q_proj.weight": w(4, 3)})
    F, A, U = trio(tmp_path, un=un)
    with pytest.raises(RestaError) as e:
        build_plan(F, aligned=A, unaligned=U)
    msg = str(e.value)
    assert "2 tensor(s) disagree" in msg
    assert "model.norm.weight: inputs disagree on shape: finetuned [4], aligned [4], unaligned [5]" in msg
    assert (
        "model.layers.0.self_attn.q_proj.weight: inputs disagree on shape: finetuned [4, 4], aligned [4, 4], "
        "unaligned [4, 3]" in msg
    )


def test_tied_embeddings_share_the_embeddings_dare_stream(tmp_path):
    F, A, U = trio(tmp_path, config=llama_config(tie=True))
    plan = build_plan(F, aligned=A, unaligned=U, dare_base=A)
    t = by_name(plan)
    assert t["lm_head.weight"].seed_name == "model.embed_tokens.weight"
    assert "tied to model.embed_tokens.weight (same DARE stream)" in t["lm_head.weight"].reason
    assert t["model.embed_tokens.weight"].seed_name == "model.embed_tokens.weight"
    assert all(t[n].seed_name == n for n in t if n != "lm_head.weight")
    assert any(n.startswith("tied embeddings: lm_head.weight uses model.embed_tokens.weight") for n in plan.notes)
    untied = by_name(build_plan(trio(tmp_path / "untied")[0], aligned=A, unaligned=U))
    assert untied["lm_head.weight"].seed_name == "lm_head.weight"


def test_a_source_under_another_prefix_is_mapped_and_noted(tmp_path):
    bare = {k.removeprefix("model."): v for k, v in BASE.items()}
    F, A, U = trio(tmp_path, al=bare)
    plan = build_plan(F, aligned=A, unaligned=U)
    assert plan.summary()["patch"] == 5
    assert "aligned stores 4 tensor(s) under other names: mapped by prefix" in plan.notes[0]
    assert A.info("model.norm.weight") is A.info("norm.weight")


def test_a_source_sharing_no_names_is_an_error(tmp_path):
    F, A, U = trio(tmp_path, al={"foo.bar": w(2)})
    with pytest.raises(RestaError, match=r"aligned .* shares no tensor names with finetuned"):
        build_plan(F, aligned=A, unaligned=U)


def test_include_exclude_and_the_first_matching_beta_rule(tmp_path):
    F, A, U = trio(tmp_path)
    rules = [BetaRule(r"mlp\.", 0.25), BetaRule(r"up_proj|q_proj", 0.5)]
    t = by_name(
        build_plan(F, aligned=A, unaligned=U, beta=0.9, include=[r"layers|norm"], exclude=[r"norm"], beta_rules=rules)
    )
    assert t["model.layers.0.mlp.up_proj.weight"].beta == 0.25  # both rules match: the first wins
    assert t["model.layers.0.self_attn.q_proj.weight"].beta == 0.5
    assert (t["model.norm.weight"].action, t["model.norm.weight"].reason) == ("copy", "matched by --exclude")
    assert (t["lm_head.weight"].action, t["lm_head.weight"].reason) == ("copy", "not matched by --include")
    t = by_name(build_plan(F, aligned=A, unaligned=U, beta=0.9, beta_rules=rules[1:]))
    assert t["model.layers.0.mlp.up_proj.weight"].beta == 0.5 and t["lm_head.weight"].beta == 0.9
    with pytest.raises(OptionError, match="include"):
        build_plan(F, aligned=A, unaligned=U, include=["("])


def test_nothing_patched_leaves_a_note(tmp_path):
    F, A, U = trio(tmp_path)
    plan = build_plan(F, aligned=A, unaligned=U, exclude=["."])
    assert plan.summary() == {"tensors": 5, "copy": 5, "files": 1}
    assert plan.notes[-1].startswith("no tensor is patched")


def test_non_float_and_unpatched_float_tensors_are_copied(tmp_path):
    extra = {"steps": torch.arange(3, dtype=torch.int64), "scale": torch.ones(2, dtype=torch.float64)}
    F, A, U = trio(tmp_path, ft=dict(BASE, **extra))
    t = by_name(build_plan(F, aligned=A, unaligned=U, dtype="F32"))
    steps, scale = t["steps"], t["scale"]
    assert (steps.action, steps.reason, steps.out_dtype) == ("copy", "non-float dtype I64 is not patched", "I64")
    assert (scale.action, scale.reason, scale.out_dtype) == ("copy", "float dtype F64 is not patched", "F64")
    assert t["model.norm.weight"].out_dtype == "F32" and t["model.norm.weight"].in_dtype == "BF16"


def test_a_float_source_in_another_dtype_is_noted_and_a_non_kernel_one_is_an_error(tmp_path):
    F, A, U = trio(tmp_path, al={k: v.float() for k, v in BASE.items()})
    plan = build_plan(F, aligned=A, unaligned=U)
    assert plan.summary()["patch"] == 5 and all(t.out_dtype == "BF16" for t in plan.tensors())
    assert "5 tensor(s) have different dtypes across inputs" in plan.notes[0]
    F, A, U = trio(tmp_path / "f64", un=dict(BASE, **{"model.norm.weight": w(4, dtype=torch.float64)}))
    with pytest.raises(RestaError, match=r"model\.norm\.weight: finetuned is BF16 but unaligned F64"):
        build_plan(F, aligned=A, unaligned=U)


def test_quantized_inputs_are_refused(tmp_path):
    cfg = dict(llama_config(), quantization_config={"quant_method": "gptq"})
    F, _, U = trio(tmp_path)
    A = ck(tmp_path, "quant", BASE, config=cfg)
    with pytest.raises(RestaError, match=r"aligned .*quant: config.json has a quantization_config \(gptq\)"):
        build_plan(F, aligned=A, unaligned=U)


class Merged:
    """A TensorSource whose q_proj is a LoRA merge: read as F32, stored as BF16."""

    MERGED = "model.layers.0.self_attn.q_proj.weight"

    def __init__(self, ck):
        self._ck = ck

    def __getattr__(self, name):
        return getattr(self._ck, name)

    def __contains__(self, name):
        return name in self._ck

    def is_merged(self, name):
        return name == self.MERGED

    def stored_dtype(self, name):
        return "F16" if name == self.MERGED else self._ck.stored_dtype(name)


def test_merged_lora_tensors_keep_their_stored_dtype(tmp_path):
    F, A, U = trio(tmp_path)
    ft = Merged(F)
    t = by_name(build_plan(ft, aligned=A, unaligned=U))
    assert (t[Merged.MERGED].out_dtype, t[Merged.MERGED].reason) == ("F16", "LoRA merged in fp32")
    assert all((x.out_dtype, x.reason) == ("BF16", "") for n, x in t.items() if n != Merged.MERGED)
    t = by_name(build_plan(ft, aligned=A, unaligned=U, dtype="F32"))
    assert t[Merged.MERGED].out_dtype == "F32"


def test_copy_plan_copies_everything_rounding_merged_tensors_to_their_stored_dtype(tmp_path):
    F, _, _ = trio(tmp_path, shards=2)
    plain = copy_plan(F)
    assert (plain.mode, plain.summary()) == ("merge", {"tensors": 5, "copy": 5, "files": 2})
    assert [[t.name for t in f.tensors] for f in plain.files] == [list(s.tensors) for s in F.files.values()]
    assert all((t.reason, t.in_dtype, t.out_dtype, t.beta) == ("", "BF16", "BF16", None) for t in plain.tensors())
    t = by_name(copy_plan(Merged(F)))
    assert (t[Merged.MERGED].action, t[Merged.MERGED].reason, t[Merged.MERGED].out_dtype) == (
        "copy",
        "LoRA merged in fp32",
        "F16",
    )
    assert all(x.reason == "" and x.out_dtype == "BF16" for n, x in t.items() if n != Merged.MERGED)
