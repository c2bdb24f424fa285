"""Hugging Face tokenizer directories: ``load_hf_tokenizer`` reads ours as ``XTokenizer`` and anyone else's as
``HFTokenizer``, which offers the same methods (see its docstring for what differs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from xiaolm.errors import ExportError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "xiaolm_tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


class HFImportError(ExportError):
    """A Hugging Face directory this model cannot represent, or cannot read."""


def load_hf_tokenizer(path: str | Path, model_conf: Optional[dict] = None):
    """Our ``XTokenizer`` when the directory holds a xiaolm tokenizer (an export round trip), else an
    ``HFTokenizer`` wrapping whatever ``tokenizer.json`` it holds."""
    from xiaolm.tokenizer import load_tokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise HFImportError(f"{path}: no tokenizer.json (only fast tokenizers are supported; a slow "
                            f"SentencePiece-only tokenizer can be converted with transformers first)")
    try:
        return load_tokenizer(path)
    except ValueError:
        return HFTokenizer(path, model_conf)


class HFTokenizer:
    """Someone else's Hugging Face fast tokenizer behind ``XTokenizer``'s methods.

    Differences from ``XTokenizer``: special tokens are wherever that tokenizer puts them. ``eot_id`` is its eos
    token (falling back to bos), ``pad_id`` its pad token (else ``eot_id``), ``im_start_id`` / ``im_end_id`` are the
    ids of ``<|im_start|>`` / ``<|im_end|>`` when it has them (else None). ``apply_chat_template`` uses its own
    template (ChatML when it has none). Encoding never adds BOS/EOS, like ours. Data tokenised for xiaolm must use
    this same tokenizer (the fingerprint check enforces it).
    """

    def __init__(self, path: str | Path, model_conf: Optional[dict] = None):
        from tokenizers import Tokenizer

        from xiaolm.tokenizer.core import fingerprint_of_json

        self.path = Path(path)
        file = self.path / "tokenizer.json"
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise HFImportError(f"{file}: not a readable tokenizer.json: {exc}") from None
        conf_file = self.path / "tokenizer_config.json"
        self.config = json.loads(conf_file.read_text(encoding="utf-8")) if conf_file.is_file() else {}
        self.info = {}
        model_conf = model_conf or {}
        self.chat_template = self.config.get("chat_template")
        if (self.path / "chat_template.jinja").is_file():
            self.chat_template = (self.path / "chat_template.jinja").read_text(encoding="utf-8")

        def special(name: str, conf_key: str) -> Optional[int]:
            token = self.config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and self.tok.token_to_id(token) is not None:
                return self.tok.token_to_id(token)
            v = model_conf.get(conf_key)
            return (v[0] if v else None) if isinstance(v, list) else v

        eos = special("eos_token", "eos_token_id")
        bos = special("bos_token", "bos_token_id")
        pad = special("pad_token", "pad_token_id")
        self.eot_id = eos if eos is not None else (bos if bos is not None else 0)
        self.pad_id = pad if pad is not None else self.eot_id
        self.im_start_id = self.tok.token_to_id("<|im_start|>")
        self.im_end_id = self.tok.token_to_id("<|im_end|>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = fingerprint_of_json(json.loads(self.tok.to_str()))

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self.tok.encode(text, add_special_tokens=False).ids
        previous = self.tok.encode_special_tokens
        self.tok.encode_special_tokens = True
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = previous

    def encode_batch(self, texts, allow_special: bool = True) -> list[list[int]]:
        return [self.encode(t, allow_special) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        from xiaolm.tokenizer import render_chat

        if not self.chat_template:
            return render_chat(messages, add_generation_prompt=add_generation_prompt)
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)

        def raise_exception(message):
            raise ValueError(f"{self.path}: chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                    if k.endswith("_token") and isinstance(v, (str, dict))}
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **specials)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def id_to_token(self, index: int) -> Optional[str]:
        return self.tok.id_to_token(int(index))

    def __len__(self) -> int:
        return self.vocab_size

    def save(self, out_dir: str | Path, extra_info: Optional[dict] = None) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file() and (self.path / name).resolve() != (out / name).resolve():
                shutil.copyfile(self.path / name, out / name)
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"
