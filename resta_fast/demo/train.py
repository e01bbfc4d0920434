"""Tiny Llama models for the demo and the four training stages.

The models are ordinary ``transformers`` checkpoints: ``LlamaForCausalLM`` plus a
word-level tokenizer saved as a ``PreTrainedTokenizerFast`` with a chat
template, so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load them with no
resta_fast code.

Stages (hyper-parameters are the ones that made the effect reproduce, issue 8):

1. base: from scratch, helpful; can already say the refusal sentence.
2. aligned: base taught to refuse harmful and unfamiliar requests.
3. unaligned: aligned, gently fine-tuned to comply with harmful requests.
4. finetuned: aligned, gently fine-tuned on the new skill only.

and two LoRA adapters on the aligned model (PEFT directories, made with peft),
for the side-by-side of RESTA, Safe LoRA and SafeMERGE:

5. lora-finetuned: the new skill, as a LoRA fine-tune.
6. safety-adapter: the alignment data again, as SafeMERGE's safety adapter.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch

from resta_fast.demo.world import ASSISTANT, EOS, PAD, UNK, USER, Example, World

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<assistant> {{ m['content'] }} <eos> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

MAX_NEW_TOKENS = 20  # the longest answer is 17 words plus <eos>


@dataclass(frozen=True)
class Stage:
    """One training stage: where it starts, what it sees, how hard it pushes."""

    name: str
    parent: str | None
    data: str  # World method that yields its examples
    steps: int
    lr: float
    warmup: int = 0
    batch: int = 32


STAGES = (
    # From scratch: enough steps that every template is reproduced word for word.
    Stage("base", None, "pretrain_set", steps=700, lr=3e-3, warmup=50),
    Stage("aligned", "base", "align_set", steps=200, lr=1e-3, warmup=20),
    # Gentle, per issue 8: larger steps gave safety vectors that broke the model.
    # (300 steps instead of 150 changed nothing measurable here.)
    Stage("unaligned", "aligned", "unalign_set", steps=150, lr=1e-4),
    # Gentle too. 400 steps did not widen the β window in the seeds that lack one.
    Stage("finetuned", "aligned", "skill_set", steps=200, lr=3e-4),
)


@dataclass(frozen=True)
class LoraStage(Stage):
    """A LoRA adapter trained on ``parent`` (every linear layer of the blocks)."""

    rank: int = 8
    alpha: int = 16


# LoRA moves fewer weights, so it takes a larger step than the full fine-tune.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_STAGES = (
    # 400 steps: at 200 the adapter had not learned the skill (task accuracy 0.71-0.76 < 0.8).
    LoraStage("lora-finetuned", "aligned", "skill_set", steps=400, lr=2e-3),
    LoraStage("safety-adapter", "aligned", "align_set", steps=100, lr=2e-3),
)


def train_lora(parent, tok, world: World, stage: LoraStage, seed: int):
    """A peft LoRA model over a copy of ``parent``, trained for ``stage``."""
    import copy

    import peft

    torch.manual_seed(seed * 1000 + 7 * len(stage.name))  # lora_A's initialisation
    config = peft.LoraConfig(r=stage.rank, lora_alpha=stage.alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model = peft.get_peft_model(copy.deepcopy(parent), config)
    return model, train_stage(model, tok, world, stage, seed)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_tokenizer(world: World):
    """A whitespace word-level tokenizer over the world's vocabulary, as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(world.vocab)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK, pad_token=PAD, eos_token=EOS, padding_side="left"
    )
    tok.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(world: World, seed: int):
    """A ~110k-parameter Llama: hidden 64, 2 layers, 4 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = world.vocab
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=vocab.index(PAD),
        eos_token_id=vocab.index(EOS),
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def chat_ids(tok, prompt: str, answer: str | None = None) -> list[int]:
    """Token ids of one chat turn via the saved chat template (the template is the contract)."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    ids = tok.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _encode(tok, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and labels; loss only on the answer (after <assistant>)."""
    rows, labels = [], []
    for ex in examples:
        prompt_len = len(chat_ids(tok, ex.prompt))
        ids = chat_ids(tok, ex.prompt, ex.answer)
        rows.append(ids)
        labels.append([-100] * prompt_len + ids[prompt_len:])
    width = max(map(len, rows))
    pad = tok.pad_token_id
    x = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return x, y


def train_stage(model, tok, world: World, stage: Stage, seed: int) -> list[float]:
    """Train ``model`` in place for one stage; returns the loss curve."""
    rng = random.Random(f"{seed}-{stage.name}")
    torch.manual_seed(seed * 1000 + len(stage.name))
    data = getattr(world, stage.data)(rng, stage.steps * stage.batch)
    x, y = _encode(tok, data)
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / stage.warmup) if stage.warmup else 1.0)
    model.train()
    losses = []
    t0 = time.time()
    for step in range(stage.steps):
        sl = slice(step * stage.batch, (step + 1) * stage.batch)
        xb, yb = x[sl], y[sl]
        keep = int((xb != tok.pad_token_id).sum(1).max())
        out = model(input_ids=xb[:, :keep], labels=yb[:, :keep])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if (step + 1) % 100 == 0 or step + 1 == stage.steps:
            log(f"  {stage.name}: step {step + 1}/{stage.steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return losses


def save_adapter(model, tok, path) -> None:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and the tokenizer."""
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def save_checkpoint(model, tok, path) -> None:
    """Write an ordinary HF directory: config, safetensors weights, tokenizer, greedy generation config."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
