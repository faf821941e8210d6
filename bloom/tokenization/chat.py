"""Chat templates: a conversation rendered to text by the tokenizer's Jinja template, as transformers
renders it (a sandboxed environment with trim_blocks and lstrip_blocks, its `tojson`,
`raise_exception` and `strftime_now`, the special tokens and the caller's keywords as variables).
Templates come from the hub and are untrusted code: they run only inside jinja2's immutable sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# transformers appends this to the final message to find where it ends in the rendered text
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which a prompt must not see
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _check_messages(conversation, index: int | None) -> list[dict[str, Any]]:
    where = "conversation" if index is None else f"conversation[{index}]"
    if isinstance(conversation, dict) and "messages" in conversation:
        conversation = conversation["messages"]
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise ValueError(f"{where} must be a list of messages (dicts with 'role' and 'content'); "
                         f"got {type(conversation).__name__}")
    return [dict(m) for m in conversation]


def split_conversations(conversation) -> tuple[list[list[dict[str, Any]]], bool]:
    """(conversations, batched): one conversation is a list of message dicts; a batch is a list of them."""
    if isinstance(conversation, (list, tuple)) and conversation and all(
            isinstance(c, (list, tuple)) or (isinstance(c, dict) and "messages" in c) for c in conversation):
        return [_check_messages(c, i) for i, c in enumerate(conversation)], True
    return [_check_messages(conversation, None)], False


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
           continue_final_message: bool = False, tools=None, documents=None, **variables: Any) -> str:
    """The text of one conversation. `continue_final_message`: end the text inside the final message
    (no end-of-turn after it), so the model continues it."""
    if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools must be a list of JSON-schema dicts (converting Python functions to schemas "
                         "is not implemented here)")
    final = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: the first "
                             "continues the last message, the second starts a new one")
        if not messages or not isinstance(messages[-1].get("content"), str):
            raise ValueError("continue_final_message needs a final message with text 'content'")
        final = messages[-1]["content"]
        messages = [*messages[:-1], {**messages[-1], "content": final + _CONTINUE_TAG}]
    text = _compile(template).render(messages=messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **variables)
    if final is not None:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ValueError("continue_final_message: the final message does not appear in the rendered chat "
                             "(the template changes it)")
        at = text.rindex(tag)
        text = text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def template_from_config(value, name: str | None = None) -> str | None:
    """A chat template as tokenizer_config.json stores it: a string, or (transformers 4.x) a list of
    {"name", "template"} of which "default" (or `name`) is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        named = {t["name"]: t["template"] for t in value}
        wanted = name or "default"
        if wanted not in named:
            raise ValueError(f"chat template {wanted!r} not found; the tokenizer has {sorted(named)}")
        return named[wanted]
    raise ValueError(f"chat_template must be a string or a list of {{'name', 'template'}}; got {type(value).__name__}")
