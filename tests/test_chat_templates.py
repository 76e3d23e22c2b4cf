"""`chat_template: <name>`: the names mergekit 0.1.5 bundles, with templates of ours, render their family's format."""

from __future__ import annotations

import pytest

from expertmerge.errors import ExpertMergeError
from expertmerge.io.tokenizer import CHAT_TEMPLATES, chat_template_text, check_chat_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Add 2+2."},
    {"role": "assistant", "content": "4"},
]
# Two turns after a system message, as each family writes them (bos "<s>", eos "</s>").
EXPECTED = {
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nAdd 2+2.\n\n"
    "### Response:\n4",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAdd 2+2.<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]Add 2+2.\n"
    "[|assistant|]4[|endofturn|]\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAdd 2+2.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "mistral": "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] Add 2+2. [/INST] 4</s>",
}
# The prompt for the next reply after one exchange and a question, without a system message.
GENERATION_PROMPT = {
    "alpaca": "### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\nAdd 2+2.\n\n### Response:\n",
    "chatml": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
    "Add 2+2.<|im_end|>\n<|im_start|>assistant\n",
    "exaone": "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]Add 2+2.\n"
    "[|assistant|]",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "Add 2+2.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Hi there [/INST] Hello!</s> [INST] Add 2+2. [/INST]",
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from expertmerge.zoo_registry import ensure_zoo, resolve_path

    ensure_zoo("tiny")
    loaded = AutoTokenizer.from_pretrained(resolve_path("zoo://tiny/base"))
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")
    return loaded


def test_every_mergekit_template_name_is_ours() -> None:
    assert sorted(CHAT_TEMPLATES) == ["alpaca", "chatml", "exaone", "llama3", "mistral"]  # mergekit 0.1.5's


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_template_renders_two_turns_in_its_family_format(tokenizer, name: str) -> None:
    template = chat_template_text(name, {})
    render = tokenizer.apply_chat_template
    assert render(CONVERSATION, chat_template=template, tokenize=False) == EXPECTED[name]
    prompt = render(CONVERSATION[1:4], chat_template=template, tokenize=False, add_generation_prompt=True)
    assert prompt == GENERATION_PROMPT[name]


def test_mistral_template_refuses_roles_that_do_not_alternate(tokenizer) -> None:
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        tokenizer.apply_chat_template(twice, chat_template=CHAT_TEMPLATES["mistral"], tokenize=False)


def test_unknown_template_name_is_refused_listing_the_names() -> None:
    with pytest.raises(ExpertMergeError) as error:
        check_chat_template("vicuna")
    assert str(error.value) == (
        "'vicuna' is not a chat template name (alpaca, chatml, exaone, llama3, mistral, auto); paste the Jinja "
        "template itself."
    )
    check_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # a template itself is taken
