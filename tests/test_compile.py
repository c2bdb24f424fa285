"""The compiled GPU recipe on the CPU (inductor): compile + chunked cross-entropy equals eager with no graph break,
and a compiled training run compiles a bounded number of graphs, independent of its number of steps (issue 23:
SFT used to pad each micro-batch to its own longest row, the evaluator's last batch had a shape of its own)."""
from __future__ import annotations

import json

import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.llama import Llama, preset_config


def test_compiled_chunked_cross_entropy_equals_eager_in_one_graph_under_bf16_autocast():
    """The GPU recipe's combination: compile (fullgraph: a graph break raises) + the chunked fused linear
    cross-entropy (a custom autograd function writing into preallocated buffers) + bf16 autocast."""
    torch.manual_seed(3)
    cfg = preset_config("tiny", vocab_size=128, max_position_embeddings=32, tie_word_embeddings=False)
    a, b = Llama(cfg), Llama(cfg)
    b.load_state_dict(a.state_dict())
    compiled = torch.compile(b, fullgraph=True)
    x = torch.randint(0, 128, (2, 16))
    y = torch.randint(0, 128, (2, 16))
    y[0, :5] = -100  # ignored targets inside a chunk
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = a(x, targets=y, loss_chunk_size=12).loss  # 32 rows in chunks of 12: a ragged last chunk
        lb = compiled(x, targets=y, loss_chunk_size=12).loss
    la.backward()
    lb.backward()
    assert torch.isfinite(lb) and abs(la.item() - lb.item()) < 1e-2 * la.item()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        scale = pa.grad.abs().max().item()
        assert scale > 0 and (pa.grad - pb.grad).abs().max().item() < 0.05 * scale, name


def _graphs() -> int:
    # torch._dynamo's counters: the only place dynamo reports how many graphs it compiled (a private module, used
    # by this test alone)
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compiled_run(argv: list[str]) -> int:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(argv) == 0
    return _graphs()


COMPILED = ["--compile", "--no-progress", "--no-tensorboard", "--log-every", "2", "--sample-tokens", "4"]


def test_compiled_pretraining_compiles_a_bounded_number_of_graphs(shards_dir, tmp_path):
    base = ["pretrain", "--data", str(shards_dir), "--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4",
            "--eval-tokens", "900", "--eval-batch-size", "4", "--eval-every", "2", *COMPILED]
    short = _compiled_run([*base, "--max-steps", "2", "--out", str(tmp_path / "a")])
    long = _compiled_run([*base, "--max-steps", "6", "--out", str(tmp_path / "b")])
    assert 1 <= short == long <= 2, (short, long)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in x]
    assert losses[-1] < losses[0]


def test_compiled_sft_compiles_a_bounded_number_of_graphs(tiny_run, tmp_path):
    from test_sft import _short_conversations

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _short_conversations(160)),
                    encoding="utf-8")
    base = ["sft", str(tiny_run), "--data", str(data), "--micro-batch-size", "2", "--no-packing",
            "--heldout-fraction", "0.1", "--eval-conversations", "5", "--eval-every", "3", "--sample-prompts", "0",
            *COMPILED]
    short = _compiled_run([*base, "--max-steps", "3", "--out", str(tmp_path / "a")])
    long = _compiled_run([*base, "--max-steps", "12", "--out", str(tmp_path / "b")])
    assert short <= long <= 3, (short, long)


def test_sft_pads_to_a_few_widths_whatever_the_lengths(tokenizer_dir):
    """SFT used to pad each micro-batch to its own longest row: one shape per distinct length, each a compile with
    dynamic=False (or dynamic kernels after the second). Widths are now multiples of seq_len / 8."""
    from test_sft import _short_conversations
    from xiaolm.tokenizer import load_tokenizer
    from xiaolm.train.dist import DistEnv
    from xiaolm.train.sft import SFTBatches, encode_all

    tok = load_tokenizer(tokenizer_dir)
    examples = encode_all(tok, [r["messages"] for r in _short_conversations(200)], seq_len=128)[0]
    assert len({len(e) for e in examples}) > 8
    for packing in (False, True):
        b = SFTBatches(examples, seq_len=128, micro_batch=2, accum=1, env=DistEnv(), seed=0, packing=packing,
                       pad_id=tok.pad_id)
        widths = set()
        for step in range(len(b.layout(0)) // 2):
            batch = b(step, 0)
            widths.add(batch["input_ids"].shape[1])
            lengths = [sum(len(examples[i]) for i in u) for u in b.units_for(step, 0)]
            assert batch["num_tokens"] == sum(lengths) and batch["input_ids"].shape[1] >= max(lengths)
        assert widths <= {16 * k for k in range(1, 9)}, widths


def test_the_evaluator_runs_one_shape_and_its_figures_do_not_change(tiny_run, shards_dir):
    """The last partial evaluation batch is padded to full size (one shape for compiled kernels); the padding rows
    are dropped, so the loss is the unpadded one."""
    from xiaolm.data.shards import TokenShards
    from xiaolm.eval.loss import StreamEvaluator
    from xiaolm.model.io import load_model

    model, tok, _ = load_model(tiny_run, device="cpu")
    tokens = TokenShards(shards_dir, "train").read(0, 5 * 128 + 1)
    shapes = []
    real_forward = model.forward
    model.forward = lambda x, **kw: shapes.append(tuple(x.shape)) or real_forward(x, **kw)
    got = StreamEvaluator(tokens, tok, 128, 2, doc_mask=True)(model)  # 5 windows: batches of 2, 2, 1 -> 2
    assert set(shapes) == {(2, 128)} and len(shapes) == 3
    want = StreamEvaluator(tokens, tok, 128, 5, doc_mask=True)(model)  # one batch of 5
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
