"""Tiny local models for the tests: a word-level tokenizer with a chat template and a small Llama.

Nothing is downloaded. A model built with ``say="sorry"`` answers every prompt
with that word (its final norm is zeroed, so all logits tie and greedy decoding
picks token id 0, which is that word) — a cheap stand-in for a refusing model.

Example:
    >>> d = build_tiny_llama("/tmp/tiny", say="sorry")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

# Words the tiny tokenizer knows; anything else becomes <unk>. Refusal and
# compliance words are included so judges have something to match.
DEFAULT_WORDS = (
    "sorry cannot help sure here is how to the a an of and I you it that this with for do not "
    "yes no safe unsafe S1 S2 O1 O3 , . : ! ? step first then finally answer question user agent "
    "instructions guide paris london four five one two three capital france"
).split()
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(words=DEFAULT_WORDS, *, chat_template: bool = True, first: str | None = None):
    """A word-level fast tokenizer over ``words`` plus special tokens.

    Args:
        words: the vocabulary (whitespace/punctuation split; unknown words map to <unk>).
        chat_template: attach a minimal ``<|user|> ... <|assistant|>`` template.
        first: put this word at id 0 (used by ``build_tiny_llama(say=...)``).

    Returns:
        A ``PreTrainedTokenizerFast`` (left padding, pad/bos/eos/unk set).

    Example:
        >>> tok = build_tiny_tokenizer()
        >>> tok.decode(tok("sure here is")["input_ids"])
        'sure here is'
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ordered = list(dict.fromkeys(words))
    if first is not None:
        ordered = [first] + [w for w in ordered if w != first]
    # Words first, specials after, so a chosen word can own id 0.
    vocab = {w: i for i, w in enumerate(ordered + [s for s in SPECIALS if s not in ordered])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tok.padding_side = "left"
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_llama(
    out_dir,
    *,
    say: str | None = None,
    first_word: str | None = None,
    seed: int = 0,
    words=DEFAULT_WORDS,
    chat_template: bool = True,
    hidden_size: int = 32,
    layers: int = 2,
):
    """Write a tiny random ``LlamaForCausalLM`` plus tokenizer to ``out_dir`` (safetensors).

    Args:
        out_dir: directory to create.
        say: if given, the model answers every prompt with this word repeated.
        first_word: give this word id 0 without zeroing the norm (models that share a
            tokenizer with a ``say`` model, e.g. for patching tests).
        seed: torch seed for the random weights.
        words: tokenizer vocabulary.
        chat_template: give the tokenizer a chat template.
        hidden_size: model width.
        layers: number of decoder layers.

    Returns:
        ``out_dir`` as a Path.

    Example:
        >>> build_tiny_llama("/tmp/refuser", say="sorry")  # doctest: +SKIP
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(words, chat_template=chat_template, first=say or first_word)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        # Seeded explicitly so the weights do not depend on global RNG state.
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        if say is not None:
            # Zero final norm -> zero hidden state -> all logits equal -> argmax picks id 0 (= say).
            model.model.norm.weight.zero_()
    model.generation_config.do_sample = False
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def refusal_triple(root) -> tuple[Path, Path, Path]:
    """(finetuned, aligned, unaligned) tiny Llamas where RESTA's β decides refusal.

    F is a random tiny Llama whose token 0 is "sorry"; U = F; A = F with the final norm
    zeroed. V = A − U touches only the norm, so θ = F + β·V scales it by (1 − β): greedy
    argmax ignores a positive scale, so β < 1 answers like F, and β = 1 zeroes the norm
    and the model says "sorry".

    Example:
        >>> ft, al, un = refusal_triple("/tmp/triple")  # doctest: +SKIP
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    root = Path(root)
    ft = build_tiny_llama(root / "ft", seed=1, first_word="sorry")
    al, un = root / "aligned", root / "unaligned"
    shutil.copytree(ft, un)
    shutil.copytree(ft, al)
    sd = load_file(str(al / "model.safetensors"))
    sd["model.norm.weight"] = torch.zeros_like(sd["model.norm.weight"])
    save_file(sd, str(al / "model.safetensors"), metadata={"format": "pt"})
    return ft, al, un


def eval_trio(root) -> dict[str, str]:
    """The eval tests' three tiny Llamas under ``root``: a random one, one that says "sorry" to everything,
    and one without a chat template.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     sorted(eval_trio(d))
        ['plain', 'rand', 'sorry']
    """
    root = Path(root)
    return {
        "rand": str(build_tiny_llama(root / "rand", seed=1)),
        "sorry": str(build_tiny_llama(root / "sorry", say="sorry")),
        "plain": str(build_tiny_llama(root / "plain", seed=2, chat_template=False)),
    }


def write_utility(root) -> Path:
    """``root/utility.jsonl``: two questions whose answer is "sorry", so the "sorry" model of :func:`eval_trio`
    scores exact match 1.0 and the random one about 0."""
    path = Path(root) / "utility.jsonl"
    rows = [{"prompt": q, "answer": "sorry"} for q in ["capital of france", "two and two"]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
