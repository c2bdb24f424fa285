"""Multiple-choice evaluation: the scorer reads the right answer letters at the right place, counts per subject,
reports bad rows, states the chance level, agrees with lm-evaluation-harness, and runs on real CMMLU."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from xiaolm.cli import main
from xiaolm.errors import XiaolmError
from xiaolm.eval.mc import LETTERS, build_prompt, evaluate_mc, load_mc_data
from xiaolm.model.llama import CausalLMOutput, LlamaConfig

HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]


def _write(path: Path, rows: list[list[str]], header=HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _starred(i: int, star: int, answer: int) -> list[str]:
    """Question i whose option ``star`` carries a ★, with gold answer ``answer``."""
    options = [f"选项{j}号" + ("★" if j == star else "") for j in range(4)]
    return [str(i), f"第{i}题：下面哪一个选项是对的？", *options, LETTERS[answer]]


@pytest.fixture()
def csv_root(tmp_path) -> Path:
    """CMMLU layout: dev/ and test/; in 'right' the ★ marks the answer, in 'wrong' it never does."""
    root = tmp_path / "mc"
    right = [_starred(i, i % 4, i % 4) for i in range(12)]
    wrong = [_starred(i, i % 4, (i + 1) % 4) for i in range(8)]
    _write(root / "test" / "right.csv", right + [["12", "坏行", "a", "b", "c", "d", "E"]])
    _write(root / "test" / "wrong.csv", wrong + [["9", "短行", "a"]])
    _write(root / "dev" / "right.csv", [_starred(100 + i, i, i) for i in range(4)])
    _write(root / "dev" / "wrong.csv", [_starred(200 + i, i, i) for i in range(4)])
    return root


class StarReader(torch.nn.Module):
    """A rigged model: decodes each row, finds the last question, and answers with the letter of its ★ option.
    It only gets this right if the scorer feeds it the whole prompt and reads the letter logits at the end."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=8,
                                  num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                  max_position_embeddings=512)
        self.letter_ids = [tokenizer.encode(letter)[0] for letter in LETTERS]
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.dummy.device

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            ids = input_ids[b][attention_mask[b].bool()] if attention_mask is not None else input_ids[b]
            last = self.tok.decode(ids.tolist()).rsplit("题目：", 1)[-1]
            assert last.endswith("答案：")
            star = re.search(r"^([ABCD])\. .*★$", last, flags=re.M)
            if star:
                logits[b, -1, self.letter_ids[LETTERS.index(star.group(1))]] = 20.0
        return CausalLMOutput(logits[:, -logits_to_keep:] if logits_to_keep else logits, None)


def test_rigged_model_scores_exactly_as_planned(csv_root, tiny_run):
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_run / "tokenizer")
    data = load_mc_data(csv_root, "test")
    assert len(data.questions) == 20 and set(data.dev) == {"right", "wrong"}
    assert data.malformed and len(data.malformed) == 2
    assert any("right.csv:14" in m and "'E'" in m for m in data.malformed)  # header + 12 rows, then line 14
    assert any("wrong.csv:10" in m for m in data.malformed)
    for shots in (0, 2):
        result = evaluate_mc(StarReader(tok), tok, data, shots=shots, batch_size=5)  # batches mix lengths: padding
        assert result["subjects"]["right"] == {"correct": 12, "total": 12, "accuracy": 1.0}
        assert result["subjects"]["wrong"]["correct"] == 0
        assert result["accuracy"] == pytest.approx(12 / 20) and result["macro_accuracy"] == pytest.approx(0.5)
        assert result["chance"] == 0.25 and result["malformed"] == 2
        assert result["letter_mass"] > 0.99
        assert result["prompt_example"].count("题目：") == shots + 1
    assert result["predicted_letters"] == {"A": 5, "B": 5, "C": 5, "D": 5}


def test_prompt_format_is_the_documented_one(csv_root):
    data = load_mc_data(csv_root, "test")
    q = data.questions[1]
    text = build_prompt(q, data.dev["right"][:1])
    assert text.startswith("以下是单项选择题，请直接给出正确答案的选项。\n\n题目：第100题")
    assert "\n答案：A\n\n题目：第1题：下面哪一个选项是对的？\nA. 选项0号\nB. 选项1号★\n" in text
    assert text.endswith("D. 选项3号\n答案：")


def test_cli_on_a_trained_model_reports_chance_beside_the_score(csv_root, tiny_run, tmp_path, capsys):
    out = tmp_path / "mc.json"
    assert main(["eval", "mc", str(tiny_run), "--data", str(csv_root), "--shots", "1", "--out", str(out),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "chance level: 25%" in printed and "overall" in printed
    result = json.loads(out.read_text())
    assert result["questions"] == 20 and result["chance"] == 0.25 and result["shots"] == 1
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 < result["letter_mass"] < 1.0
    assert sum(result["predicted_letters"].values()) == 20
    assert (tmp_path / "mc.config.yaml").is_file()


def test_c_eval_header_and_clear_errors(tmp_path):
    ceval = tmp_path / "ceval" / "val"
    _write(ceval / "computer_network_val.csv",
           [["0", "TCP 属于哪一层？", "物理层", "传输层", "应用层", "链路层", "B", "解析"]],
           header=["id", "question", "A", "B", "C", "D", "answer", "explanation"])
    data = load_mc_data(tmp_path / "ceval" / "val")
    assert data.questions[0].subject == "computer_network" and data.questions[0].answer == 1
    _write(tmp_path / "bad" / "x.csv", [["1", "q", "a", "b", "c", "d"]], header=["", "Question", "A", "B", "C", "D"])
    with pytest.raises(XiaolmError, match="x.csv:1"):
        load_mc_data(tmp_path / "bad")
    with pytest.raises(XiaolmError, match="missing"):
        load_mc_data(tmp_path / "missing")


def test_real_cmmlu_subjects(shared_data, tiny_run, tmp_path):
    out = tmp_path / "cmmlu.json"
    assert main(["eval", "mc", str(tiny_run), "--data", str(shared_data / "cmmlu"), "--subjects", "agronomy",
                 "anatomy", "--limit", "15", "--shots", "1", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["questions"] == 30 and set(result["subjects"]) == {"agronomy", "anatomy"}
    assert result["malformed"] == 0 and 0.0 <= result["accuracy"] <= 1.0
    assert result["chance"] == 0.25 and 0.0 < result["letter_mass"] < 1.0


def test_lm_evaluation_harness_agrees_with_our_scorer(csv_root, tiny_run, tmp_path):
    pytest.importorskip("lm_eval")
    from xiaolm.eval.lm_eval_tasks import run_lm_eval, write_tasks
    from xiaolm.export.hf import export_hf
    from xiaolm.model.io import load_model

    hf_dir = export_hf(tiny_run, tmp_path / "hf")
    names = write_tasks(csv_root, tmp_path / "tasks")
    assert names == ["xiaolm_mc_right", "xiaolm_mc_wrong"]
    theirs = run_lm_eval(hf_dir, csv_root, shots=1, device="cpu")
    model, tok, _ = load_model(tiny_run)
    ours = evaluate_mc(model, tok, load_mc_data(csv_root), shots=1)
    assert theirs["questions"] == ours["questions"] == 20
    for subject in ("right", "wrong"):
        assert theirs["subjects"][subject]["correct"] == ours["subjects"][subject]["correct"], subject
