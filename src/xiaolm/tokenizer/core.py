"""The xiaolm tokenizer: a byte-level BPE ``tokenizers.Tokenizer`` plus the few things every stage needs.

A tokenizer directory is a Hugging Face tokenizer directory (``transformers.AutoTokenizer.from_pretrained`` loads it
with no remote code) with one extra file, ``xiaolm_tokenizer.json``, holding the fingerprint and training stats.

Special tokens sit at the lowest ids so that every vocabulary size agrees on them::

    0 <|endoftext|>   end of every document; also padding
    1 <|im_start|>    ChatML turn start
    2 <|im_end|>      ChatML turn end
    3..7 <|reserved_0|>..<|reserved_4|>   unused, kept for later stages
    8..13 <think> </think> <tool_call> </tool_call> <tool_response> </tool_response>
          (tokenizers trained from now on; an older tokenizer gets them appended by ``add_markers``)

The chat template is ChatML with Qwen3's thinking and tool conventions (``xiaolm.tokenizer.chat``);
``XTokenizer.apply_chat_template`` renders it.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tokenizers import Tokenizer

from xiaolm.tokenizer.chat import CHAT_TEMPLATE, IM_END, IM_START, MARKERS, render_conversation

EOT = "<|endoftext|>"
RESERVED = [f"<|reserved_{i}|>" for i in range(5)]
SPECIAL_TOKENS: list[str] = [EOT, IM_START, IM_END, *RESERVED]  # fixed ids 0..7 in every tokenizer
TRAINED_SPECIAL_TOKENS: list[str] = [*SPECIAL_TOKENS, *MARKERS]  # what training adds first (ids 0..13)

TOKENIZER_FILE = "tokenizer.json"
XIAOLM_FILE = "xiaolm_tokenizer.json"
MODEL_MAX_LENGTH = 4096
# encode_special_tokens is one flag on the shared Rust tokenizer: threads that encode (the server does, off its
# event loop) must not see it toggled halfway, or text could be encoded as control tokens.
_SPECIAL_FLAG_LOCK = threading.RLock()


def fingerprint_of_json(data: dict) -> str:
    """A short, stable hex digest of what decides the ids: vocabulary, merges, added tokens, pre-tokenizer,
    normaliser. Formatting differences between library versions (merges as ``"a b"`` or ``["a", "b"]``,
    indentation, key order) do not change it."""
    model = data.get("model") or {}
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []]
    canonical = {
        "model_type": model.get("type"),
        "vocab": model.get("vocab"),
        "merges": merges,
        "byte_fallback": model.get("byte_fallback", False),
        "added_tokens": sorted(
            (t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens") or []
        ),
        "pre_tokenizer": data.get("pre_tokenizer"),
        "normalizer": data.get("normalizer"),
    }
    text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class XTokenizer:
    """A trained byte-level BPE tokenizer. ``encode`` adds no BOS/EOS; documents get ``eot_id`` appended by the
    sharding stage, chat turns get ChatML markers from ``apply_chat_template``."""

    def __init__(self, tok: Tokenizer, path: str | Path | None = None, info: dict | None = None):
        self.tok = tok
        self.path = Path(path) if path is not None else None
        self.info = dict(info or {})
        for index, token in enumerate(SPECIAL_TOKENS):
            found = tok.token_to_id(token)
            if found != index:
                where = f" in {self.path}" if self.path else ""
                raise ValueError(f"tokenizer{where}: special token {token} has id {found}, expected {index}")
        self.eot_id = 0
        self.im_start_id = 1
        self.im_end_id = 2
        self.pad_id = self.eot_id
        self._refresh()

    def _refresh(self) -> None:
        """Recompute what derives from the vocabulary (after ``self.tok.add_tokens(...)``, for instance)."""
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = fingerprint_of_json(json.loads(self.tok.to_str()))
        self._xiaolm_byte_table = None  # each id's bytes (xiaolm.tokenizer.detok), rebuilt on first use

    # ------------------------------------------------------------------------------------------- encode

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. With ``allow_special`` (the default, as in transformers) a literal
        ``<|im_end|>`` in the text becomes the special token; with ``allow_special=False`` it is encoded as
        ordinary text, which is what raw corpus documents want."""
        with _SPECIAL_FLAG_LOCK:
            if allow_special:
                return self.tok.encode(text, add_special_tokens=False).ids
            return self._without_special(lambda: self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str], allow_special: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (much faster than a Python loop over ``encode``)."""
        texts = list(texts)
        with _SPECIAL_FLAG_LOCK:
            if allow_special:
                return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
            return self._without_special(
                lambda: [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]
            )

    def _without_special(self, fn):
        previous = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = True  # "encode the special tokens' text as ordinary text"
        try:
            return fn()
        finally:
            self.tok.encode_special_tokens = previous

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = False,
                            tools: list | None = None, enable_thinking: bool | None = None) -> str:
        """The chat text for ``messages`` (``xiaolm.tokenizer.chat.render_conversation``); encode it with
        ``encode`` (special tokens are recognised)."""
        return render_conversation(messages, tools=tools, enable_thinking=enable_thinking,
                                   add_generation_prompt=add_generation_prompt)

    @property
    def has_markers(self) -> bool:
        """Whether the thinking / tool markers are tokens of this vocabulary."""
        return all(self.tok.token_to_id(m) is not None for m in MARKERS)

    def add_markers(self) -> int:
        """Append the thinking / tool markers missing from an older vocabulary as special tokens (new ids at the
        end; the fingerprint changes with them). Returns how many were added."""
        from tokenizers import AddedToken

        missing = [m for m in MARKERS if self.tok.token_to_id(m) is None]
        if missing:
            self.tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
            self._refresh()
        return len(missing)

    def special_tokens(self) -> list[tuple[int, str]]:
        """``(id, text)`` of every special token, by id."""
        return sorted((i, t.content) for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.tok.id_to_token(int(index))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"XTokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r}, path={str(self.path)!r})"

    # --------------------------------------------------------------------------------------------- save

    def save(self, out_dir: str | Path, extra_info: dict | None = None) -> Path:
        """Write a Hugging Face tokenizer directory plus ``xiaolm_tokenizer.json``. Returns the directory."""
        from xiaolm.utils import atomic_write_json, atomic_write_text

        self._refresh()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / TOKENIZER_FILE, self.tok.to_str(pretty=True))
        added_tokens_decoder = {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in self.special_tokens()
        }
        markers = [m for m in MARKERS if self.tok.token_to_id(m) is not None]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MODEL_MAX_LENGTH,
            "bos_token": EOT,
            "eos_token": EOT,
            "pad_token": EOT,
            "unk_token": EOT,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "padding_side": "right",
            "model_input_names": ["input_ids", "attention_mask"],
            "additional_special_tokens": [IM_START, IM_END, *markers],
            "added_tokens_decoder": added_tokens_decoder,
            "chat_template": CHAT_TEMPLATE,
        }
        atomic_write_json(out / "tokenizer_config.json", config)
        atomic_write_text(out / "chat_template.jinja", CHAT_TEMPLATE)
        special_map = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT, "unk_token": EOT,
                       "additional_special_tokens": [IM_START, IM_END, *markers]}
        atomic_write_json(out / "special_tokens_map.json", special_map)
        info = dict(self.info)
        info.update(extra_info or {})
        info.update({
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "special_tokens": {t: i for i, t in self.special_tokens()},
            "eot_id": self.eot_id, "im_start_id": self.im_start_id, "im_end_id": self.im_end_id,
            "pad_id": self.pad_id,
        })
        atomic_write_json(out / XIAOLM_FILE, info)
        self.info = info
        self.path = out
        return out


def load_tokenizer(path: str | Path | XTokenizer) -> XTokenizer:
    """Load a tokenizer directory (or its ``tokenizer.json``); an ``XTokenizer`` is returned unchanged."""
    if isinstance(path, XTokenizer):
        return path
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise FileNotFoundError(f"{path}: not a tokenizer directory (no {TOKENIZER_FILE}); "
                                    f"make one with `xiaolm tokenizer train`")
        raise FileNotFoundError(f"tokenizer not found: {path}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ValueError(f"{file}: not a readable tokenizer.json: {exc}") from None
    directory = file.parent
    info = {}
    info_file = directory / XIAOLM_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
    xtok = XTokenizer(tok, path=directory, info=info)
    recorded = info.get("fingerprint")
    if recorded and recorded != xtok.fingerprint:
        raise ValueError(
            f"{directory}: tokenizer.json has fingerprint {xtok.fingerprint} but {XIAOLM_FILE} records "
            f"{recorded}; the directory was edited after training"
        )
    return xtok
