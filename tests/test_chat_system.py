"""What each `extract.chat_system` setting puts around the prompt with the instruct checkpoints' real chat
templates and real (or stand-in) tokenizers; the counted query positions stay exactly the user's text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from analysis.core.errors import UserError
from analysis.extraction.runner import encode
from realshape import FAMILIES

from conftest import CHAT_TEMPLATES

TEXT = "What is your name?"
NEUTRAL = "Answer the question."


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer):
    cache = {}

    def get(family: str):
        if family not in cache:
            spec = FAMILIES[family]
            tok = AutoTokenizer.from_pretrained(real_tokenizer(spec["tokenizer"]))
            tok.bos_token = spec["special"]["instruct"]["bos"]
            tok.chat_template = (CHAT_TEMPLATES / spec["chat_template"]).read_text(encoding="utf-8")
            cache[family] = tok
        return cache[family]

    return get


def rendered(tok, chat_system, date="26 Jul 2024"):
    e = encode(tok, TEXT, "chat", chat_system=chat_system, chat_date=date)
    counted = [i for i, m in zip(e.input_ids, e.query_mask) if m]
    assert tok.decode(counted).strip() == TEXT
    return tok.decode(e.input_ids)


def test_qwen25_default_system_names_the_model_and_its_maker(tokenizer):
    tok = tokenizer("qwen25_7b")
    assert rendered(tok, "default") == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                        f"assistant.<|im_end|>\n<|im_start|>user\n{TEXT}<|im_end|>\n"
                                        "<|im_start|>assistant\n")
    assert rendered(tok, "none").startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert "Qwen" not in rendered(tok, "none")
    assert rendered(tok, NEUTRAL).startswith(f"<|im_start|>system\n{NEUTRAL}<|im_end|>\n")


def test_llama31_writes_a_knowledge_date_header_whatever_the_setting(tokenizer):
    tok = tokenizer("llama31_8b")
    header = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n")
    default = rendered(tok, "default")
    assert default == (header + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n" + TEXT
                       + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rendered(tok, "none") == default  # an empty system message is what the template writes by default
    assert rendered(tok, NEUTRAL).startswith(header + NEUTRAL + "<|eot_id|>")


def test_llama32_date_comes_from_chat_date_not_the_clock(tokenizer):
    tok = tokenizer("llama32_1b")
    assert "Today Date: 26 Jul 2024\n" in rendered(tok, "default", date="26 Jul 2024")
    assert "Today Date: 01 Jan 2030\n" in rendered(tok, "default", date="01 Jan 2030")


def test_mistral_v01_has_no_system_turn(tokenizer):
    tok = tokenizer("mistral_7b")
    assert rendered(tok, "default") == f"<s> [INST] {TEXT} [/INST]"
    assert rendered(tok, NEUTRAL) == f"<s> [INST] {NEUTRAL}\n\n{TEXT} [/INST]"  # folded into the user turn


def test_smollm2_default_system_names_the_model_and_its_maker(tokenizer):
    tok = tokenizer("smollm2_135m")
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in rendered(tok, "default")
    assert "SmolLM" not in rendered(tok, NEUTRAL)


def test_a_template_that_refuses_the_system_message_is_a_clear_error(tokenizer):
    tok = tokenizer("mistral_7b")
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}")
    with pytest.raises(UserError, match="chat_system"):
        encode(tok, TEXT, "chat", chat_system=NEUTRAL)
