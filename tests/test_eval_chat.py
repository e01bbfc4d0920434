"""What the model reads: local tokenizers (left padding, a pad token) and the chat template around questions."""

import json

import pytest
from eval_fakes import build_tiny_llama, build_tiny_tokenizer

from resta_fast.errors import RestaError
from resta_fast.eval.chat import check_model_dir, format_prompts, load_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {
        "rand": build_tiny_llama(root / "rand", seed=1),
        "plain": build_tiny_llama(root / "plain", seed=2, chat_template=False),
    }


def test_chat_template_when_present_raw_otherwise(models):
    tok = load_tokenizer(models["rand"])
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    texts, add = format_prompts(tok, ["how to do it"])
    assert texts == ["<s><|user|> how to do it <|assistant|>"] and add is False
    sys_texts, _ = format_prompts(tok, ["q"], system_prompt="be safe")
    assert sys_texts[0].startswith("<s><|system|> be safe <|user|> q")
    plain = load_tokenizer(models["plain"])
    assert format_prompts(plain, ["how to do it"]) == (["how to do it"], True)
    with pytest.raises(RestaError, match="no.*template|has none"):
        format_prompts(plain, ["q"], chat_template=True)
    assert format_prompts(tok, ["q"], chat_template=False) == (["q"], True)
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    with pytest.raises(RestaError, match="chat template failed.*drop --system-prompt"):
        format_prompts(tok, ["q"], system_prompt="be safe")


def test_a_failing_template_without_a_system_prompt_suggests_no_chat_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('broken template') }}"
    with pytest.raises(RestaError, match="chat template failed on a prompt.*broken template.*pass --no-chat-template"):
        format_prompts(tok, ["q"])


def test_template_keeps_input_order_and_count():
    tok = build_tiny_tokenizer()
    texts, add = format_prompts(tok, ("one", "two", "three"))
    assert texts == [f"<s><|user|> {w} <|assistant|>" for w in ("one", "two", "three")] and add is False
    assert format_prompts(tok, []) == ([], False)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(RestaError, match="no config.json.*hub names are not downloaded"):
        load_tokenizer(tmp_path / "meta-llama/Llama-2-7b-chat-hf")
    (tmp_path / "config.json").write_text("{}")
    assert check_model_dir(str(tmp_path)) == tmp_path


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RestaError, match="(?s)could not load a tokenizer.*copy the tokenizer files"):
        load_tokenizer(tmp_path)


def _tokenizer_dir(path, **specials):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(path)
    return path


def test_pad_token_falls_back_to_eos_then_unk(tmp_path):
    tok = load_tokenizer(_tokenizer_dir(tmp_path / "eos", eos_token="</s>", unk_token="<unk>"))
    assert tok.pad_token == "</s>" and tok.padding_side == "left"
    tok = load_tokenizer(_tokenizer_dir(tmp_path / "unk", unk_token="<unk>"))
    assert tok.pad_token == "<unk>" and tok.padding_side == "left"
    with pytest.raises(RestaError, match="no pad, eos or unk token"):
        load_tokenizer(_tokenizer_dir(tmp_path / "none"))


def test_tiny_tokenizer_helper_roundtrip():
    tok = build_tiny_tokenizer(first="sorry")
    assert tok.convert_tokens_to_ids("sorry") == 0
    assert tok.decode(tok("sure here is")["input_ids"]) == "sure here is"
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]
