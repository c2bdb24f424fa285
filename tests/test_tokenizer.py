"""Tokenizer stage: byte-level BPE training, losslessness, special tokens, chat template, Hugging Face loading."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xiaolm.data.vocab import main as train_main
from xiaolm.data.vocab import train_tokenizer
from xiaolm.errors import XiaolmError
from xiaolm.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, XTokenizer, load_tokenizer
from xiaolm.tokenizer.core import TRAINED_SPECIAL_TOKENS, fingerprint_of_json
from xiaolm.tokenizer.train import train_bpe, training_chunks

VOCAB = 640

_WHO = ["小明", "莉莉", "小猫", "老奶奶", "小狗", "妈妈", "老师", "Tom", "Lily"]
_DID = ["去公园玩", "找到了一个红色的气球", "在河边钓鱼", "帮助了迷路的小鸟", "学会了写字", "吃了3个苹果"]
_FEEL = ["很开心", "有点难过", "非常惊讶", "觉得很累", "笑了起来"]
_CHARS = "山水花草树木风雨雪云天地日月星光春夏秋冬东西南北红黄蓝绿白黑大小多少长短高低新旧快慢冷热远近前后左右"


def make_docs(n: int, seed: int) -> list[str]:
    """Small mixed Chinese/English/digit documents with dialogue, punctuation and newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            who, did, feel = rng.choice(_WHO), rng.choice(_DID), rng.choice(_FEEL)
            form = rng.randint(0, 4)
            if form == 0:
                sentences.append(f"{who}{did}，{who}{feel}。")
            elif form == 1:
                sentences.append(f"“{who}，你今天{did}了吗？”{rng.choice(_WHO)}问。")
            elif form == 2:
                sentences.append(f"第{rng.randint(1, 99)}天，{who}说：“I am {rng.choice(['happy', 'tired', 'ok'])}!”")
            elif form == 3:
                sentences.append(f"{who}{feel}！\n")
            else:
                place = "".join(rng.choice(_CHARS) for _ in range(rng.randint(2, 4)))
                sentences.append(f"{who}来到了{place}，看见{rng.choice(_CHARS)}{rng.choice(_CHARS)}。")
        docs.append("".join(sentences))
    return docs


def write_prepared(directory: Path, train: list[str], val: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("val", val)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for i, text in enumerate(docs):
                fh.write(json.dumps({"text": text, "id": f"{name}{i}", "source": "test"}, ensure_ascii=False) + "\n")
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("corpus"), make_docs(1500, 0), make_docs(100, 1))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus_dir)], out, vocab_size=VOCAB, progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> XTokenizer:
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


# ---------------------------------------------------------------------------------------- structure


def test_special_tokens_take_the_lowest_ids(tok):
    assert SPECIAL_TOKENS[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(SPECIAL_TOKENS) == 8
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == index
        assert tok.id_to_token(index) == token
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (0, 1, 2, 0)
    assert tok.vocab_size == VOCAB == len(tok.tok.get_vocab())


def test_saved_pipeline_is_gpt2_byte_level_without_normalizer(tok_dir):
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] is None
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["pre_tokenizer"]["add_prefix_space"] is False
    assert data["pre_tokenizer"]["use_regex"] is True
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE"
    # The whole byte alphabet is in the vocabulary, so no text ever needs an unknown token.
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = data["model"]["vocab"]
    assert all(ch in vocab for ch in ByteLevel.alphabet())
    added = {t["id"]: t for t in data["added_tokens"]}
    assert [added[i]["content"] for i in range(8)] == SPECIAL_TOKENS
    assert all(added[i]["special"] for i in range(8))


def test_tokens_are_capped_at_max_token_length(tok, tmp_path):
    def longest_token_bytes(t: XTokenizer) -> int:
        # A byte-level token string has one character per byte (special tokens, markers included, are not BPE's).
        return max(len(t.id_to_token(i)) for i in range(len(TRAINED_SPECIAL_TOKENS), t.vocab_size))

    assert longest_token_bytes(tok) <= 16
    # A corpus of one phrase repeated: without a cap BPE learns the whole 30-byte phrase as one token.
    phrase_docs = ["小明和小红一起去公园" * 3 for _ in range(300)]
    uncapped = train_tokenizer([_write_txt(tmp_path / "a.txt", phrase_docs)], tmp_path / "uncapped",
                               vocab_size=300, progress=False, max_token_length=0, max_chunk_chars=1000)
    capped = train_tokenizer([_write_txt(tmp_path / "a.txt", phrase_docs)], tmp_path / "capped",
                             vocab_size=300, progress=False, max_token_length=6, max_chunk_chars=1000)
    assert longest_token_bytes(uncapped) > 6
    assert longest_token_bytes(capped) <= 6


def _write_txt(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ lossless

CJK_EXTENSIONS = st.one_of(
    st.characters(min_codepoint=0x3400, max_codepoint=0x4DBF),    # extension A
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),  # extension B
    st.characters(min_codepoint=0x2A700, max_codepoint=0x2EBEF),  # extensions C-F
    st.characters(min_codepoint=0x30000, max_codepoint=0x3134F),  # extension G
)
EMOJI = st.sampled_from(["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇨🇳", "🧑🏻‍💻", "\u200d", "\ufe0f"])
COMMON = st.sampled_from(list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会"
                              "，。！？、；：“”‘’（）《》…—　abcXYZ0123456789 .,!?'\"-_"))
WHITESPACE = st.sampled_from([" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", "\t\t", " \n ", "\u3000", "\xa0"])
# Unicode text only: a lone surrogate (category Cs) is not a character; the readers count such records as malformed
# before any tokenizer sees them (st.text() leaves them out already; st.characters() does not).
ANY_CHARACTER = st.characters(exclude_categories=("Cs",))
MIXED = st.lists(st.one_of(COMMON, CJK_EXTENSIONS, EMOJI, WHITESPACE, ANY_CHARACTER), max_size=60).map("".join)

lossless_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@lossless_settings
@given(text=st.text())
def test_lossless_on_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


@lossless_settings
@given(text=MIXED)
def test_lossless_on_cjk_extensions_emoji_mixed_and_whitespace(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(MIXED, max_size=8))
def test_encode_batch_equals_encode(tok, texts):
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_lossless_on_fixed_hard_cases(tok):
    cases = ["", " ", "\n\n\n", "\t\t  \n", "𠀀𠀁𪜀𫝀𬺰𰀀", "👨‍👩‍👧‍👦🏳️‍🌈", "第3回：小明说“Hello, 世界！”  2024年\r\n",
             "　　孔明笑曰：“吾料之久矣。”", "a\u200bb\u200dc", "\x00\x01\x7f", "ｆｕｌｌ－ｗｉｄｔｈ　１２３"]
    for text in cases:
        assert tok.decode(tok.encode(text)) == text
    # Characters the corpus never had still encode (as bytes), and cost more than one token.
    assert len(tok.encode("𠀀")) == 4


def test_special_tokens_in_text(tok):
    text = "前<|im_end|>后<|endoftext|>"
    with_special = tok.encode(text)
    assert tok.im_end_id in with_special and tok.eot_id in with_special
    as_text = tok.encode(text, allow_special=False)
    assert not set(as_text) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(as_text) == text == tok.decode(with_special)
    assert tok.decode(with_special, skip_special_tokens=True) == "前后"


def test_training_chunks_concatenate_back_and_are_capped():
    text = "天地玄黄宇宙洪荒日月盈昃辰宿列张" * 10 + "。第二句，第三句！\n\nEnglish words, too. 123"
    chunks = list(training_chunks(text, 16))
    assert "".join(chunks) == text
    assert max(len(c) for c in chunks) <= 16
    assert "第二句，" in chunks and "第三句！\n\n" in chunks


@settings(max_examples=200, deadline=None)
@given(text=MIXED, cap=st.integers(1, 40))
def test_training_chunks_property(text, cap):
    chunks = list(training_chunks(text, cap))
    assert "".join(chunks) == text
    assert all(0 < len(c) <= cap for c in chunks)


# ------------------------------------------------------------------------------------ fingerprint, info


def test_fingerprint_is_stable_and_content_based(tok, tok_dir, tmp_path):
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0
    again = load_tokenizer(tok_dir)
    assert again.fingerprint == tok.fingerprint
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").fingerprint == tok.fingerprint
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # Older tokenizers versions write merges as "a b" strings: same tokenizer, same fingerprint.
    old_style = json.loads(json.dumps(data))
    old_style["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    assert fingerprint_of_json(old_style) == tok.fingerprint
    changed = json.loads(json.dumps(data))
    changed["model"]["merges"] = changed["model"]["merges"][:-1]
    assert fingerprint_of_json(changed) != tok.fingerprint


def test_edited_tokenizer_json_is_caught(tok_dir, tmp_path):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(tok_dir, copy)
    data = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = data["model"]["merges"][:-1]
    (copy / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match="fingerprint"):
        load_tokenizer(copy)


def test_info_file_reports_chars_per_token_on_validation(tok, tok_dir, corpus_dir):
    info = json.loads((tok_dir / "xiaolm_tokenizer.json").read_text(encoding="utf-8"))
    assert info["fingerprint"] == tok.fingerprint
    assert info["vocab_size"] == VOCAB
    assert info["special_tokens"]["<|im_end|>"] == 2
    assert info["training"]["documents"] == 1500
    evaluation = info["eval"]
    assert evaluation["measured_on"] == "val"
    assert evaluation["documents"] == 100
    val_texts = [json.loads(line)["text"] for line in open(corpus_dir / "val.jsonl", encoding="utf-8")]
    tokens = sum(len(tok.encode(t, allow_special=False)) for t in val_texts)
    chars = sum(len(t) for t in val_texts)
    assert evaluation["tokens"] == tokens and evaluation["chars"] == chars
    assert evaluation["chars_per_token"] == pytest.approx(chars / tokens, abs=1e-4)
    assert evaluation["chars_per_token"] > 1.0  # merges learnt something beyond single characters
    assert (tok_dir / "config.yaml").is_file()


# ----------------------------------------------------------------------------------- Hugging Face side


def test_directory_files_for_transformers(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert all(v["special"] for v in config["added_tokens_decoder"].values())
    assert (tok_dir / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    special_map = json.loads((tok_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["eos_token"] == "<|endoftext|>"


def test_auto_tokenizer_gives_identical_ids(tok, hf_tok):
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == 0
    assert len(hf_tok) == tok.vocab_size
    samples = make_docs(30, 7) + ["𠀀👨‍👩‍👧 mixed 中文 and English 42\n\n\t", "<|im_start|>user\n你好<|im_end|>\n", ""]
    for text in samples:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf_tok.encode(text) == tok.encode(text)  # no BOS/EOS added by default
        assert hf_tok.decode(tok.encode(text)) == text
    encoded = hf_tok("小明笑了。")
    assert set(encoded.keys()) == {"input_ids", "attention_mask"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=MIXED)
def test_auto_tokenizer_ids_property(tok, hf_tok, text):
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "讲个故事"},
     {"role": "assistant", "content": "从前，有一只小猫。\n它很开心！"}],
    [{"role": "user", "content": "{{ not jinja }} {% raw %} 😀\n\n"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>" + messages[0]["role"] + "\n")
    assert ours.endswith("<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n")
    assert hf_tok.encode(theirs, add_special_tokens=False) == tok.encode(ours)
    ids = tok.encode(ours)
    assert ids.count(tok.im_start_id) == len(messages) + add_generation_prompt
    assert ids.count(tok.im_end_id) == len(messages)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(MIXED, min_size=1, max_size=4), gen=st.booleans())
def test_chat_template_property(tok, hf_tok, contents, gen):
    messages = [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)


# ------------------------------------------------------------------------------------------- CLI, errors


def test_cli_trains_and_reports_chars_per_token(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli_tok"
    code = train_main([str(corpus_dir), "--vocab-size", "400", "--out", str(out), "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert "chars/token" in err and "val text" in err
    loaded = load_tokenizer(out)
    assert loaded.vocab_size == 400
    assert "vocab_size: 400" in (out / "config.yaml").read_text(encoding="utf-8")


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--vocab-size", "--out", "--field", "--max-token-length", "--max-chunk-chars"):
        assert flag in text


def test_missing_input_fails_before_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(XiaolmError, match="input not found"):
        train_main([str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "no_tokenizer_here")


def test_large_corpus_is_sampled_evenly_within_the_budget(corpus_dir, tmp_path):
    total_bytes = (corpus_dir / "train.jsonl").stat().st_size
    budget_mb = total_bytes / 4 / 1e6
    t = train_tokenizer([str(corpus_dir)], tmp_path / "t", vocab_size=400, max_train_mb=budget_mb, progress=False)
    training = t.info["training"]
    assert 0.2 < training["sampled_fraction"] < 0.35
    longest_doc = max(len(d.encode("utf-8")) for d in make_docs(1500, 0))
    assert budget_mb * 1e6 * 0.5 < training["bytes"] <= budget_mb * 1e6 + longest_doc
    # An even sample reads through (nearly) the whole file instead of taking its first quarter.
    assert training["documents_read"] > 0.8 * 1500 and training["documents"] < 0.4 * 1500


def test_too_small_vocab_is_refused(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer([str(corpus_dir)], tmp_path / "t", vocab_size=200)


def test_plain_files_and_malformed_records(tmp_path):
    docs = make_docs(300, 3)
    jsonl = tmp_path / "mixed.jsonl"
    with open(jsonl, "wb") as fh:
        for i, d in enumerate(docs):
            fh.write((json.dumps({"body": d}, ensure_ascii=False) + "\n").encode("utf-8"))
            if i == 10:
                fh.write(b"{not json\n")
            if i == 20:
                fh.write(b'{"other": 1}\n')
            if i == 30:
                fh.write(b'{"body": "\xff\xfe broken"}\n')
    txt = tmp_path / "lines.txt"
    txt.write_text("\r\n".join(d.replace("\n", " ") for d in make_docs(50, 4)) + "\r\n\r\n", encoding="utf-8")
    t = train_tokenizer([str(jsonl), str(txt)], tmp_path / "tok", vocab_size=400, field="body", progress=False)
    training = t.info["training"]
    assert training["documents"] == 350
    assert training["malformed"] == 3
    reasons = {(r["line"], r["reason"].split(" (")[0].split(":")[0]) for r in training["malformed_records"]}
    assert reasons == {(12, "not valid JSON"), (23, "missing field 'body'"), (34, "not UTF-8")}
    assert all(r["file"] == str(jsonl) for r in training["malformed_records"])
    assert t.info["eval"]["measured_on"].startswith("train")


def test_train_bpe_takes_texts_and_matches_the_file_entry(tmp_path):
    docs = make_docs(300, 5)
    path = _write_txt(tmp_path / "docs.txt", [d.replace("\n", " ") for d in docs])
    from_file = train_tokenizer([path], tmp_path / "tok", vocab_size=400, progress=False)
    from_texts, trained = train_bpe(iter(d.replace("\n", " ") for d in docs), 400, progress=False)
    assert from_texts.tok.get_vocab() == from_file.tok.get_vocab()
    assert trained["chunks"] == from_file.info["training"]["chunks"] > 0


def test_tokenizer_package_imports_nothing_from_the_data_layer():
    # The tokenizer sits below data/: reading corpora for it is xiaolm.data.vocab's (lazy imports count too).
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "xiaolm" / "tokenizer"
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith("xiaolm.") and
                      n.split(".")[1] not in ("tokenizer", "utils", "config", "errors")]
    assert found == []


def test_training_prints_no_empty_lines_where_there_is_no_terminal(capfd):
    """The Rust progress bars printed one bare newline per stage (four empty lines in the quickstart's output)."""
    from xiaolm.tokenizer.train import train_bpe

    texts = ["从前，有一个小女孩叫莉莉。她喜欢在花园里玩。" * 20] * 50
    tok, _ = train_bpe(texts, 400, progress=True)
    captured = capfd.readouterr()
    assert tok.vocab_size > 264
    assert captured.out == "" and captured.err == "", (captured.out, captured.err)
