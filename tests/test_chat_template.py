"""`ChatTemplate`: rendered exactly as transformers' `apply_chat_template`, sandboxed, clear errors.

Oracle: transformers' `apply_chat_template` on a tokenizer built from the same vocabulary and the
same template source (the default model's GGUF template, and a Llama 3.1-style template that uses
`bos_token`, `tojson`, `raise_exception`, `strftime_now`, loop controls and `{% generation %}`).
"""

from __future__ import annotations

import pytest

from nucleus.chat_template import ChatTemplate, ChatTemplateError
from nucleus.hf_tokenizer import HFTokenizer
from nucleus.loaders.gguf import read_gguf_metadata

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke about\nnewlines  and   spaces.  "},
    ],
    [
        {"role": "system", "content": "Answer in French. <|im_end|> is text here."},
        {"role": "user", "content": "Café? 😀"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": ""},
    ],
]

LLAMA31_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}{% set date_string = strftime_now("%d %b %Y") %}{% endif %}
{%- set ns = namespace(system="") %}
{%- if messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] | trim %}{% endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n" }}
{%- if tools is not none and tools is defined %}
{{- "Tools:\\n" }}
{%- for t in tools %}{{ t | tojson(indent=2) }}{{ "\\n" }}{% endfor %}
{%- endif %}
{{- ns.system + "<|eot_id|>" }}
{%- for message in messages %}
  {%- if message['role'] == 'system' %}{% continue %}{% endif %}
  {%- if message['role'] not in ['user', 'assistant', 'tool'] %}
    {{- raise_exception("Unknown role: " + message['role']) }}
  {%- endif %}
  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
  {%- if message['role'] == 'assistant' %}
    {%- generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
  {%- else %}
    {{- message['content'] | trim + '<|eot_id|>' }}
  {%- endif %}
  {%- if loop.index > 50 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    from nucleus.assets import asset_path

    return HFTokenizer.from_gguf(read_gguf_metadata(asset_path("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def hf(tok):
    """transformers' tokenizer over the same vocabulary; templates are passed per call."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.tokenizer, bos_token=tok.bos_token, eos_token=tok.eos_token
    )


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_default_template_renders_as_transformers(tok, hf, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    template = ChatTemplate.from_tokenizer(tok)
    ours = template.render(messages, add_generation_prompt=generation_prompt)
    assert ours == hf.apply_chat_template(
        messages,
        chat_template=tok.chat_template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    if generation_prompt:
        ids = template.encode_dialog_prompt(messages)
        want = hf.apply_chat_template(
            messages, chat_template=tok.chat_template, tokenize=True, add_generation_prompt=True
        )
        want = want["input_ids"] if not isinstance(want, list) else want
        assert ids == want
        assert ids.count(tok.special_tokens["<|im_start|>"]) == len(messages) + 1 + (
            messages[0]["role"] != "system"
        )


def test_default_template_text(tok):
    text = ChatTemplate.from_tokenizer(tok).render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_llama31_style_template_renders_as_transformers(tok, hf, conversation, generation_prompt):
    messages = CONVERSATIONS[conversation]
    template = ChatTemplate(LLAMA31_STYLE, tok.bos_token, tok.eos_token, tok)
    for kwargs in ({"date_string": "26 Jul 2024"}, {"date_string": "1 Jan 2025", "tools": TOOLS}):
        ours = template.render(messages, add_generation_prompt=generation_prompt, **kwargs)
        want = hf.apply_chat_template(
            messages,
            chat_template=LLAMA31_STYLE,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **kwargs,
        )
        assert ours == want
    assert "Météo" in template.render(messages, tools=TOOLS)  # tojson keeps non-ASCII text


def test_strftime_now_is_available(tok):
    from datetime import datetime

    template = ChatTemplate(LLAMA31_STYLE, tok.bos_token, tok.eos_token, tok)
    assert datetime.now().strftime("%Y") in template.render(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{% set x = [] %}{{ x.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_blocks_unsafe_code(tok, source):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source, "", "", tok).render(CONVERSATIONS[0])


def test_sandbox_hides_private_attributes(tok):
    text = ChatTemplate("[{{ ''.__class__ }}]", "", "", tok).render(CONVERSATIONS[0])
    assert text == "[]"


def test_template_errors_are_clear(tok):
    template = ChatTemplate(LLAMA31_STYLE, "", "", tok)
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        template.render([{"role": "robot", "content": "beep"}])
    with pytest.raises(ChatTemplateError, match=r"does not compile.*line 1"):
        ChatTemplate("{% for m in messages %}", "", "", tok)
    with pytest.raises(ChatTemplateError, match="empty"):
        ChatTemplate("  ", "", "", tok)
    assert issubclass(ChatTemplateError, ValueError)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ([["user", "hi"]], "message 0 is a list"),
        ([{"content": "hi"}], "message 0 has no 'role'"),
        (
            [{"role": "user", "content": "hi"}, {"role": "user", "content": 3}],
            "message 1 .*content",
        ),
        ([{"role": "user"}], "has no 'content'"),
    ],
)
def test_malformed_messages(tok, messages, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatTemplate.from_tokenizer(tok).render(messages)


def test_encode_needs_a_tokenizer_and_a_template(tok):
    with pytest.raises(ChatTemplateError, match="needs a tokenizer"):
        ChatTemplate("{{ 'x' }}", "", "").encode_dialog_prompt(CONVERSATIONS[0])
    no_template = HFTokenizer(tok.tokenizer, bos_id=1, eos_id=2)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_tokenizer(no_template)
