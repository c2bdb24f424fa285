"""The serving engine's schedulers: continuous batching (rows join the running batch at every step) gives exactly
what generating each request alone gives; a failing step fails only its rows and the worker goes on; per-token
log-probabilities and OpenAI's frequency/presence penalties."""
from __future__ import annotations

import json
import time

import pytest
import torch

from xiaolm.infer.generate import SamplingConfig, generate, generate_ids
from xiaolm.serve.engine import Engine
from xiaolm.serve.errors import GENERATION_FAILED
from xiaolm.serve.request import GenerationRequest, SamplingParams, derive_seed

SCHEDULERS = ["continuous", "static"]


class Wrapped(torch.nn.Module):
    """The real model behind a hook run before each forward pass (a pause, or an injected failure)."""

    def __init__(self, inner, before=None):
        super().__init__()
        self.inner, self.config, self.before = inner, inner.config, before

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        if self.before is not None:
            self.before(*args, **kwargs)
        return self.inner(*args, **kwargs)


def _ids(tokenizer, text):
    return [tokenizer.eot_id] + tokenizer.encode(text)


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_continuous_batching_admits_rows_mid_run_and_equals_generating_alone(loaded):
    model, tokenizer = loaded
    slow = Wrapped(model, before=lambda *a, **k: time.sleep(0.004))  # so later submits land mid-generation
    engine = Engine(slow, tokenizer, max_batch=3)
    texts = ["从前有一个小女孩", "小猫", "有一天，小明", "狗", "从前，有一个小女孩叫莉莉。" * 3, "天"]
    limits = [60, 5, 12, 25, 20, 9]
    try:
        first = engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, texts[0])], [limits[0]],
                                                SamplingParams(temperature=0.0, ignore_eos=True)))
        _wait(lambda: first.sequences[0].tokens >= 3)
        later = []
        for text, limit in zip(texts[1:], limits[1:]):  # staggered: one every few steps
            later.append(engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, text)], [limit],
                                                         SamplingParams(temperature=0.0))))
            time.sleep(0.01)
        short = later[0].result(timeout=60)[0]
        long_tokens_when_short_ended = first.sequences[0].tokens
        results = [first.result(timeout=60)[0], short] + [r.result(timeout=60)[0] for r in later[1:]]
    finally:
        engine.close()
    # The short request joined the running batch and ended while the long one was still generating.
    assert short.finish_reason in ("stop", "length")
    assert long_tokens_when_short_ended < limits[0]
    assert any(b.requests > 1 for b in engine.stats.recent_batches)  # rows of several requests in one step
    for i, (seq, text, limit) in enumerate(zip(results, texts, limits)):
        alone = generate(model, tokenizer, [text], SamplingConfig(max_new_tokens=limit, temperature=0.0),
                         eos_ids=[] if i == 0 else None)[0]
        assert seq.text == alone, (i, seq.text, alone)
    assert engine.stats.errors == 0


def test_rows_admitted_together_are_prefilled_right_padded_and_still_equal_generating_alone(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=4, autostart=False)  # 7 rows, 4 slots: 3 join as slots free up
    texts = ["小猫", "从前有一个小女孩叫莉莉。", "天", "有一天，小明和他的狗去公园", "狗", "从前", "月亮" * 6]
    limits = [9, 4, 15, 6, 11, 3, 7]
    requests = [engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, t)], [m],
                                                SamplingParams(temperature=0.0, ignore_eos=True)))
                for t, m in zip(texts, limits)]
    engine.start()
    try:
        results = [r.result(timeout=60)[0] for r in requests]
    finally:
        engine.close()
    for seq, text, limit in zip(results, texts, limits):
        alone = generate(model, tokenizer, [text], SamplingConfig(max_new_tokens=limit, temperature=0.0),
                         eos_ids=[])[0]
        assert seq.text == alone and seq.tokens == limit
    assert max(b.size for b in engine.stats.recent_batches) == 4


def test_continuous_rows_with_different_settings_share_steps_and_keep_their_own_sampling(loaded):
    model, tokenizer = loaded
    prompt = _ids(tokenizer, "从前有一个小女孩")
    engine = Engine(model, tokenizer, max_batch=4, autostart=False)
    seeded = engine.submit(GenerationRequest(tokenizer, [prompt], [20],
                                             SamplingParams(temperature=0.9, top_k=20, seed=7, ignore_eos=True)))
    greedy = engine.submit(GenerationRequest(tokenizer, [prompt], [20],
                                             SamplingParams(temperature=0.0, repetition_penalty=1.3,
                                                            ignore_eos=True)))
    engine.start()
    try:
        seeded_text, greedy_text = seeded.result(60)[0].text, greedy.result(60)[0].text
    finally:
        engine.close()
    assert max(b.size for b in engine.stats.recent_batches) == 2
    eos = []
    assert seeded_text == generate(model, tokenizer, [""], SamplingConfig(max_new_tokens=20, temperature=0.9, top_k=20,
                                                                         seed=7), prompt_ids=[prompt], eos_ids=eos)[0]
    assert greedy_text == generate(model, tokenizer, [""], SamplingConfig(max_new_tokens=20, temperature=0.0,
                                                                         repetition_penalty=1.3),
                                   prompt_ids=[prompt], eos_ids=eos)[0]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_huge_and_negative_seeds_cannot_kill_the_worker(loaded, scheduler):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, scheduler=scheduler)
    prompt = _ids(tokenizer, "小猫")
    try:
        for seed in (2 ** 64, 2 ** 63 - 1, -1, -(2 ** 70)):
            seq = engine.submit(GenerationRequest(tokenizer, [prompt] * 2, [4, 4],
                                                  SamplingParams(temperature=1.0, seed=seed))).result(timeout=30)
            assert all(s.finish_reason in ("stop", "length") for s in seq)
        assert engine.alive
    finally:
        engine.close()
    assert not engine.alive
    assert 0 <= derive_seed(2 ** 64, 3) < 2 ** 63 and derive_seed(-1) == 2 ** 63 - 1


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_failing_step_fails_its_rows_with_a_generic_error_and_the_loop_goes_on(loaded, scheduler):
    model, tokenizer = loaded
    poison = _ids(tokenizer, "狗狗狗狗狗狗狗狗狗狗狗狗")

    def before(input_ids, *args, **kwargs):
        if input_ids.shape[1] == len(poison):  # the poisoned prompt's prefill
            raise RuntimeError("secret internal detail")

    engine = Engine(Wrapped(model, before), tokenizer, scheduler=scheduler)
    try:
        bad = engine.submit(GenerationRequest(tokenizer, [poison], [5], SamplingParams(temperature=0)))
        events = list(bad.iter_events(timeout=30))
        errors = [e for e in events if e.kind == "error"]
        assert errors and errors[0].text == GENERATION_FAILED and "secret" not in errors[0].text
        assert bad.sequences[0].finish_reason == "error"
        assert engine.alive
        good = engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, "小猫")], [5],
                                               SamplingParams(temperature=0, ignore_eos=True))).result(timeout=30)
        assert good[0].finish_reason == "length" and good[0].tokens == 5
    finally:
        engine.close()


def test_failures_inside_and_outside_a_step_do_not_stop_the_continuous_worker(loaded, monkeypatch):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer)
    calls = {"decode": 0, "admit": 0}
    real_decode, real_admit = Engine._decode, Engine._admit

    def flaky_decode(self, rows):
        calls["decode"] += 1
        if calls["decode"] == 2:
            raise IndexError("boom")
        return real_decode(self, rows)

    def flaky_admit(self, slots):  # outside any step's own try: the loop's last line of defence
        calls["admit"] += 1
        if calls["admit"] == 3:
            raise KeyError("bookkeeping")
        return real_admit(self, slots)

    monkeypatch.setattr(Engine, "_decode", flaky_decode)
    monkeypatch.setattr(Engine, "_admit", flaky_admit)
    params = SamplingParams(temperature=0, ignore_eos=True)
    try:
        first = engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, "小猫")], [6], params))
        assert [e.text for e in first.iter_events(timeout=30) if e.kind == "error"] == [GENERATION_FAILED]
        assert first.sequences[0].finish_reason == "error"
        for _ in range(3):
            after = engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, "小猫")], [6], params))
            assert after.result(timeout=30)[0].finish_reason == "length"
        assert engine.alive and engine.stats.errors == 1 and calls["admit"] > 3
    finally:
        engine.close()


def _reference_logprobs(model, prompt, tokens):
    """log_softmax of the model's logits at every generated position, computed in one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_logprobs_are_the_models_own_and_top_logprobs_are_sorted(loaded, scheduler):
    model, tokenizer = loaded
    prompt = _ids(tokenizer, "从前有一个小女孩")
    engine = Engine(model, tokenizer, scheduler=scheduler)
    try:
        seq = engine.submit(GenerationRequest(tokenizer, [prompt], [12], SamplingParams(
            temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3))).result(timeout=30)[0]
    finally:
        engine.close()
    tokens = seq.decoder.ids
    assert [e.token for e in seq.logprobs] == tokens and len(tokens) == 12
    ref = _reference_logprobs(model, prompt, tokens)
    for entry, row, token in zip(seq.logprobs, ref, tokens):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][0] == token  # greedy: the chosen token is the most likely
        assert [lp for _i, lp in entry.top] == sorted((lp for _i, lp in entry.top), reverse=True)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_frequency_and_presence_penalties_follow_openais_definition(loaded, scheduler):
    model, tokenizer = loaded
    prompt = _ids(tokenizer, "从前")
    freq, pres = 0.7, 0.4
    engine = Engine(model, tokenizer, scheduler=scheduler)
    try:
        seq = engine.submit(GenerationRequest(tokenizer, [prompt], [30], SamplingParams(
            temperature=0.0, ignore_eos=True, frequency_penalty=freq, presence_penalty=pres))).result(timeout=30)[0]
        plain = engine.submit(GenerationRequest(tokenizer, [prompt], [30], SamplingParams(
            temperature=0.0, ignore_eos=True))).result(timeout=30)[0]
    finally:
        engine.close()
    # mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c = counts in the generated tokens
    expected, counts = [], torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([prompt + expected])).logits[0, -1].float()
            token = int((logits - freq * counts - pres * (counts > 0)).argmax())
            expected.append(token)
            counts[token] += 1
    assert seq.decoder.ids == expected
    assert plain.decoder.ids != expected  # the penalties changed something


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_echo_scoring_gives_every_prompt_tokens_logprob_without_generating(loaded, scheduler):
    model, tokenizer = loaded
    prompt = _ids(tokenizer, "从前有一个小女孩叫莉莉。")
    engine = Engine(model, tokenizer, scheduler=scheduler)
    try:
        seq = engine.submit(GenerationRequest(tokenizer, [prompt], [0], SamplingParams(temperature=0.0),
                                              prompt_logprobs=2)).result(timeout=30)[0]
    finally:
        engine.close()
    assert seq.tokens == 0 and seq.finish_reason == "length"
    entries = seq.prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    ref = _reference_logprobs(model, prompt[:1], prompt[1:])
    for entry, row, token in zip(entries[1:], ref, prompt[1:]):
        assert entry.token == token and entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(entry.top) == 2


# ------------------------------------------------------------------------------------------- over HTTP

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from xiaolm.serve.app import create_app  # noqa: E402

MODEL = "tiny"
CHAT = [{"role": "user", "content": "讲一个关于小猫的故事。"}]


@pytest.fixture(scope="module")
def client(loaded):
    model, tokenizer = loaded
    with TestClient(create_app(model=model, tokenizer=tokenizer, model_name=MODEL, max_batch=4)) as c:
        yield c


def _chat_ids(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_chat_logprobs_in_openais_shape_streamed_and_not(client, loaded):
    model, tokenizer = loaded
    req = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 3,
           "ignore_eos": True}
    choice = client.post("/v1/chat/completions", json=req).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 8 and choice["logprobs"]["refusal"] is None
    assert bytes(b for item in content for b in item["bytes"]).decode("utf-8", "replace") == \
        choice["message"]["content"]
    ids = _chat_ids(tokenizer, CHAT)
    tokens = generate_ids(model, [ids], 8, pad_id=tokenizer.pad_id, eos_ids=[], temperature=0.0)[0]
    ref = _reference_logprobs(model, ids, tokens)
    for item, row, token in zip(content, ref, tokens):
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert len(item["top_logprobs"]) == 3 and item["top_logprobs"][0]["token"] == item["token"]
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [item for c in chunks for ch in c["choices"] if ch["logprobs"] for item in ch["logprobs"]["content"]]
    assert streamed == content
    bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_completions_echo_scores_the_prompt_as_lm_eval_harness_asks(client, loaded):
    model, tokenizer = loaded
    text = "从前有一个小女孩叫莉莉。"
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for max_tokens in (0, 1):  # lm-eval's local-completions sends echo=True, logprobs=1 and max_tokens 0 or 1
        body = client.post("/v1/completions", json={"model": MODEL, "prompt": text, "echo": True, "logprobs": 1,
                                                    "max_tokens": max_tokens, "temperature": 0}).json()
        choice = body["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(text)
        assert len(lp["tokens"]) == len(ids) - 1 + max_tokens  # the prepended <|endoftext|> is not echoed
        assert "".join(lp["tokens"][: len(ids) - 1]) == text
        for k, token in enumerate(ids[1:]):  # each prompt token given everything before it
            assert lp["token_logprobs"][k] == pytest.approx(float(full[k, token]), abs=1e-4)
            assert len(lp["top_logprobs"][k]) == 1
        assert lp["text_offset"][: len(ids) - 1] == [len(tokenizer.decode(ids[1: 1 + k])) for k in range(len(ids) - 1)]
    # token-id prompts are scored as given: the first token has no context, so no logprob (OpenAI's null)
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "echo": True, "logprobs": 0,
                                                "max_tokens": 0}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(full[k, t]) for k, t in enumerate(ids[1:])], abs=1e-4)
    bad = client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_completion_logprobs_stream_matches_non_streamed(client):
    req = {"model": MODEL, "prompt": "从前", "max_tokens": 6, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [ch["logprobs"] for c in chunks for ch in c["choices"] if ch["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole[key]


def test_penalties_through_the_api_and_their_range(client):
    req = {"model": MODEL, "messages": CHAT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    plain = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    penalised = client.post("/v1/chat/completions", json={**req, "frequency_penalty": 2.0,
                                                          "presence_penalty": 2.0}).json()
    assert penalised["choices"][0]["message"]["content"] != plain
    r = client.post("/v1/chat/completions", json={**req, "presence_penalty": 2.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


def test_a_failing_generation_is_a_500_without_our_exception_text_and_the_server_goes_on(loaded):
    model, tokenizer = loaded
    poison = _chat_ids(tokenizer, [{"role": "user", "content": "狗狗狗狗狗狗狗狗狗"}])

    def before(input_ids, *args, **kwargs):
        if input_ids.shape[1] == len(poison):
            raise RuntimeError("secret internal detail")

    app = create_app(model=Wrapped(model, before), tokenizer=tokenizer, model_name=MODEL)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "狗狗狗狗狗狗狗狗狗"}]})
        assert r.status_code == 500
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        assert "secret" not in r.text and "RuntimeError" not in r.text
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 3,
                                                 "seed": 2 ** 64})
        assert r.status_code in (200, 400)  # answered (or refused as out of range), never a dead worker
        assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                    "max_tokens": 3}).status_code == 200
        assert app.state.engine.alive


def test_a_quantised_model_is_served_by_the_continuous_engine(tiny_run, tmp_path):
    from xiaolm.infer.quantize import quantize_run
    from xiaolm.model.io import load_quantized

    quantize_run(tiny_run, tmp_path / "q8", bits=8)
    model, tokenizer, _info = load_quantized(tmp_path / "q8")
    engine = Engine(model, tokenizer)
    prompt = _ids(tokenizer, "从前有一个小女孩")
    try:
        seq = engine.submit(GenerationRequest(tokenizer, [prompt], [10], SamplingParams(
            temperature=0.0, ignore_eos=True))).result(timeout=30)[0]
    finally:
        engine.close()
    alone = generate(model, tokenizer, [""], SamplingConfig(max_new_tokens=10, temperature=0.0), prompt_ids=[prompt],
                     eos_ids=[])[0]
    assert seq.finish_reason == "length" and seq.text == alone


class EosFirst(Wrapped):
    """The real model with the end-of-text logit raised far above the rest: every row ends at its first token."""

    def __init__(self, inner, eos_id: int):
        super().__init__(inner)
        self.eos_id = eos_id

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        logits = out.logits.clone()
        logits[..., self.eos_id] += 50.0
        return out._replace(logits=logits)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_row_that_ends_at_end_of_text_reports_that_tokens_logprob(loaded, scheduler):
    model, tokenizer = loaded
    engine = Engine(EosFirst(model, tokenizer.eot_id), tokenizer, scheduler=scheduler)
    try:
        seq = engine.submit(GenerationRequest(tokenizer, [_ids(tokenizer, "从前")], [3], SamplingParams(
            temperature=0.0, logprobs=True, top_logprobs=1))).result(timeout=30)[0]
    finally:
        engine.close()
    assert seq.tokens == 0 and seq.text == "" and seq.finish_reason == "stop"
    (entry,) = seq.logprobs
    assert entry.token == tokenizer.eot_id and entry.logprob > -1e-3 and entry.top[0][0] == tokenizer.eot_id


def test_lm_eval_harness_local_completions_parses_our_scores(loaded):
    """lm-evaluation-harness's own payload and parser (local-completions, loglikelihood): echo=True, logprobs=1,
    max_tokens=1 on token ids; it sums token_logprobs[ctxlen:-1], dropping the one generated token."""
    openai_completions = pytest.importorskip("lm_eval.models.openai_completions")
    from types import SimpleNamespace

    model, tokenizer = loaded
    api = openai_completions.LocalCompletionsAPI
    context = [tokenizer.eot_id] + tokenizer.encode("从前有一个小女孩")
    continuation = tokenizer.encode("叫莉莉。")
    ids = context + continuation
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = sum(float(full[k - 1, ids[k]]) for k in range(len(context), len(ids)))
    greedy = all(int(full[k - 1].argmax()) == ids[k] for k in range(len(context), len(ids)))
    for wrapped in (model, EosFirst(model, tokenizer.eot_id)):  # also when the one generated token is end-of-text
        with TestClient(create_app(model=wrapped, tokenizer=tokenizer, model_name=MODEL)) as c:
            payload = api._create_payload(SimpleNamespace(model=MODEL), [ids], generate=False, seed=1234)
            out = c.post("/v1/completions", json=payload)
            assert out.status_code == 200, out.text
            ((logprob, is_greedy),) = api.parse_logprobs(out.json(), [ids], [len(context)])
        if wrapped is model:
            assert logprob == pytest.approx(expected, abs=1e-3) and is_greedy == greedy
        else:
            assert len(out.json()["choices"][0]["logprobs"]["tokens"]) == len(ids) + 1


def test_row_kv_cache_rows_at_different_lengths_match_running_each_alone(loaded):
    from xiaolm.infer.cache import RowKVCache

    model, tokenizer = loaded
    prompts = [_ids(tokenizer, "从前有一个小女孩叫莉莉。"), _ids(tokenizer, "小猫")]
    cache = RowKVCache(model.config, 3, model.config.max_position_embeddings, "cpu", torch.float32)
    with torch.no_grad():
        cache.rows = torch.tensor([2, 0])  # not neighbours, right-padded together
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
        logits = model(ids, position_ids=torch.arange(width).expand(2, width), cache=cache).logits
        steps = [[int(logits[b, len(p) - 1].argmax())] for b, p in enumerate(prompts)]
        for _ in range(4):  # decode both rows in slots [0, 3) (slot 1 idle), each at its own position
            cache.rows = slice(0, 3)
            pos = [len(prompts[1]) + len(steps[1]) - 1, 0, len(prompts[0]) + len(steps[0]) - 1]
            out = model(torch.tensor([[steps[1][-1]], [0], [steps[0][-1]]]), position_ids=torch.tensor(pos)[:, None],
                        cache=cache, logits_to_keep=1).logits[:, -1]
            for b, slot in ((0, 2), (1, 0)):
                alone = model(torch.tensor([prompts[b] + steps[b]]), logits_to_keep=1).logits[0, -1]
                torch.testing.assert_close(out[slot], alone, atol=1e-4, rtol=1e-4)
                steps[b].append(int(out[slot].argmax()))


# ------------------------------------------------------- issue 26, defect 1: a poisoned row fails alone


def _poison_beside_two_streams(model, tokenizer, poisoned: bool):
    """Two normal requests (one seeded sampling, one greedy) and, when ``poisoned``, a row whose repetition
    penalty (1e-300, past the server's validation: the engine is called directly) turns its logits into infinity.
    All are queued before the worker starts, so they share the prefill and every decode step."""
    prompt = _ids(tokenizer, "从前有一个小女孩")
    engine = Engine(model, tokenizer, max_batch=4, autostart=False)
    normal = [GenerationRequest(tokenizer, [prompt], [24], SamplingParams(temperature=0.9, seed=7, ignore_eos=True)),
              GenerationRequest(tokenizer, [prompt], [24], SamplingParams(temperature=0.0, ignore_eos=True))]
    bad = []
    if poisoned:
        bad = [GenerationRequest(tokenizer, [prompt], [24], SamplingParams(temperature=0.9, repetition_penalty=1e-300)),
               GenerationRequest(tokenizer, [prompt], [24], SamplingParams(temperature=0.0, repetition_penalty=1e-300))]
    try:
        for request in bad[:1] + normal + bad[1:]:
            engine.submit(request)
        engine.start()
        texts = [(r.result(timeout=60)[0].text, r.sequences[0].finish_reason) for r in normal]
        for r in bad:
            with pytest.raises(RuntimeError, match="Generation failed on the server"):
                r.result(timeout=60)
            assert r.sequences[0].finish_reason == "error"
        return texts, engine.stats.errors
    finally:
        engine.close()


def test_a_row_whose_numbers_go_bad_fails_alone_and_the_others_finish_byte_identical(loaded):
    model, tokenizer = loaded
    alone, errors_alone = _poison_beside_two_streams(model, tokenizer, poisoned=False)
    beside, errors_beside = _poison_beside_two_streams(model, tokenizer, poisoned=True)
    assert [reason for _t, reason in alone] == ["length", "length"] and all(text for text, _r in alone)
    assert beside == alone  # same text, byte for byte, and same finish reasons
    assert (errors_alone, errors_beside) == (0, 2)


def test_sample_rows_flags_bad_rows_and_leaves_the_others_draws_unchanged():
    from xiaolm.infer.generate import sample_next, sample_rows

    logits = torch.randn(3, 50)
    poisoned = logits.clone()
    poisoned[1, 4] = float("inf")
    for temperature, top_p in ((0.8, 1.0), (0.8, 0.9), (0.0, 1.0)):
        clean = sample_rows(logits, temperature, 5, top_p, torch.Generator().manual_seed(3))
        mixed = sample_rows(poisoned, temperature, 5, top_p, torch.Generator().manual_seed(3))
        assert mixed[1] == -1 and mixed[[0, 2]].tolist() == clean[[0, 2]].tolist()
    nan = logits.clone()
    nan[2, 0] = float("nan")
    assert sample_rows(nan, 1.0)[2] == -1
    with pytest.raises(FloatingPointError, match=r"row\(s\) \[2\]"):
        sample_next(nan, 1.0)


# ------------------------------------------------------------- issue 26, defect 10: a fair share of the batch


def _small_beside_heavy(model, tokenizer, fair_share: bool):
    """A heavy client queues two requests of n=8 (16 rows, 8 slots); once they run, a small one-row request from
    another client arrives. Returns how many tokens the heavy client's first request had when the small one ended,
    and what each client held at most."""
    slow = Wrapped(model, before=lambda *a, **k: time.sleep(0.002))
    engine = Engine(slow, tokenizer, max_batch=8, autostart=False, fair_share=fair_share)
    prompt = _ids(tokenizer, "从前有一个小女孩")
    heavy = [GenerationRequest(tokenizer, [prompt] * 8, [30] * 8, SamplingParams(temperature=0.0, ignore_eos=True),
                               client="heavy") for _ in range(2)]
    small = GenerationRequest(tokenizer, [prompt], [3], SamplingParams(temperature=0.0, ignore_eos=True),
                              client="small")
    try:
        for request in heavy:
            engine.submit(request)
        engine.start()
        _wait(lambda: heavy[0].sequences[0].tokens >= 2)
        engine.submit(small)
        small.result(timeout=60)
        heavy_tokens = sum(s.tokens for s in heavy[0].sequences)
        for request in heavy:
            assert [s.finish_reason for s in request.result(timeout=120)] == ["length"] * 8
        return heavy_tokens
    finally:
        engine.close()


def test_a_small_request_does_not_wait_behind_a_heavy_clients_queue(loaded):
    model, tokenizer = loaded
    fair = _small_beside_heavy(model, tokenizer, fair_share=True)
    fifo = _small_beside_heavy(model, tokenizer, fair_share=False)
    # First come, first served: the small row queued behind all 16 heavy rows, so the heavy client's first request
    # (8 rows x 30 tokens) had ended before it. Fair: it took the slot kept for newcomers at the next step.
    assert fifo == 8 * 30
    assert fair < 7 * 30 // 2, fair  # well before the heavy request's half-way point


def test_fair_admission_goes_client_by_client_fewest_running_first(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch=4, autostart=False)
    prompt = _ids(tokenizer, "小猫")
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    a = GenerationRequest(tokenizer, [prompt] * 4, [2] * 4, params, client="a")
    b = GenerationRequest(tokenizer, [prompt] * 2, [2] * 2, params, client="b")
    c = GenerationRequest(tokenizer, [prompt], [2], params, client="c")
    for request in (a, b, c):
        engine.submit(request)
    slots = [None] * 4
    admitted = engine._admit(slots)  # the lock is not needed: the worker never started
    assert [r.seq.request.client for r in admitted] == ["a", "b", "c", "a"]
    engine.close()
