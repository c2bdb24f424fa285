"""The incremental byte-level detokenizer every decoder shares: never U+FFFD for bytes the model will complete; a
sequence that can never complete is dropped and counted. The reference is llama.cpp's rule (hold an incomplete UTF-8
tail back, drop a partial character when generation ends), which on the whole byte string is exactly
``bytes.decode("utf-8", errors="ignore")``."""
from __future__ import annotations

import random

import pytest

from xiaolm.infer.generate import StreamDecoder
from xiaolm.tokenizer.detok import BYTE_OF_CHAR, Detokenizer, byte_table, decode_clean

CHAR_OF_BYTE = {b: c for c, b in BYTE_OF_CHAR.items()}


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def byte_ids(tok, data: bytes) -> list[int]:
    """One token per byte: the forced split (a byte-level vocabulary holds all 256 single bytes)."""
    return [tok.token_to_id(CHAR_OF_BYTE[b]) for b in data]


def all_bytes(tok, ids) -> bytes:
    table = byte_table(tok)
    return b"".join(table[i] for i in ids)


def streamed(tok, ids) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tok)
    return [detok.push(i) for i in ids], detok


def test_a_character_split_over_three_tokens_waits_for_its_last_byte(tok):
    ids = tok.encode("小美拿着") + byte_ids(tok, "花".encode()) + tok.encode("，蹦蹦跳跳。")
    pieces, detok = streamed(tok, ids)
    n = len(tok.encode("小美拿着"))
    assert pieces[n:n + 2] == ["", ""]                # the first two bytes of 花 print nothing
    assert pieces[n + 2] == "花"                      # the third completes it
    assert all("\ufffd" not in p for p in pieces)
    assert detok.finish() == 0 and detok.dropped_bytes == 0
    assert "".join(pieces) == "小美拿着花，蹦蹦跳跳。" == tok.decode(ids)


def test_every_character_split_into_single_bytes_streams_whole_characters(tok):
    text = "犹豫了一下，旁边的小猫说：“好吧！”"
    ids = byte_ids(tok, text.encode())
    pieces, detok = streamed(tok, ids)
    assert "".join(pieces) == text
    assert all(len(p) <= 1 for p in pieces) and "\ufffd" not in "".join(pieces)
    assert detok.finish() == 0


def test_a_sequence_that_can_never_complete_is_dropped_and_counted_not_shown(tok):
    # the model wrote the first byte of 花, then went on with a new character: 花 can never complete
    ids = tok.encode("小美拿着小") + byte_ids(tok, "花".encode()[:1]) + tok.encode("，蹦蹦跳跳")
    pieces, detok = streamed(tok, ids)
    detok.finish()
    whole = "".join(pieces)
    assert tok.decode(ids) == "小美拿着小\ufffd，蹦蹦跳跳"          # what plain decoding shows
    assert whole == "小美拿着小，蹦蹦跳跳"
    assert whole == all_bytes(tok, ids).decode("utf-8", errors="ignore")   # llama.cpp's reference
    assert (detok.dropped_bytes, detok.dropped_chars) == (1, 1)
    assert decode_clean(tok, ids) == (whole, 1)


def test_a_generation_that_ends_inside_a_character_drops_it_at_the_end(tok):
    ids = tok.encode("妈妈笑着") + byte_ids(tok, "说".encode()[:2])
    pieces, detok = streamed(tok, ids)
    assert "".join(pieces) == "妈妈笑着"
    assert detok.pending == "说".encode()[:2]          # held back, not dropped, while the model may go on
    assert detok.finish() == 2 and detok.dropped_chars == 1
    assert "".join(pieces) == all_bytes(tok, ids).decode("utf-8", errors="ignore")


def test_random_token_sequences_streamed_equal_whole_equal_the_reference(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        pieces, detok = streamed(tok, ids)
        detok.finish()
        raw = all_bytes(tok, ids)
        reference = raw.decode("utf-8", errors="ignore")
        assert "".join(pieces) == reference == decode_clean(tok, ids)[0]
        broken = raw.decode("utf-8", errors="replace").count("\ufffd") - reference.count("\ufffd")
        assert detok.dropped_chars == broken


def test_stream_decoder_never_emits_a_replacement_character_and_counts_what_it_dropped(tok):
    ids = (tok.encode("从前，") + byte_ids(tok, "花".encode()[:2]) + tok.encode("小猫说。END")
           + byte_ids(tok, "说".encode()[:1]))
    dec = StreamDecoder(tok, stop=["END"])
    out = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(out) == dec.text() == "从前，小猫说。"
    assert dec.stopped and all("\ufffd" not in p for p in out)
    assert dec.dropped_bytes == 3            # two bytes of 花 mid-text, one of 说 after the stop string


def test_hf_wrapper_of_the_same_tokenizer_has_the_same_bytes(tok, tokenizer_dir):
    from xiaolm.tokenizer.hf import HFTokenizer

    assert byte_table(HFTokenizer(tokenizer_dir)) == byte_table(tok)


def test_the_byte_table_follows_tokens_added_later(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    before = len(byte_table(tok))
    tok.tok.add_tokens(["小猫咪咪"])
    tok._refresh()
    table = byte_table(tok)
    assert len(table) == before + 1 and table[-1] == "小猫咪咪".encode()
    assert decode_clean(tok, tok.encode("小猫咪咪跑了"))[0] == "小猫咪咪跑了"
