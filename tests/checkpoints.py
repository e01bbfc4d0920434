"""Small synthetic checkpoints for tests: Llama-shaped names, seeded values."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensors(
    seed: int, *, vocab=64, hidden=32, layers=2, inter=48, dtype=torch.bfloat16, extra_rows=0
) -> dict[str, torch.Tensor]:
    """Llama-named random tensors (plus a non-float buffer)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {"model.embed_tokens.weight": w(vocab + extra_rows, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = w(hidden, hidden)
        t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        t[p + "mlp.up_proj.weight"] = w(inter, hidden)
        t[p + "mlp.down_proj.weight"] = w(hidden, inter)
        t[p + "input_layernorm.weight"] = (1 + w(hidden).float()).to(dtype)
        t[p + "post_attention_layernorm.weight"] = (1 + w(hidden).float()).to(dtype)
    t["model.norm.weight"] = (1 + w(hidden).float()).to(dtype)
    t["lm_head.weight"] = w(vocab + extra_rows, hidden)
    return t


def llama_config(vocab=64, hidden=32, layers=2, inter=48, heads=4, tie=False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    }


def write_model(
    path: Path,
    tensors: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    config: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Save as an HF directory, sharded round-robin when shards > 1."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or llama_config()))
    meta = {"format": "pt"} if metadata is None else metadata
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata=meta)
        return path
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return path


def three_models(root: Path, **kw) -> tuple[Path, Path, Path]:
    """(finetuned, aligned, unaligned) directories with related random weights."""
    shards = kw.pop("shards", 1)
    ft_extra = kw.pop("ft_extra_rows", 0)
    aligned = llama_tensors(1, **kw)
    unaligned = {k: (v.float() + llama_tensors(2, **kw)[k].float() * 0.1).to(v.dtype) for k, v in aligned.items()}
    ft = llama_tensors(3, extra_rows=ft_extra, **kw)
    for k, v in aligned.items():
        if ft[k].shape == v.shape:
            ft[k] = (v.float() + ft[k].float() * 0.1).to(v.dtype)
    return (
        write_model(root / "ft", ft, shards=shards),
        write_model(root / "aligned", aligned),
        write_model(root / "unaligned", unaligned),
    )


def write_adapter(path: Path, *, hidden=32, inter=48, layers=2, r=4, seed=9) -> Path:
    """A PEFT LoRA adapter directory (fp32, as peft saves it) for ``llama_tensors`` models."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    lora = {}
    for i in range(layers):
        for mod, (fan_out, fan_in) in (("self_attn.q_proj", (hidden, hidden)), ("mlp.down_proj", (hidden, inter))):
            key = f"base_model.model.model.layers.{i}.{mod}"
            lora[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.1
            lora[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.1
    save_file(lora, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 2 * r,
                "target_modules": ["q_proj", "down_proj"],
                "bias": "none",
                "fan_in_fan_out": False,
                "use_rslora": False,
            },
            sort_keys=True,
        )
    )
    return path


def hub_cache_model(cache: Path, repo_id: str, src: Path, *, commit: str, refs=("main",)) -> Path:
    """Put the files of directory ``src`` into a Hugging Face Hub cache the way huggingface_hub
    lays one out: ``models--ORG--NAME/{blobs/HASH, snapshots/COMMIT/NAME -> ../../blobs/HASH,
    refs/REF (the commit)}``. Blobs keep the files' mtimes. Returns the snapshot directory."""
    import hashlib
    import os
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copy2(f, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
