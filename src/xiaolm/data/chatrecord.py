"""What every chat-record reader shares (``formats`` for plain layouts, ``toolformats`` for tools and reasoning):
the error a malformed record raises, text fields checked, and ShareGPT speaker names."""
from __future__ import annotations

# ShareGPT speaker names seen in the wild -> OpenAI roles.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}


class RecordError(ValueError):
    """A record that does not fit its layout; the message is the reason."""


def text_field(value: object, what: str) -> str:
    """A text field: a string, or OpenAI content parts that are all text (joined)."""
    if isinstance(value, list):  # OpenAI content parts: keep the text parts
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(value) or not all(isinstance(p, str) for p in parts):
            raise RecordError(f"{what} has non-text content parts")
        value = "".join(parts)
    if not isinstance(value, str):
        raise RecordError(f"{what} is {type(value).__name__}, expected a string")
    return value
