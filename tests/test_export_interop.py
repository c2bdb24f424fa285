"""One model, the same answers everywhere: xiaolm, transformers, PEFT and (where installed) llama.cpp condition
prompts alike and say the same things about the model; exports never write over what is not theirs."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xiaolm
from xiaolm.cli import main
from xiaolm.export.gguf import export_gguf
from xiaolm.export.hf import export_hf
from xiaolm.model.io import find_checkpoint, load_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

PROMPTS = ["从前", "有一天，小猫", "莉莉和她的妈妈"]
NEW_TOKENS = 24
SRC = str(Path(xiaolm.__file__).resolve().parents[1])  # the xiaolm under test, for subprocesses


def _chat_copy(tiny_run: Path, dst: Path, kind: str = "sft") -> Path:
    shutil.copytree(tiny_run, dst)
    ckpt = find_checkpoint(dst)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["kind"], meta["base"] = kind, "/somewhere/runs/story-base"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("interop")
    hf = root / "hf"
    assert main(["export", "hf", str(tiny_run), str(hf)]) == 0
    f32 = root / "tiny-f32.gguf"
    export_gguf(tiny_run, f32, ftype="f32")
    return {"hf": hf, "f32": f32}


def _field(path: Path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


# ----------------------------------------------------------------------------------------------- 12.1 BOS rule


def _llama_cpp(llama_cpp, monkeypatch, path: Path, n_ctx: int):
    """As in test_export_gguf: AMX / repacked weight buffers off (SIGILL inside some VMs)."""
    import llama_cpp.llama as module

    default = module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    monkeypatch.setattr(module.llama_cpp, "llama_model_default_params", params)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)


def test_plain_prompt_greedy_text_is_the_same_in_xiaolm_transformers_and_llama_cpp(exported, tiny_run, monkeypatch):
    from xiaolm.infer.generate import SamplingConfig, generate

    model, tok, _ = load_model(tiny_run)
    greedy = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0)
    ours = {p: generate(model, tok, [p], greedy)[0] for p in PROMPTS}
    pipe = transformers.pipeline("text-generation", model=str(exported["hf"]), device="cpu")
    for p in PROMPTS:
        theirs = pipe(p, do_sample=False, max_new_tokens=NEW_TOKENS)[0]["generated_text"]
        assert theirs == p + ours[p], p
    # The GGUF conditions a plain prompt the same way: bos = <|endoftext|>, added.
    assert _field(exported["f32"], "tokenizer.ggml.add_bos_token") is True
    assert _field(exported["f32"], "tokenizer.ggml.bos_token_id") == tok.eot_id
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (.ci/run builds it once into a wheel cache); "
                    "transformers checked, llama.cpp not")
    llm = _llama_cpp(llama_cpp, monkeypatch, exported["f32"], model.config.max_position_embeddings)
    for p in PROMPTS:
        prompt_ids = llm.tokenize(p.encode("utf-8"))
        assert prompt_ids == [tok.eot_id] + tok.encode(p)
        ids: list[int] = []   # llama.cpp's greedy tokens, up to its end-of-text
        for t in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if t == llm.token_eos() or len(ids) == NEW_TOKENS:
                break
            ids.append(t)
        assert tok.decode(ids) == ours[p], p   # the same tokens, rendered by our tokenizer
        # Its completion text drops the bytes of a partial UTF-8 character that ours renders as U+FFFD (measured:
        # a greedy continuation opening with two stray bytes, "\ufffd\ufffd。" here, "。" there); the rest is equal.
        out = llm.create_completion(p, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, repeat_penalty=1.0)
        assert out["choices"][0]["text"] == ours[p].replace("\ufffd", ""), p


def test_chat_template_encodes_exactly_what_sft_trained_on(tiny_run, tmp_path):
    """The template has no <|endoftext|> in front (SFT encodes conversations without it) and transformers does not
    add one to a chat prompt."""
    run = _chat_copy(tiny_run, tmp_path / "sft_run")
    out = export_hf(run, tmp_path / "hf_chat")
    _model, tok, _ = load_model(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for messages in ([{"role": "user", "content": "讲一个故事"}],
                     [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert list(ids) == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        assert ids[0] == tok.im_start_id
    # thinking and tools: the exported template renders our prompt byte for byte (the full table is
    # tests/test_chat_format.py, on the tokenizer directory)
    from xiaolm.tokenizer.chat import render_conversation

    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
    messages = [{"role": "user", "content": "12345*6789=?"},
                {"role": "assistant", "reasoning_content": "要用计算器。", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12345*6789"}}}]},
                {"role": "tool", "content": "83810205"}]
    for thinking in (True, False):
        text = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=thinking)
        assert text == render_conversation(messages, tools=tools, enable_thinking=thinking, add_generation_prompt=True)
        assert "<tool_call>" in text and text.endswith("<|im_start|>assistant\n" + ("" if thinking else
                                                                                   "<think>\n\n</think>\n\n"))


def test_llama_cpp_chat_answers_like_xiaolm_chat(tiny_run, tmp_path, monkeypatch):
    """llama-cpp-python renders the GGUF's ChatML template and adds no BOS in front: the same prompt tokens, so the
    same greedy answer as xiaolm's chat encoding."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it once)")
    from xiaolm.infer.generate import SamplingConfig, generate

    run = _chat_copy(tiny_run, tmp_path / "sft_run")
    info = export_gguf(run, tmp_path / "chat.gguf", ftype="f32")
    model, tok, _ = load_model(run)
    llm = _llama_cpp(llama_cpp, monkeypatch, Path(info["path"]), model.config.max_position_embeddings)
    for content in ("讲一个故事", "小猫在做什么？"):
        messages = [{"role": "user", "content": content}]
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        ours = generate(model, tok, [""], SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0), prompt_ids=[ids])[0]
        out = llm.create_chat_completion(messages, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1,
                                         repeat_penalty=1.0)
        assert out["choices"][0]["message"]["content"] == ours, content


# ------------------------------------------------------------------------------------- 12.2 GGUF from an HF dir


def test_gguf_from_the_hf_export_of_a_chat_model_has_the_run_metadata(tiny_run, tmp_path):
    run = _chat_copy(tiny_run, tmp_path / "story-chat")
    hf = export_hf(run, tmp_path / "hf_chat")
    a = export_gguf(run, tmp_path / "from_run.gguf", ftype="f16")
    b = export_gguf(hf, tmp_path / "from_hf.gguf", ftype="f16")
    assert a["chat"] and b["chat"]
    ra, rb = gguf.GGUFReader(a["path"]), gguf.GGUFReader(b["path"])
    keys = {k for k in ra.fields if not k.startswith("GGUF.")}
    assert keys == {k for k in rb.fields if not k.startswith("GGUF.")}
    for key in keys:
        assert ra.fields[key].contents() == rb.fields[key].contents(), key
    assert ra.fields["general.name"].contents() == "story-chat"
    _m, tok, _ = load_model(run)
    assert rb.fields["tokenizer.ggml.eos_token_id"].contents() == tok.im_end_id
    assert "base model" not in b["modelfile_text"]
    assert a["modelfile_text"].replace("from_run", "from_hf") == b["modelfile_text"]

    # An HF directory that is not our export: chat read from its eos, general.name its directory name.
    foreign = tmp_path / "someones-chat-model"
    shutil.copytree(hf, foreign)
    (foreign / "xiaolm_export.json").unlink()
    c = export_gguf(foreign, tmp_path / "foreign.gguf", ftype="f16")
    assert c["chat"] and _field(Path(c["path"]), "general.name") == "someones-chat-model"


# ---------------------------------------------------------------------------------------- 12.3 model_max_length


def test_tokenizer_model_max_length_is_the_models_context(exported, tiny_run):
    model, _tok, _ = load_model(tiny_run)
    conf = json.loads((exported["hf"] / "tokenizer_config.json").read_text())
    assert conf["model_max_length"] == model.config.max_position_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported["hf"]))
    assert hf_tok.model_max_length == model.config.max_position_embeddings


# --------------------------------------------------------------------------------------------- 12.4 PEFT adapter


def test_auto_peft_model_loads_the_exported_adapter(tiny_run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    run = _chat_copy(tiny_run, tmp_path / "lora_run")
    base, tok, _ = load_model(run)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(find_checkpoint(run) / "adapter"))
    x = torch.tensor([[tok.eot_id] + tok.encode(PROMPTS[1])])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits

    monkeypatch.chdir(tmp_path)
    assert main(["export", "hf", str(run), "exported"]) == 0
    conf = json.loads((tmp_path / "exported" / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "CAUSAL_LM" and "auto_mapping" not in conf
    assert not Path(conf["base_model_name_or_path"]).is_absolute()
    loaded = AutoPeftModelForCausalLM.from_pretrained("exported/adapter").eval()
    assert type(loaded.get_base_model()).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    assert (got - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------- 12.5 model card


def _card_header(path: Path) -> dict:
    import yaml

    text = (path / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_metadata(exported, tiny_run, tmp_path):
    head = _card_header(exported["hf"])
    assert head["language"] == ["zh"] and head["pipeline_tag"] == "text-generation"
    assert head["license"] == "apache-2.0" and head["library_name"] == "transformers"
    assert "base_model" not in head  # pretrained from scratch
    assert head["datasets"] == [Path(_data_of(tiny_run)).name]
    run = _chat_copy(tiny_run, tmp_path / "sft_run")
    assert main(["export", "hf", str(run), str(tmp_path / "card"), "--license", "mit", "--datasets", "my/stories"]) == 0
    head = _card_header(tmp_path / "card")
    assert head["base_model"] == "story-base" and head["license"] == "mit" and head["datasets"] == ["my/stories"]
    assert "chat" in head["tags"]


def _data_of(run: Path) -> str:
    import yaml

    conf = yaml.safe_load((run / "config.yaml").read_text())
    for section in (conf, *(v for v in conf.values() if isinstance(v, dict))):
        if section.get("data"):
            value = section["data"]
            return (value[0] if isinstance(value, list) else value).rstrip("/")
    raise AssertionError("no data in config.yaml")


# ----------------------------------------------------------------------------- 11.15 / 11.16 export targets


def _refused(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    code = main(argv)
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_export_hf_refuses_a_users_directory_and_a_run(tiny_run, tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.json").write_text('{"mine": true}')
    (users / "notes.txt").write_text("keep me")
    _refused(capsys, ["export", "hf", str(tiny_run), str(users)], "not empty", "not an earlier xiaolm export")
    _refused(capsys, ["export", "hf", str(tiny_run), str(users), "--overwrite"], "not empty")
    assert json.loads((users / "config.json").read_text()) == {"mine": True}

    before = sorted(str(p.relative_to(tiny_run)) for p in tiny_run.rglob("*"))
    _refused(capsys, ["export", "hf", str(tiny_run), str(tiny_run)], str(tiny_run))
    _refused(capsys, ["export", "hf", str(tiny_run), str(tiny_run / "tokenizer")], "run directory")
    _refused(capsys, ["export", "hf", str(tiny_run), str(find_checkpoint(tiny_run))], "run directory")
    assert sorted(str(p.relative_to(tiny_run)) for p in tiny_run.rglob("*")) == before

    out = tmp_path / "ours"
    assert main(["export", "hf", str(tiny_run), str(out)]) == 0
    err = capsys.readouterr().err
    written = json.loads((out / "xiaolm_export.json").read_text())["files"]
    assert set(written) == {p.name for p in out.iterdir()}
    assert f"({', '.join(written)})" in err
    _refused(capsys, ["export", "hf", str(tiny_run), str(out)], "--overwrite")
    (out / "stale-extra.bin").write_text("x")  # a user's file inside an earlier export is left alone
    assert main(["export", "hf", str(tiny_run), str(out), "--overwrite"]) == 0
    assert (out / "stale-extra.bin").is_file() and "stale-extra.bin" not in capsys.readouterr().err


def test_export_gguf_refuses_an_existing_file_that_is_not_ours(tiny_run, tmp_path, capsys):
    theirs = tmp_path / "model.gguf"
    theirs.write_bytes(b"not mine")
    _refused(capsys, ["export", "gguf", str(tiny_run), str(theirs)], "not a GGUF written by xiaolm")
    _refused(capsys, ["export", "gguf", str(tiny_run), str(theirs), "--overwrite"], "not a GGUF written by xiaolm")
    assert theirs.read_bytes() == b"not mine"
    ours = tmp_path / "ours.gguf"
    assert main(["export", "gguf", str(tiny_run), str(ours), "--type", "q8_0"]) == 0
    _refused(capsys, ["export", "gguf", str(tiny_run), str(ours)], "--overwrite")
    assert main(["export", "gguf", str(tiny_run), str(ours), "--overwrite"]) == 0
    assert _field(ours, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    (tmp_path / "lonely.Modelfile").write_text("FROM llama3\n")
    _refused(capsys, ["export", "gguf", str(tiny_run), str(tmp_path / "lonely.gguf")], "lonely.Modelfile")


def test_file_missing_parent_and_read_only_targets_give_one_line(tiny_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _refused(capsys, ["export", "hf", str(tiny_run), str(a_file)], "is a file")
    _refused(capsys, ["export", "hf", str(tiny_run), str(a_file / "sub")], "is a file")
    _refused(capsys, ["export", "gguf", str(tiny_run), str(a_file / "x.gguf")], "is a file")
    _refused(capsys, ["export", "gguf", str(tiny_run), str(tmp_path)], "is a directory")
    # a missing parent is created, like save_pretrained
    assert main(["export", "gguf", str(tiny_run), str(tmp_path / "new" / "deeper" / "m.gguf")]) == 0
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            _refused(capsys, ["export", "hf", str(tiny_run), str(ro / "out")], "not writable")
            _refused(capsys, ["export", "gguf", str(tiny_run), str(ro / "m.gguf")], "not writable")
        finally:
            ro.chmod(stat.S_IRWXU)
    elif Path("/sys/kernel").is_dir():  # root writes anywhere, except where the kernel refuses: sysfs
        _refused(capsys, ["export", "hf", str(tiny_run), "/sys/xiaolm-export-probe"], "/sys/xiaolm-export-probe")
        _refused(capsys, ["export", "gguf", str(tiny_run), "/sys/xiaolm-probe.gguf"], "/sys/xiaolm-probe.gguf")
    else:
        pytest.skip("running as root without sysfs: no unwritable directory to try")


# ------------------------------------------------------------------------------------ 12.10 missing extras


@pytest.mark.parametrize("argv,missing,extra", [
    (["export", "gguf", "RUN", "x.gguf"], "gguf", "xiaolm[export]"),
    (["serve", "RUN"], "fastapi", "xiaolm[serve]"),
    (["serve", "RUN"], "uvicorn", "xiaolm[serve]"),
])
def test_a_verb_without_its_extra_says_what_to_install(tiny_run, tmp_path, argv, missing, extra):
    argv = [str(tiny_run) if a == "RUN" else str(tmp_path / a) if a.endswith(".gguf") else a for a in argv]
    code = ("import sys; sys.modules[%r] = None\n"
            "from xiaolm.cli import main\nsys.exit(main(%r))" % (missing, argv))
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("xiaolm")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert f"pip install '{extra}'" in lines[0], proc.stderr
