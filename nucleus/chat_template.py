"""Jinja2 chat templates (`tokenizer.chat_template` in GGUF, `chat_template` in tokenizer_config.json).

Rendered as Hugging Face's `apply_chat_template` renders them: a sandboxed, immutable Jinja2
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` block (rendered as its body), the `raise_exception(message)` and
`strftime_now(format)` globals, and a `tojson` filter that keeps non-ASCII text as it is. The
variables are `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and any keyword
arguments (`tools`, `documents`, `date_string`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """A chat template that does not compile or raises, or messages it cannot take."""


class _Encoder(Protocol):
    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike Jinja2's own filter, no HTML escaping: templates emit the JSON into plain text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text for training masks; here
    it renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension API)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
        autoescape=False,
        keep_trailing_newline=False,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {i} has no 'role' string (got {role!r})")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(
                f"message {i} ({role}): 'content' must be a string, a list of parts or None, got "
                f"{type(content).__name__}"
            )
        if content is None and not message.get("tool_calls"):
            raise ChatTemplateError(f"message {i} ({role}) has no 'content'")
        checked.append(dict(message))
    return checked


class ChatTemplate:
    """A compiled chat template and the tokenizer its output is encoded with.

    Args:
        source: the Jinja2 template text.
        bos_token, eos_token: the texts of the tokenizer's BOS/EOS tokens, as the template sees
            them (`{{ bos_token }}`).
        tokenizer: anything with `encode(s, *, bos, eos)` that maps special-token text to the
            special ids (e.g. `HFTokenizer`); needed by `encode_dialog_prompt` only.

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(
        self, source: str, bos_token: str, eos_token: str, tokenizer: _Encoder | None = None
    ):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("the chat template is empty")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.tokenizer = tokenizer
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"chat template does not compile: {e.message} (line {e.lineno})"
            ) from None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate:
        """From a tokenizer that carries its template (`HFTokenizer.chat_template`)."""
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ChatTemplateError(
                f"{getattr(tokenizer, 'name', tokenizer)!r} has no chat template"
            )
        return cls(source, tokenizer.bos_token, tokenizer.eos_token, tokenizer)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The conversation as text, as `apply_chat_template(..., tokenize=False)` gives it.

        Args:
            messages: dicts with `role` and `content` (and whatever else the template reads).
            add_generation_prompt: end with the header that opens the assistant's reply.
            **kwargs: more template variables (`tools`, `documents`, `date_string`, ...).

        Raises:
            ChatTemplateError: malformed messages, or the template raised (its message is kept).
        """
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **kwargs,
            "messages": _check_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except _TemplateRaised as e:
            raise ChatTemplateError(f"chat template rejected the conversation: {e}") from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode_dialog_prompt(self, dialog: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation with the assistant header open.

        The text is encoded without an added BOS (templates write `{{ bos_token }}` themselves
        when the model wants one), special-token text mapping to special ids, as
        `apply_chat_template(..., tokenize=True)` does.
        """
        if self.tokenizer is None:
            raise ChatTemplateError("encode_dialog_prompt needs a tokenizer")
        text = self.render(dialog, add_generation_prompt=True, **kwargs)
        return self.tokenizer.encode(text, bos=False, eos=False)
