"""Readers for tool-calling and reasoning data (glaive ShareGPT, OpenAI tool_calls, DeepSeek-R1), SFT's encoding of
them, and the markers added to an older tokenizer with embedding rows for them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xiaolm.data.formats import load_file
from xiaolm.tokenizer.chat import MARKERS, encode_conversation, render_conversation
from xiaolm.train.sft import add_chat_markers, encode_all

GLAIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory_demo_zh" / "glaive_toolcall_zh_demo.json"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


TOOLS_STR = json.dumps([{"name": "calc", "description": "算", "parameters": {"type": "object", "properties": {
    "e": {"type": "string"}}}}], ensure_ascii=False)


def glaive(call_value: str, tools: str = TOOLS_STR) -> dict:
    return {"conversations": [{"from": "human", "value": "2*3?"}, {"from": "function_call", "value": call_value},
                              {"from": "observation", "value": "6"}, {"from": "gpt", "value": "是 6。"}],
            "tools": tools}


def test_glaive_layout_and_malformed_tool_json_reported_with_line(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [
        glaive('{"name": "calc", "arguments": {"e": "2*3"}}'),
        glaive('{"name": "calc", "arguments": {"e": "2*3"'),  # line 2: cut JSON
        glaive('{"name": "calc", "arguments": {"e": "2*3"}}', tools="[{not json"),  # line 3
        glaive('{"arguments": {}}'),  # line 4: no name
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"}]},  # line 5
        glaive('{"name": "calc", "arguments": "{\\"e\\": \\"1+1\\"}"}'),  # arguments as a JSON string
    ])
    convs, report = load_file(path)
    assert report.loaded == 2 and report.skipped == 4
    problems = [str(p) for p in report.problems]
    assert problems[0].startswith(f"{path}:2: malformed tool JSON in 'conversations[1]'")
    assert problems[1].startswith(f"{path}:3: malformed tool JSON in field 'tools'")
    assert problems[2].startswith(f"{path}:4: malformed tool call in 'conversations[1]': no 'name'")
    assert problems[3].startswith(f"{path}:5:") and "needs an assistant call before it" in problems[3]
    first = convs[0]
    assert first.tools == [{"type": "function", "function": json.loads(TOOLS_STR)[0]}]
    assert first.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "calc", "arguments": {"e": "2*3"}}}]}
    assert first.messages[2] == {"role": "tool", "content": "6"}
    assert convs[1].messages[1]["tool_calls"][0]["function"]["arguments"] == {"e": "1+1"}


@pytest.mark.skipif(not GLAIVE.is_file(), reason="../shared/data/llamafactory_demo_zh is not present")
def test_real_glaive_sample():
    convs, report = load_file(GLAIVE)
    assert report.loaded + report.skipped == 300 and report.loaded >= 290
    assert all(str(p).startswith(f"{GLAIVE}:") for p in report.problems)
    with_calls = [c for c in convs if any(m.get("tool_calls") for m in c.messages)]
    assert len(with_calls) > 100 and all(c.tools for c in with_calls)
    text = render_conversation(with_calls[0].messages, tools=with_calls[0].tools)
    assert "<tool_call>\n{\"name\": " in text and "<tool_response>" in text and "# Tools" in text


def test_openai_tool_calls_and_reasoning_layouts(tmp_path):
    tools = [{"type": "function", "function": {"name": "weekday", "parameters": {"type": "object"}}}]
    path = write_jsonl(tmp_path / "o.jsonl", [
        {"messages": [{"role": "user", "content": "哪天？"},
                      {"role": "assistant", "content": None, "reasoning_content": "查一下",
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "weekday", "arguments": "{\"date\": \"2026-12-07\"}"}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "星期一"},
                      {"role": "assistant", "content": "星期一。"}], "tools": tools},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weekday", "arguments": "{oops"}}]}]},
        {"input": "1+1?", "reasoning_content": "一加一得二。", "content": "2", "repo_name": "r1"},
        {"instruction": "讲", "output": "<think>\n想\n</think>\n\n好"},
    ])
    convs, report = load_file(path)
    assert report.loaded == 3 and report.skipped == 1
    assert str(report.problems[0]).startswith(f"{path}:2: malformed tool JSON in 'messages[1]'.tool_calls[0]")
    assert report.format == "openai+alpaca+reasoning" or set(report.format.split("+")) == {"openai", "alpaca",
                                                                                            "reasoning"}
    tool_conv, r1, alpaca = convs
    assert tool_conv.messages[1]["reasoning_content"] == "查一下"
    assert tool_conv.messages[1]["tool_calls"][0] == {"id": "c1", "type": "function", "function": {
        "name": "weekday", "arguments": {"date": "2026-12-07"}}}
    assert tool_conv.messages[2]["tool_call_id"] == "c1" and tool_conv.tools == tools
    assert r1.messages == [{"role": "user", "content": "1+1?"},
                           {"role": "assistant", "reasoning_content": "一加一得二。", "content": "2"}]
    assert render_conversation(r1.messages).endswith("<think>\n一加一得二。\n</think>\n\n2<|im_end|>\n")
    assert render_conversation(alpaca.messages).endswith("<think>\n想\n</think>\n\n好<|im_end|>\n")


def test_sft_encoding_learns_calls_and_answers_never_schemas_or_results(tokenizer_dir):
    from xiaolm.tasks.agent import make_problem, solve
    from xiaolm.tasks.toolbox import TOOLS
    from xiaolm.tokenizer import load_tokenizer

    import random

    tok = load_tokenizer(tokenizer_dir)
    rec = solve(make_problem("date_weekday", random.Random(0), False), thinking=True, tool_names=list(TOOLS)[:3])
    examples, stats = encode_all(tok, [rec["messages"]], seq_len=4096, tools=[rec["tools"]])
    ids, mask = encode_conversation(tok, rec["messages"], tools=rec["tools"])
    ex = examples[0]
    assert list(ex.inputs) == ids[:-1]
    assert [t != -100 for t in ex.targets] == mask[1:]
    learnt = tok.decode([i for i, m in zip(ids, mask) if m])
    unlearnt = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in rec["messages"]:
        if m["role"] == "assistant":
            assert m["reasoning_content"] in learnt
            for c in m.get("tool_calls") or []:
                assert json.dumps(c["function"]["arguments"], ensure_ascii=False) in learnt
        elif m["role"] == "tool":
            assert m["content"] in unlearnt and f"<tool_response>\n{m['content']}" not in learnt
        else:
            assert m["content"] in unlearnt
    assert "# Tools" not in learnt and '"parameters"' not in learnt and "# Tools" in unlearnt
    assert stats.label_tokens == sum(mask[1:])


def test_older_tokenizer_gets_markers_and_embedding_rows():
    from tokenizers import pre_tokenizers, trainers

    from xiaolm.model.llama import Llama, LlamaConfig
    from xiaolm.tokenizer.core import SPECIAL_TOKENS, XTokenizer
    from xiaolm.tokenizer.train import _build_tokenizer

    raw = _build_tokenizer()
    raw.train_from_iterator(["小明笑了。小红哭了。"] * 50, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    for tied in (True, False):
        tok = XTokenizer(raw.__class__.from_str(raw.to_str()))
        old = tok.vocab_size
        model = Llama(LlamaConfig(vocab_size=old, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=tied))
        before = model.model.embed_tokens.weight.detach().clone()
        note = add_chat_markers(model, tok)
        assert note and f"ids {old}..{old + 5}" in note
        w = model.model.embed_tokens.weight
        assert w.shape[0] == old + 6 == model.config.vocab_size == model.lm_head.weight.shape[0]
        assert torch.equal(w[:old], before)
        assert torch.allclose(w[old:], before.mean(0).expand(6, -1))
        assert (model.lm_head.weight is w) == tied
        ids = torch.tensor([[tok.token_to_id(m) for m in MARKERS]])
        assert model(ids).logits.shape == (1, 6, old + 6)
        assert add_chat_markers(model, tok) is None
