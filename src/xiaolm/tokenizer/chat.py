"""The chat format, in one place: ChatML (``<|im_start|>{role}\\n{content}<|im_end|>\\n``) as a Jinja template
(``CHAT_TEMPLATE``, what transformers renders), as text (``render_chat``, identical to the template; the tests check
the two agree), and as token ids encoded piece by piece with the assistant-label mask SFT trains on
(``encode_conversation``) and the generation prompt every stage shares (``prompt_ids``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

IM_START = "<|im_start|>"  # special token 1 (see xiaolm.tokenizer.core)
IM_END = "<|im_end|>"  # special token 2

# ChatML. Kept deliberately plain (no default system prompt) so the Python rendering below is obviously identical.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_chat(messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = False) -> str:
    """ChatML rendering of ``messages`` (each ``{"role": ..., "content": ...}``), identical to ``CHAT_TEMPLATE``."""
    parts = []
    for message in messages:
        parts.append(f"{IM_START}{_jinja_str(message['role'])}\n{_jinja_str(message['content'])}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _jinja_str(value: object) -> str:
    """How Jinja prints a value in ``{{ }}``: ``None`` prints as ``None``, like ``str``."""
    return str(value)


def encode_conversation(tokenizer, messages: list[dict], content_ids: Optional[list[list[int]]] = None,
                        ) -> tuple[list[int], list[bool]]:
    """Token ids of the ChatML rendering of ``messages`` and, per token, whether it carries a label: True exactly on
    assistant contents and their closing ``<|im_end|>``. The final newline after the last ``<|im_end|>`` is left off
    (it would be an input with nothing to predict).

    Message contents are encoded with ``allow_special=False``, so text that looks like a chat marker stays text."""
    if content_ids is None:
        content_ids = [tokenizer.encode(m["content"], allow_special=False) for m in messages]
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []
    for k, (m, body) in enumerate(zip(messages, content_ids)):
        header = [tokenizer.im_start_id] + tokenizer.encode(f"{m['role']}\n")
        is_answer = m["role"] == "assistant"
        ids += header
        mask += [False] * len(header)
        ids += body
        mask += [is_answer] * len(body)
        ids.append(tokenizer.im_end_id)
        mask.append(is_answer)
        if k < len(messages) - 1:
            ids += newline
            mask += [False] * len(newline)
    return ids, mask


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt for ``messages``, ending with ``<|im_start|>assistant\\n`` (piecewise, as SFT)."""
    ids, _ = encode_conversation(tokenizer, list(messages) + [{"role": "assistant", "content": ""}])
    return ids[:-1]  # drop the empty answer's <|im_end|>
