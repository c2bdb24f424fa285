"""Tokenizer: byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory.

``load_tokenizer(dir) -> XTokenizer``. Training on texts is ``xiaolm.tokenizer.train.train_bpe``; on a corpus (files,
prepared directories) ``xiaolm.data.vocab.train_tokenizer``, in the data layer above this one.
"""
from xiaolm.tokenizer.chat import (
    CHAT_TEMPLATE,
    MARKERS,
    ParsedAssistant,
    parse_assistant_text,
    render_chat,
    render_conversation,
)
from xiaolm.tokenizer.core import (
    EOT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    XTokenizer,
    load_tokenizer,
)


__all__ = ["CHAT_TEMPLATE", "EOT", "IM_END", "IM_START", "MARKERS", "ParsedAssistant", "SPECIAL_TOKENS", "XTokenizer",
           "load_tokenizer", "parse_assistant_text", "render_chat", "render_conversation"]
