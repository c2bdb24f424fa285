"""The training-recipe options (docs/RECIPE.md): Muon with AdamW resumes exactly and trains under DDP like one
process; zero-initialised residual projections; the WSD decay fraction; document-aligned windows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xiaolm.cli import main
from xiaolm.model.llama import Llama, preset_config
from xiaolm.model.io import find_checkpoint, load_model
from xiaolm.train.checkpoint import load_trainer_state
from xiaolm.train.engine import TrainConfig
from xiaolm.train.schedule import lr_at
from xiaolm.train.optim import Muon, MuonAdamW, build_optimizer, hidden_matrix_ids, newton_schulz, newton_schulz_dtype
from xiaolm.train.pretrain import aligned_window_starts

from conftest import TINY_PRETRAIN

MUON = ["--optimizer", "muon", "--muon-lr", "0.02"]


def _train_losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]


def _pretrain(shards_dir, out, *extra):
    return main(["pretrain", "--data", str(shards_dir), "--out", str(out), *TINY_PRETRAIN, *extra])


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = Llama(preset_config("tiny", vocab_size=256, tie_word_embeddings=False))
    opt, fused = build_optimizer(TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02), model,
                                 model.param_groups(0.1), "cpu", sharded=False)
    assert isinstance(opt, MuonAdamW) and fused  # Muon + fused AdamW: both skip a non-finite step on the device
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_ids}
    assert names == {n for n, p in model.named_parameters()
                     if p.ndim == 2 and "embed" not in n and "lm_head" not in n}
    assert any(n.endswith("q_proj.weight") for n in names) and any(n.endswith("down_proj.weight") for n in names)
    adam_ids = {id(p) for g in opt.adam.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) in adam_ids and id(model.model.embed_tokens.weight) in adam_ids
    assert muon_ids.isdisjoint(adam_ids) and len(muon_ids) + len(adam_ids) == len(list(model.parameters()))
    # one schedule, each group its own peak
    assert [g["lr_scale"] for g in opt.muon.param_groups] == [pytest.approx(0.02 / 3e-3)]
    assert {g["lr_scale"] for g in opt.adam.param_groups} == {1.0}
    assert len(hidden_matrix_ids(model)) == len(muon_ids)


def test_newton_schulz_in_bf16_is_torch_muons_bit_for_bit():
    _zeropower_via_newtonschulz = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz  # torch 2.9+

    torch.manual_seed(0)
    coeffs = (3.4445, -4.7750, 2.0315)
    for shape in [(64, 64), (96, 32), (32, 96)]:
        g = torch.randn(*shape)
        assert torch.equal(newton_schulz(g[None], coeffs, 5, 1e-7, torch.bfloat16)[0],
                           _zeropower_via_newtonschulz(g, coeffs, 5, 1e-7))


def test_muon_orthogonalises_in_fp32_on_the_cpu_and_steps_like_torch_muon():
    # torch.optim.Muon's bf16 Newton-Schulz is emulated on the CPU: 13x slower than fp32 (docs/RECIPE.md, 2026-12-05)
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon appeared in torch 2.9")
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype(torch.device("cuda", 0)) == torch.bfloat16
    torch.manual_seed(0)
    shapes = [(64, 64), (64, 64), (128, 64), (64, 128)]
    ours = [torch.nn.Parameter(torch.randn(*s) * 0.05) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.01, adjust_lr_fn="original")
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.01, adjust_lr_fn="original")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, s in zip(ours, theirs, start):
        moved = (q - s).norm()
        assert moved > 0.01 and (p - q).norm() < 0.02 * moved  # the same update, up to bf16 rounding
    # the same state layout: checkpoints of either load into the other
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.state[ours[0]]["momentum_buffer"], b.state[theirs[0]]["momentum_buffer"])


def test_muon_refuses_fsdp_with_a_clear_error():
    model = Llama(preset_config("tiny", vocab_size=256))
    with pytest.raises(ValueError, match="--fsdp"):
        build_optimizer(TrainConfig(optimizer="muon", fsdp=True), model, model.param_groups(0.1), "cpu", sharded=True)


def test_muon_resume_reproduces_uninterrupted_losses(shards_dir, tmp_path):
    args = [*MUON, "--max-steps", "10", "--log-every", "1", "--eval-every", "5", "--grad-accum-steps", "2",
            "--micro-batch-size", "4", "--sample-tokens", "0"]
    assert _pretrain(shards_dir, tmp_path / "full", *args) == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--stop-at-step", "4") == 0
    state = load_trainer_state(find_checkpoint(tmp_path / "split"))
    assert set(state["optimizer"]) == {"muon", "adamw"} and state["optimizer"]["muon"]["state"]  # momentum saved
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--resume") == 0
    full, split = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert [s for s, _ in split] == list(range(1, 11))
    assert max(abs(a - b) for (_, a), (_, b) in zip(full, split)) <= 1e-6
    # and Muon trained: different losses from AdamW at the same steps
    assert _pretrain(shards_dir, tmp_path / "adamw", *args[4:], "--optimizer", "adamw") == 0
    assert _train_losses(tmp_path / "adamw")[-1][1] != full[-1][1]


def test_muon_two_processes_train_like_one(shards_dir, tmp_path, two_ranks_like_one):
    common = ["--data", str(shards_dir), *TINY_PRETRAIN, *MUON, "--max-steps", "4", "--log-every", "1",
              "--eval-every", "0", "--micro-batch-size", "4", "--sample-tokens", "0"]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order as the one-thread ranks below
    try:
        assert main(["pretrain", "--out", str(one), "--grad-accum-steps", "2", *common]) == 0
    finally:
        torch.set_num_threads(threads)
    # a last-bit difference in a summed gradient can round differently in Newton-Schulz (bf16 on a GPU): 1e-4 on
    # a loss of ~7 (a wrong average or a missed all-reduce moves it by far more)
    two_ranks_like_one(one, tmp_path / "two", common, steps=4, loss_tol=1e-4)


def test_zero_init_residual_starts_each_block_as_identity_and_trains(shards_dir, tmp_path):
    torch.manual_seed(0)
    model = Llama(preset_config("tiny", vocab_size=256))
    model.zero_init_residual_()
    x = torch.randint(0, 256, (2, 16))
    h0 = model.model.norm(model.model.embed_tokens(x))
    assert torch.allclose(model.hidden_states(x), h0, atol=1e-6)  # every block adds exactly zero
    out = tmp_path / "zero"
    assert _pretrain(shards_dir, out, "--zero-init-residual", "--max-steps", "3", "--eval-every", "0",
                     "--sample-tokens", "0", "--log-every", "1") == 0
    trained, _, _ = load_model(out, with_tokenizer=False)
    assert trained.model.layers[0].mlp.down_proj.weight.abs().max() > 0  # it learns from zero
    assert "zero_init_residual" not in json.dumps(trained.config.to_dict())  # the export config is plain Llama


def test_wsd_decays_over_the_given_fraction():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.5)
    total = 110  # 100 steps after warmup: stable to step 60, then linear to 0
    assert lr_at(59, cfg, total) == pytest.approx(1e-3)
    assert lr_at(85, cfg, total) == pytest.approx(0.5e-3)
    assert lr_at(total, cfg, total) == pytest.approx(0.0)
    assert lr_at(total, TrainConfig(schedule="wsd", decay_fraction=0.0, warmup_steps=1), total) == pytest.approx(1e-3)


def test_aligned_windows_start_at_documents_and_cover_every_document():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=300)  # shorter than a window
    lengths[10] = 400  # one document longer than a window
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    n, seq = int(lengths.sum()), 64
    starts = aligned_window_starts(doc_starts, n, seq)
    assert (np.diff(starts) > 0).all() and starts[-1] + seq + 1 <= n
    docs = set(doc_starts.tolist())
    long_doc = range(int(doc_starts[10]), int(doc_starts[10] + lengths[10]))
    off_doc = [s for s in starts if s not in docs]
    assert off_doc and all(s in long_doc for s in off_doc)  # only inside the long document
    # no token is skipped between windows
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s : s + seq] = True
    assert covered[: starts[-1]].all()


def test_aligned_windows_train_and_resume(shards_dir, tmp_path):
    from xiaolm.data.shards import TokenShards
    from xiaolm.train.dist import DistEnv
    from xiaolm.train.pretrain import AlignedWindowSampler

    shards = TokenShards(shards_dir, "train")
    sampler = AlignedWindowSampler(shards, 128, 0, 4, 1, DistEnv())
    batch = sampler(0, 0)
    eot = shards.eot_id
    docs = shards.doc_starts
    for row in range(4):
        start = sampler.window_start(sampler.window_id(row))
        if start not in set(docs.tolist()):  # only inside a document longer than a window
            i = int(np.searchsorted(docs, start, side="right")) - 1
            nxt = docs[i + 1] if i + 1 < len(docs) else shards.num_tokens
            assert nxt - docs[i] > 128, start
        else:
            assert start == 0 or shards.read(start - 1, 1)[0] == eot  # the token before is an end of text
    lengths = np.diff(np.append(docs, shards.num_tokens))
    owner = np.searchsorted(docs, sampler.starts, side="right") - 1
    off = ~np.isin(sampler.starts, docs)
    assert (lengths[owner[off]] > 128).all()  # off a document start only inside long documents
    short = docs[:-1][lengths[:-1] <= 128]
    short = short[short < sampler.starts[-1]]
    home = sampler.starts[np.searchsorted(sampler.starts, short, side="right") - 1]
    assert (home + 129 >= short + lengths[:-1][lengths[:-1] <= 128][: len(short)]).all()  # each seen whole
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
    args = ["--windows", "aligned", "--max-steps", "6", "--log-every", "1", "--eval-every", "3",
            "--sample-tokens", "0"]
    assert _pretrain(shards_dir, tmp_path / "full", *args) == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--stop-at-step", "3") == 0
    assert _pretrain(shards_dir, tmp_path / "split", *args, "--resume") == 0
    full, split = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "split")
    assert max(abs(a - b) for (_, a), (_, b) in zip(full, split)) <= 1e-6


def test_pretraining_defaults_are_the_measured_recipe_and_other_verbs_keep_adamw():
    from xiaolm.train.pretrain import PretrainConfig

    cfg = PretrainConfig()
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.model.zero_init_residual) == ("muon", "wsd", True)
    assert cfg.train.windows == "random"  # aligned windows won alone but were not measured with Muon
    # recipe v2 + document masking (docs/RECIPE.md, 2026-12-05): untied, Muon 0.01, WSD over 45%, masked windows
    assert (cfg.model.tie_word_embeddings, cfg.train.muon_lr, cfg.train.decay_fraction) == (False, 0.01, 0.45)
    assert cfg.model.doc_mask is True
    assert (TrainConfig().optimizer, TrainConfig().schedule) == ("adamw", "cosine")  # SFT/DPO/reward unchanged
