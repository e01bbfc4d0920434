"""What the model reads: a local checkpoint's tokenizer and the chat template around each question.

Both generation engines (resta_fast/eval/generate.py) format prompts here, so a
question reaches transformers and vLLM as the same string: the chat template
applied when the tokenizer has one (raw text otherwise), an optional system
message first.
"""

from __future__ import annotations

from pathlib import Path

from resta_fast.errors import RestaError


def check_model_dir(model_dir) -> Path:
    """A local Hugging Face model directory, or a RestaError saying what to pass instead.

    Args:
        model_dir: the directory given with ``--model``.

    Returns:
        The directory as a Path.

    Example:
        >>> check_model_dir("meta-llama/Llama-2-7b-chat-hf")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: meta-llama/Llama-2-7b-chat-hf is not a Hugging Face model directory ...
    """
    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise RestaError(
            f"{p} is not a Hugging Face model directory (no config.json): pass the output directory "
            "of `resta-fast patch` or another local checkpoint; hub names are not downloaded"
        )
    return p


def load_tokenizer(model_dir):
    """Load a local tokenizer set up for batched generation (left padding, a pad token).

    Args:
        model_dir: local model directory.

    Returns:
        The tokenizer.

    Example:
        (skipped: needs a checkpoint's tokenizer files on disk)

        >>> tok = load_tokenizer("out/restored")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    p = check_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise RestaError(
            f"{p}: could not load a tokenizer ({e}); copy the tokenizer files of the fine-tune into the directory"
        ) from e
    # Decoder-only models must be padded on the left so every row's new tokens start at the same column.
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise RestaError(f"{p}: the tokenizer has no pad, eos or unk token to pad batches with")
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def format_prompts(tokenizer, texts, *, system_prompt: str | None = None, chat_template: bool | None = None):
    """Wrap questions in the tokenizer's chat template (when it has one) for generation.

    Args:
        tokenizer: a transformers tokenizer.
        texts: the questions.
        system_prompt: optional system message put before each question.
        chat_template: force (True) or skip (False) the template; None uses it when present.

    Returns:
        (strings to tokenize, whether to add special tokens when tokenizing). The template
        already contains BOS and friends, so they must not be added twice.

    Example:
        A tokenizer without a template gets the questions as they are:

        >>> from types import SimpleNamespace
        >>> format_prompts(SimpleNamespace(chat_template=None), ["Hi"])
        (['Hi'], True)

        One with a template (skipped here: it needs a checkpoint's tokenizer on disk):

        >>> format_prompts(load_tokenizer("out/restored"), ["Hi"])  # doctest: +SKIP
        (['<|user|> Hi <|assistant|>'], False)
    """
    use = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use and not getattr(tokenizer, "chat_template", None):
        raise RestaError("--chat-template asked for, but the tokenizer has none; drop the flag")
    if not use:
        return list(texts), True
    out = []
    for t in texts:
        msgs = [{"role": "user", "content": t}]
        if system_prompt:
            msgs.insert(0, {"role": "system", "content": system_prompt})
        try:
            out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
        except Exception as e:  # jinja raises its own errors, e.g. templates that reject a system role
            hint = "drop --system-prompt" if system_prompt else "pass --no-chat-template"
            raise RestaError(f"the model's chat template failed on a prompt ({e}); {hint}") from e
    return out, False
