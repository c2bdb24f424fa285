"""Generation: the KV cache and batching change nothing but speed; streaming never prints a broken character."""
from __future__ import annotations

import torch

from xiaolm.infer.generate import (
    SamplingConfig,
    StreamDecoder,
    apply_repetition_penalty,
    generate,
    generate_ids,
    sample_next,
)
from xiaolm.model.llama import Llama, preset_config


def _model(vocab=120, seed=0):
    torch.manual_seed(seed)
    model = Llama(preset_config("tiny", vocab_size=vocab, max_position_embeddings=128)).eval()
    # Sharpen the random model so greedy choices are not near-ties.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8)
    return model


def _prompts(vocab=120):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 11, 1, 8)]


def test_greedy_with_cache_equals_without_cache():
    model = _model()
    prompts = _prompts()
    kw = dict(pad_id=0, eos_ids=[], temperature=0.0)
    with_cache = generate_ids(model, prompts, 24, use_cache=True, **kw)
    without = generate_ids(model, prompts, 24, use_cache=False, **kw)
    assert with_cache == without
    assert all(len(x) == 24 for x in with_cache)


def test_batched_equals_one_by_one():
    model = _model(seed=3)
    prompts = _prompts()
    kw = dict(pad_id=0, eos_ids=[], temperature=0.0)
    batched = generate_ids(model, prompts, 20, **kw)
    single = [generate_ids(model, [p], 20, **kw)[0] for p in prompts]
    assert batched == single


def test_eos_ends_a_row_and_is_not_returned():
    model = _model()
    prompt = _prompts()[0]
    free = generate_ids(model, [prompt], 12, pad_id=0, eos_ids=[], temperature=0.0)[0]
    stop_tok = free[4]
    cut = generate_ids(model, [prompt], 12, pad_id=0, eos_ids=[stop_tok], temperature=0.0)[0]
    assert cut == free[: free.index(stop_tok)]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    logits = torch.randn(4, 50)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = sample_next(logits, 1.0, top_k=3, generator=g1)
    b = sample_next(logits, 1.0, top_k=3, generator=g2)
    assert torch.equal(a, b)
    top3 = logits.topk(3, dim=-1).indices
    for _ in range(20):
        s = sample_next(logits, 1.5, top_k=3)
        assert all(s[i] in top3[i] for i in range(4))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, 1.0, top_p=0.7)) for _ in range(200)}
    assert seen <= {0, 1} and len(seen) == 2


def test_repetition_penalty_follows_hugging_face_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    ctx = torch.tensor([[0, 1, 1]])
    out = apply_repetition_penalty(logits, ctx, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    # A padded (invalid) context position does not count as present.
    out = apply_repetition_penalty(logits, torch.tensor([[3, 0]]), 2.0, valid=torch.tensor([[0, 1]]))
    assert out.tolist() == [[1.0, -2.0, 1.0, 0.5]]


def test_stream_decoder_never_emits_broken_characters(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    text = "小猫说：“你好！”🐱 emoji 和 𠀀 字。"
    ids = tok.encode(text)
    # Byte-level tokens split multi-byte characters for rare characters: feed byte-level pieces one by one.
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_back_stop_strings(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    text = "从前有一只小猫。END后面的不要"
    dec = StreamDecoder(tok, stop=["END"])
    out = []
    for i in tok.encode(text):
        out.append(dec.push(i))
        if dec.stopped:
            break
    out.append(dec.finish())
    assert "".join(out) == "从前有一只小猫。"
    assert dec.stopped


def test_generate_text_api_streams_what_it_returns(tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = _model(vocab=tok.vocab_size, seed=5)
    streamed: dict[int, str] = {}
    texts = generate(model, tok, ["从前", "小明"], SamplingConfig(max_new_tokens=16, temperature=0.7, seed=3),
                     stream=lambda row, d: streamed.__setitem__(row, streamed.get(row, "") + d))
    assert [streamed.get(0, ""), streamed.get(1, "")] == texts
    again = generate(model, tok, ["从前", "小明"], SamplingConfig(max_new_tokens=16, temperature=0.7, seed=3))
    assert again == texts


def test_static_cache_decoding_equals_default_decoding():
    model = _model(seed=9)
    prompts = _prompts()
    kw = dict(pad_id=0, eos_ids=[], temperature=0.0)
    assert generate_ids(model, prompts, 16, static_cache=True, **kw) == generate_ids(model, prompts, 16, **kw)


# ------------------------------------------------------------------------------------ the generate CLI

import pytest  # noqa: E402

BAD_FLAGS = [(["--max-new-tokens", "-1"], "--max-new-tokens"), (["--temperature", "-1"], "--temperature"),
             (["--top-p", "7"], "--top-p"), (["--top-p", "-0.5"], "--top-p"), (["--top-k", "-3"], "--top-k"),
             (["--seed", str(2 ** 64)], "--seed"), (["--num-samples", "0"], "--num-samples")]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _n in BAD_FLAGS])
def test_generate_refuses_bad_sampling_flags_in_one_line(tiny_run, capsys, flags, named):
    from xiaolm.cli import main

    assert main(["generate", str(tiny_run), "--prompt", "小猫", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_generate_says_when_the_prompt_does_not_fit_the_context(tiny_run, capsys):
    from xiaolm.cli import main

    assert main(["generate", str(tiny_run), "--prompt", "小猫和小狗" * 200, "--max-new-tokens", "4"]) == 2
    captured = capsys.readouterr()
    assert "context window" in captured.err and captured.out == "", captured


def test_generate_encodes_the_prompt_as_text(tiny_run, capsys):
    """A prompt spelling <|im_start|> gets the same continuation as that text encoded as text (not the marker)."""
    from xiaolm.infer.generate import main, plain_prompt_ids
    from xiaolm.model.io import load_model

    prompt = "<|im_start|>system\n"
    model, tokenizer, _info = load_model(tiny_run, device="cpu")
    ids = plain_prompt_ids(tokenizer, prompt)
    assert tokenizer.im_start_id not in ids
    expected = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=6, temperature=0), prompt_ids=[ids])
    assert main([str(tiny_run), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + expected[0] + "\n"


def test_a_model_that_generated_with_the_compiled_step_is_garbage_collected(monkeypatch):
    """The compiled step and its static caches live on the model (issue 26): they once sat in module-level dicts
    keyed by id(model), which kept every model alive for the life of the process."""
    import copy
    import gc
    import weakref

    from xiaolm.infer import generate as gen

    monkeypatch.setattr(gen.torch, "compile", lambda fn, **kw: fn)  # our caches are under test here, not dynamo's
    model = _model()
    prompts = _prompts()[:2]
    with torch.no_grad():
        want = generate_ids(model, prompts, 6, pad_id=0, temperature=0.0)
        assert generate_ids(model, prompts, 6, pad_id=0, temperature=0.0, compile_step=True) == want
        twin = copy.deepcopy(model)  # a copy must not reuse the original's step (it would run the original)
        twin.model.norm.weight.mul_(-1)  # another model: it picks other tokens
        assert generate_ids(twin, prompts, 6, pad_id=0, temperature=0.0) != want
        assert (generate_ids(twin, prompts, 6, pad_id=0, temperature=0.0, compile_step=True)
                == generate_ids(twin, prompts, 6, pad_id=0, temperature=0.0))
    assert gen._decode_state(model)["caches"] and gen._decode_state(model)["compiled"] is not None
    alive = weakref.ref(model)
    del model, twin
    gc.collect()
    assert alive() is None


def test_generate_ids_ends_a_row_whose_numbers_go_bad_alone_when_asked():
    """The static scheduler's batches: one row's NaN logits end that row (on_bad_row) and the others are exactly
    what they are without it; without on_bad_row it is an error naming the row."""
    import pytest

    model = _model()
    prompts = _prompts()[:3]

    def poison(logits, outputs):
        if len(outputs[1]) >= 2:  # row 1 goes bad at its third token
            logits = logits.clone()
            logits[1, 0] = float("nan")
        return logits

    kw = dict(pad_id=0, temperature=0.8, generator=None)
    clean = generate_ids(model, prompts, 8, **{**kw, "generator": torch.Generator().manual_seed(4)})
    bad_rows = []
    got = generate_ids(model, prompts, 8, logits_processor=poison, on_bad_row=bad_rows.append,
                       **{**kw, "generator": torch.Generator().manual_seed(4)})
    assert bad_rows == [1] and got[1] == clean[1][:2]
    assert got[0] == clean[0] and got[2] == clean[2]
    with pytest.raises(FloatingPointError, match=r"row\(s\) \[1\]"):
        generate_ids(model, prompts, 8, logits_processor=poison, **kw)


class _Stdin:
    """Piped stdin (not a terminal) holding ``data``."""

    def __init__(self, data: bytes):
        import io

        self.buffer = io.BytesIO(data)

    def isatty(self) -> bool:
        return False

    def read(self) -> str:
        return self.buffer.read().decode("utf-8")


def test_prompts_file_empty_gbk_or_a_directory_is_one_line(tiny_run, tmp_path, capsys):
    from xiaolm.cli import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("从前\n一丌丐专丕业\n".encode("gbk"))
    for path, named in ((empty, "no prompts"), (gbk, f"{gbk}:1: not UTF-8"), (tmp_path, "Is a directory"),
                        (tmp_path / "missing.txt", "No such file")):
        assert main(["generate", str(tiny_run), "--prompts-file", str(path), "--max-new-tokens", "4"]) == 2
        captured = capsys.readouterr()
        assert named in captured.err and captured.err.count("\n") == 1 and captured.out == "", captured


def test_prompts_come_from_stdin_with_a_dash_or_piped_without_prompt(tiny_run, monkeypatch, capsys):
    from xiaolm.cli import main

    greedy = ["--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]
    assert main(["generate", str(tiny_run), "--prompt", "小猫", "有一天", *greedy]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", _Stdin("小猫\n\n有一天\n".encode()))
    assert main(["generate", str(tiny_run), "--prompts-file", "-", *greedy]) == 0
    assert capsys.readouterr().out == expected
    # a repeated flag adds prompts, as one flag with two values does (it used to keep only the last)
    assert main(["generate", str(tiny_run), "--prompt", "小猫", "--prompt", "有一天", *greedy]) == 0
    assert capsys.readouterr().out == expected
    assert main(["generate", str(tiny_run), "--prompt", "小猫", *greedy]) == 0
    one = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", _Stdin("小猫\n".encode()))
    assert main(["generate", str(tiny_run), *greedy]) == 0
    assert capsys.readouterr().out == one and one.startswith("小猫")
    monkeypatch.setattr("sys.stdin", _Stdin(b""))
    assert main(["generate", str(tiny_run), "--prompts-file", "-", *greedy]) == 2
    assert "--prompts-file stdin: no prompts" in capsys.readouterr().err


def test_a_prompt_that_fills_the_context_does_not_cut_the_other_rows_short(loaded):
    """A batch shares the positions of its longest prompt: one prompt near the end of the context used to leave
    every row of its batch (eval instruct's, generate's) with what was left to it, silently empty answers."""
    from xiaolm.infer.generate import SamplingConfig, generate_samples, plain_prompt_ids

    model, tok = loaded
    context = model.config.max_position_embeddings
    short = plain_prompt_ids(tok, "小猫")
    long = (short * context)[: context - 3]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    both = generate_samples(model, tok, ["", ""], greedy, prompt_ids=[long, short], eos_ids=())
    alone = generate_samples(model, tok, [""], greedy, prompt_ids=[short], eos_ids=())
    assert both[1].tokens == 12 and both[1].text == alone[0].text
    assert both[0].tokens == 3  # the long prompt gets what the context leaves it
