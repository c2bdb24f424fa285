"""What a newcomer reads: the quickstart's stories show no broken characters, no story stops mid-sentence without
saying it was cut, and no stray empty lines. The printing path runs on a tiny model whose next tokens are scripted
(a real Llama underneath, its logits replaced) so that every defect the issue names is forced to happen."""
from __future__ import annotations

import io
import json
import types

import pytest
import torch

from xiaolm.infer.stories import last_sentence_end, trim_story
from xiaolm.tokenizer.detok import BYTE_OF_CHAR

CHAR_OF_BYTE = {b: c for c, b in BYTE_OF_CHAR.items()}


class ScriptedModel(torch.nn.Module):
    """A tiny Llama whose sampled tokens follow ``scripts[row]`` (then end-of-text)."""

    def __init__(self, inner, scripts: list[list[int]], eot: int):
        super().__init__()
        self.inner, self.scripts, self.eot, self.step = inner, scripts, eot, 0
        self.config = inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, ids, **kw):
        out = self.inner(ids, **kw)
        logits = torch.full((ids.shape[0], 1, self.config.vocab_size), -1e9)
        for row, script in enumerate(self.scripts):
            logits[row, 0, script[self.step] if self.step < len(script) else self.eot] = 0.0
        self.step += 1
        return types.SimpleNamespace(logits=logits.to(out.logits.dtype))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def test_trim_story_keeps_what_the_model_ended_and_cuts_back_what_the_budget_cut():
    assert trim_story("小猫睡着了。", "eos") == ("小猫睡着了。", False)
    assert trim_story("小猫睡着了。妈妈笑着说", "length") == ("小猫睡着了。", True)
    assert trim_story("他说：“好的！”然后", "length") == ("他说：“好的！”", True)
    assert trim_story("妈妈笑着说", "length") == ("妈妈笑着说", True)      # no sentence end: kept, marked
    assert last_sentence_end("真的吗？！”他") == len("真的吗？！”")


def test_quickstart_printing_path_shows_no_broken_characters_cut_sentences_or_empty_runs(tok):
    from xiaolm.model.llama import Llama, preset_config
    from xiaolm.quickstart import OPENINGS, QuickstartConfig, show_stories

    def b(data: bytes) -> list[int]:
        return [tok.token_to_id(CHAR_OF_BYTE[x]) for x in data]

    filler = tok.encode("的")
    assert len(filler) == 1
    budget = 40
    length_rows = [
        tok.encode("小美拿着小") + b("花".encode()[:1]) + tok.encode("，蹦蹦跳跳。妈妈笑着说"),   # broken, then cut
        tok.encode("他说：“好的。”然后") + b("妈".encode()[:2]),                                # cut in a character
        tok.encode("妈妈笑着说"),                                                               # no sentence end
    ]
    length_rows = [filler * (budget - len(s)) + s for s in length_rows]
    eos_rows = [tok.encode("犹豫") + b("旁".encode()) + tok.encode("边有一只猫。"), []]
    scripts = length_rows[:1] + eos_rows[:1] + length_rows[1:] + eos_rows[1:]
    assert len(scripts) == len(OPENINGS) and all(len(s) == budget for s in length_rows)

    torch.manual_seed(0)
    inner = Llama(preset_config("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)).eval()
    model = ScriptedModel(inner, scripts, tok.eot_id)
    screen = io.StringIO()
    stories = show_stories(model, tok, QuickstartConfig(max_new_tokens=budget, seed=0), screen)
    printed = screen.getvalue()

    assert "\ufffd" not in printed
    lines = [line.strip() for line in printed.splitlines()]
    assert "\n\n\n" not in printed.strip("\n")          # never more than one empty line in a row
    story_lines = [line for line in lines if any(line.startswith(o) for o in OPENINGS)]
    assert len(story_lines) == 5
    assert story_lines[0].endswith("小美拿着小，蹦蹦跳跳。 [cut at the 40-token budget: ends at its last full sentence]")
    assert "妈妈笑着说" not in story_lines[0]
    assert story_lines[1] == OPENINGS[1] + "犹豫旁边有一只猫。"             # the model ended it: whole, no note
    assert story_lines[2].endswith("他说：“好的。” [cut at the 40-token budget: ends at its last full sentence]")
    assert story_lines[3].endswith("妈妈笑着说… [cut at the 40-token budget]")
    assert story_lines[4] == OPENINGS[4]
    for line in story_lines:   # every story ends at a sentence end, or says it was cut
        assert "[cut at" in line or last_sentence_end(line) == len(line), line
    assert "(3 byte(s) of characters the model left unfinished were left out)" in printed
    assert [s.cut for s in stories] == [True, False, True, True, False]
    assert [s.dropped_bytes for s in stories] == [1, 0, 2, 0, 0]


class ChainModel(torch.nn.Module):
    """A tiny Llama whose next token is ``chain[this token]`` (end-of-text when absent), at every position: the
    output depends only on the input token, so it holds whatever way the server batches and caches rows."""

    def __init__(self, inner, chain: dict[int, int], eot: int):
        super().__init__()
        self.inner, self.chain, self.eot, self.config = inner, chain, eot, inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, *args, **kwargs):
        out = self.inner(input_ids, *args, **kwargs)
        T = out.logits.shape[1]
        nxt = torch.tensor([[self.chain.get(t, self.eot) for t in row] for row in input_ids[:, -T:].tolist()])
        logits = torch.full(out.logits.shape, -1e9, dtype=out.logits.dtype).scatter(2, nxt[..., None], 0.0)
        return types.SimpleNamespace(logits=logits)


def test_the_server_streamed_and_whole_never_shows_a_broken_character(tok):
    from fastapi.testclient import TestClient

    from xiaolm.infer.generate import plain_prompt_ids
    from xiaolm.model.llama import Llama, preset_config
    from xiaolm.serve.app import create_app

    def b(data: bytes) -> list[int]:
        return [tok.token_to_id(CHAR_OF_BYTE[x]) for x in data]

    prompt = plain_prompt_ids(tok, "从前")
    script = (tok.encode("小美拿着") + b("花".encode()[:1]) + tok.encode("，蹦") + b("拿".encode())
              + tok.encode("。她说") + b("好".encode()[:2]))
    assert len(set(script + prompt[-1:])) == len(script) + 1      # each token has one successor
    chain = dict(zip(prompt[-1:] + script[:-1], script))
    torch.manual_seed(0)
    inner = Llama(preset_config("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).eval()
    app = create_app(model=ChainModel(inner, chain, tok.eot_id), tokenizer=tok, model_name="m", max_batch=2)
    # 拿 waits for its third byte; the lone first byte of 花 and the unfinished 好 are left out
    expected = "小美拿着，蹦拿。她说"
    req = {"model": "m", "prompt": "从前", "max_tokens": len(script), "temperature": 0}
    with TestClient(app) as client:
        whole = client.post("/v1/completions", json=req).json()["choices"][0]
        assert whole["text"] == expected and whole["finish_reason"] == "length"
        deltas = []
        with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    deltas += [c["text"] for c in json.loads(line[6:])["choices"]]
        assert "".join(deltas) == expected and not any("\ufffd" in d for d in deltas)
        chat = client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 8, "temperature": 0,
                                                         "messages": [{"role": "user", "content": "你好"}]})
        assert "\ufffd" not in chat.json()["choices"][0]["message"]["content"]


def test_generate_chat_and_eval_instruct_show_clean_text_and_count_what_they_left_out(tok):
    from xiaolm.eval.instruct import generate_answers, render_prompt
    from xiaolm.infer.chat import ChatSession
    from xiaolm.infer.generate import SamplingConfig, chat_prompt_ids, generate_samples, plain_prompt_ids
    from xiaolm.model.llama import Llama, preset_config

    def b(data: bytes) -> list[int]:
        return [tok.token_to_id(CHAR_OF_BYTE[x]) for x in data]

    script = (tok.encode("小美拿着") + b("花".encode()[:1]) + tok.encode("，蹦") + b("拿".encode())
              + tok.encode("。她说") + b("好".encode()[:2]))
    messages = [{"role": "user", "content": "讲个故事"}]
    starts = {plain_prompt_ids(tok, "从前")[-1], chat_prompt_ids(tok, messages)[-1],
              render_prompt(tok, messages, "plain")[-1]}
    assert len(set(script)) == len(script) and not starts & set(script)
    chain = {**{s: script[0] for s in starts}, **dict(zip(script[:-1], script[1:]))}
    torch.manual_seed(0)
    inner = Llama(preset_config("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).eval()
    model = ChainModel(inner, chain, tok.eot_id)
    sampling = SamplingConfig(max_new_tokens=len(script), temperature=0.0)
    expected = "小美拿着，蹦拿。她说"

    streamed: list[str] = []
    [g] = generate_samples(model, tok, ["从前"], sampling, stream=lambda _row, d: streamed.append(d))
    assert (g.text, g.ended, g.dropped_bytes, g.tokens) == (expected, "length", 3, len(script))
    assert "".join(streamed) == expected and not any("\ufffd" in d for d in streamed)

    written, notes = [], []
    answer = ChatSession(model, tok, sampling).reply("讲个故事", written.append, notes.append)
    assert answer == "".join(written) == expected
    assert any("3 byte(s) of unfinished UTF-8 characters left out" in n for n in notes)

    for style in ("chat", "plain"):   # eval instruct's answers (and so its samples in reports)
        assert generate_answers(model, tok, [{"prompt": messages}], style, sampling) == [expected]


def test_alignment_samples_are_read_as_clean_text(tok):
    """On-policy pairs and GRPO rewards read the text of sampled responses: the same detokenizer, the same text."""
    from xiaolm.align.common import sample_responses
    from xiaolm.infer.generate import plain_prompt_ids
    from xiaolm.model.llama import Llama, preset_config

    def b(data: bytes) -> list[int]:
        return [tok.token_to_id(CHAR_OF_BYTE[x]) for x in data]

    prompt = plain_prompt_ids(tok, "从前")
    script = tok.encode("小美拿着") + b("花".encode()[:1]) + tok.encode("，她说") + b("好".encode()[:2])
    assert len(set(script + prompt[-1:])) == len(script) + 1
    torch.manual_seed(0)
    inner = Llama(preset_config("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).eval()
    model = ChainModel(inner, dict(zip(prompt[-1:] + script[:-1], script)), tok.eot_id)
    [[sample]] = sample_responses(model, tok, [prompt], 1, max_new_tokens=len(script))
    assert sample.ids == script and sample.text == "小美拿着，她说"
