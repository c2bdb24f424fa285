"""Tokenizer: byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory.

``load_tokenizer(dir) -> XTokenizer``; ``train_tokenizer`` lives in ``xiaolm.tokenizer.train`` (imported lazily so
loading a tokenizer does not pull in the training code).
"""
from xiaolm.tokenizer.chat import CHAT_TEMPLATE, render_chat
from xiaolm.tokenizer.core import (
    EOT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    XTokenizer,
    load_tokenizer,
)


def train_tokenizer(*args, **kwargs):
    """See ``xiaolm.tokenizer.train.train_tokenizer``."""
    from xiaolm.tokenizer.train import train_tokenizer as _train

    return _train(*args, **kwargs)


__all__ = ["CHAT_TEMPLATE", "EOT", "IM_END", "IM_START", "SPECIAL_TOKENS", "XTokenizer", "load_tokenizer",
           "render_chat", "train_tokenizer"]
