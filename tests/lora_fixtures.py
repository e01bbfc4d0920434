"""Tiny peft-made LoRA fixtures shared by the LoRA, Safe LoRA and SafeMERGE tests.

Importing this module needs transformers and peft (the tests importorskip them first).
"""

import json

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def llama_base(path, *, dtype=torch.bfloat16, tie=False, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tie))
    model.to(dtype).save_pretrained(path)
    return path


def gpt2_base(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def train_adapter(base, adapter, config, *, cls=None, resize=None, seed=1):
    """Wrap ``base`` (loaded in fp32: an exact upcast) with peft, give every
    trainable adapter tensor random values, save the adapter; return peft's
    fp32 ``merge_and_unload()`` state dict."""
    cls = cls or transformers.LlamaForCausalLM
    model = cls.from_pretrained(base, dtype=torch.float32)
    if resize:
        model.resize_token_embeddings(resize, mean_resizing=False)
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(adapter)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def shadow(base, path, seed=2):
    """An 'unaligned' model: base + noise, same names, dtypes and config."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    t = {
        k: (v.float() + torch.randn(v.shape, generator=g) * 0.02).to(v.dtype)
        for k, v in load_file(str(base / "model.safetensors")).items()
    }
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text((base / "config.json").read_text())
    return path


def edit_config(adapter, **changes):
    """Change keys of an adapter's adapter_config.json in place."""
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def lora_pair(root, *, targets, safety_alpha: int = 8):
    """(fine-tune adapter, safety adapter, aligned, unaligned): two rank-4 adapters on one fp32
    tiny Llama (lora_alpha 8, and ``safety_alpha`` for the safety one) and its shadow model."""
    aligned = llama_base(root / "aligned", dtype=torch.float32)
    unaligned = shadow(aligned, root / "unaligned")
    train_adapter(aligned, root / "ft", peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=1)
    train_adapter(aligned, root / "safe", peft.LoraConfig(r=4, lora_alpha=safety_alpha, target_modules=targets), seed=5)
    return root / "ft", root / "safe", aligned, unaligned
