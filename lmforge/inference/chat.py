"""Chat templates: a list of {"role", "content"} messages -> prompt token ids and stop strings.

If the tokenizer has ChatML special tokens (`<|im_start|>`, `<|im_end|>`), messages are rendered
as ChatML and `<|im_end|>` is a stop id. Otherwise (a base model from `lmforge run`) a plain text
transcript is used: the document token, then "System: ...", "User: ...", "Assistant: ..." lines,
ending with "Assistant:"; the reply stops at "\nUser:". This module does no tokenizer training and
knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError

ROLES = ("system", "user", "assistant")


@dataclass
class ChatPrompt:
    ids: list[int]
    stop: list[str]
    stop_ids: list[int]


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': a string}}, "
                              f"got {str(m)[:80]!r}")
    return messages


def apply_chat_template(messages, tokenizer) -> ChatPrompt:
    messages = check_messages(messages)
    special = tokenizer.special_tokens
    if "<|im_start|>" in special and "<|im_end|>" in special:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n"
        ids = tokenizer.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"})
        return ChatPrompt(ids, [], [special["<|im_end|>"]])
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    ids = ([tokenizer.eot_id] if tokenizer.eot_id is not None else []) + tokenizer.encode(
        "\n".join(lines) + "\nAssistant:")
    return ChatPrompt(ids, ["\nUser:"], [])
