"""Training throughput: xiaolm's model against transformers' LlamaForCausalLM of the same shape, in one run.

Same shape, batch, precision, optimizer (fused AdamW) and initial weights; random tokens. Reports tokens/s, MFU
(6N + 12*L*d*T FLOPs per token over the device's peak; GPU only), peak memory and the loss after the same steps
(equal losses show both compute the same thing). On CPU it uses small shapes; on a GPU the shapes of
../shared/anchors.md.

    python bench/train_throughput.py                  # auto device, default shapes for it
    python bench/train_throughput.py --compile --steps 30 --batch 64 --seq 512
    python bench/train_throughput.py --shapes 58m-v64k --headline --append gpu_report.md   # the GPU proof's

Each row is printed (and with ``--append``, appended to a Markdown file) the moment its variant is measured, so a
run killed at its time box keeps the rows it finished. With ``--headline`` only the pair that matters is measured:
transformers compiled, then ours compiled (eager with ``--no-compile``): two cold compiles instead of six.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from xiaolm.model.llama import Llama, LlamaConfig, flops_per_token
from xiaolm.train.dist import device_peak_flops

# name: (hidden, layers, heads, kv heads, mlp, vocab). GPU shapes are tiny-llm-zh's, as measured in anchors.md.
GPU_SHAPES = {
    "58m-v64k": (512, 8, 8, 8, 1376, 64793),
    "29m-v8k": (512, 8, 8, 8, 1376, 8192),
    "134m-v64k": (768, 12, 12, 12, 2048, 64793),
}
CPU_SHAPES = {
    "quickstart-v4k": (128, 4, 4, 2, 352, 4096),
    "24m-v8k": (288, 6, 6, 6, 768, 8192),
}


def make_models(shape, seq):
    import transformers

    h, layers, heads, kv, mlp, vocab = shape
    torch.manual_seed(0)  # every variant starts from the same weights
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq)
    ours = Llama(cfg)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=seq, tie_word_embeddings=True, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, attn_implementation="sdpa",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(ours.state_dict())
    return cfg, ours, hf


class Variant:
    """One implementation with its own optimizer, timed in interleaved rounds (robust to a busy machine)."""

    def __init__(self, impl, model, cfg, batch, seq, device, amp, compile_model, chunk):
        self.impl, self.cfg, self.batch, self.seq, self.device, self.amp = impl, cfg, batch, seq, device, amp
        self.chunk = chunk
        self.model = model.to(device).train()
        self.params = list(self.model.parameters())
        fused = device.startswith("cuda") or device == "cpu"
        self.opt = torch.optim.AdamW(self.params, lr=3e-4, fused=fused)
        self.step_model = torch.compile(self.model) if compile_model else self.model
        self.step_no = 0
        self.best_tok_s = 0.0
        self.loss = float("nan")
        self.peak_gib = float("nan")

    def batch_at(self, i):
        g = torch.Generator().manual_seed(1000 + i)  # every variant sees the same batches in the same order
        return torch.randint(0, self.cfg.vocab_size, (self.batch, self.seq + 1), generator=g)

    def train_step(self, rows):
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.amp):
            if self.impl == "hf":
                logits = self.step_model(input_ids=x).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            else:
                loss = self.step_model(x, targets=y, loss_chunk_size=self.chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run_steps(self, n, timed: bool):
        batches = [self.batch_at(self.step_no + i).to(self.device) for i in range(n)]
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = None
        for rows in batches:
            loss = self.train_step(rows)
        sync(self.device)
        dt = time.perf_counter() - t
        self.step_no += n
        self.loss = float(loss)
        if timed:
            self.best_tok_s = max(self.best_tok_s, self.batch * self.seq * n / dt)
            if self.device.startswith("cuda"):
                self.peak_gib = max(torch.cuda.max_memory_allocated() / 2**30, 0 if self.peak_gib != self.peak_gib
                                    else self.peak_gib)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", nargs="*", help=f"names from {list(GPU_SHAPES) + list(CPU_SHAPES)}")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (GPU 64, CPU 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (GPU 512, CPU 256)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (GPU 30, CPU 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5 or 10 with compile, CPU 2)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure torch.compile variants (default: on GPU)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best round counts")
    ap.add_argument("--chunk", type=int, default=None, help="xiaolm's fused linear+CE chunk rows (GPU 8192, CPU 0)")
    ap.add_argument("--headline", action="store_true",
                    help="only transformers vs ours, both compiled (both eager with --no-compile)")
    ap.add_argument("--append", default=None, help="also append each row to this Markdown file as it is measured")
    args = ap.parse_args(argv)
    from xiaolm.utils import pick_device

    device = pick_device(args.device)
    gpu = device.startswith("cuda")
    shapes = args.shapes or list(GPU_SHAPES if gpu else CPU_SHAPES)
    batch = args.batch or (64 if gpu else 8)
    seq = args.seq or (512 if gpu else 256)
    steps = args.steps or (30 if gpu else 5)
    compile_too = gpu if args.compile is None else args.compile
    warmup = args.warmup if args.warmup is not None else ((10 if compile_too else 5) if gpu else 2)
    chunk = args.chunk if args.chunk is not None else (8192 if gpu else 0)
    amp = gpu and torch.cuda.is_bf16_supported()
    peak = device_peak_flops(device)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device {name}, batch {batch} x {seq}, best of {args.rounds} interleaved rounds of {steps} steps "
          f"after {warmup} warmup, "
          f"{'bf16 autocast' if amp else 'fp32'}, fused AdamW; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    header = f"{'shape':<16}{'impl':<22}{'params':>8}{'tok/s':>11}{'x HF':>7}{'MFU':>7}{'peak GiB':>9}{'loss':>9}"
    print(header)
    print("-" * len(header), flush=True)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(f"{name}, batch {batch} x {seq}, {'bf16 autocast' if amp else 'fp32'}, best of {args.rounds} "
                    f"round(s) of {steps} steps after {warmup} warmup\n\n"
                    "| shape | impl | params | tok/s | x HF | MFU | peak GiB | loss |\n|---|---|---|---|---|---|---|---|\n")
    all_shapes = {**GPU_SHAPES, **CPU_SHAPES}
    for sname in shapes:
        shape = all_shapes[sname]
        if args.headline:
            specs = [("hf", compile_too), ("xiaolm", compile_too)]
        else:
            specs = [("hf", False), ("xiaolm", False)] + ([("hf", True), ("xiaolm", True)] if compile_too else [])
        variants = []
        for impl, comp in specs:
            cfg, ours, hf = make_models(shape, seq)
            model = hf if impl == "hf" else ours
            variants.append((impl, comp, Variant(impl, model, cfg, batch, seq, device, amp, comp,
                                                  chunk if impl != "hf" else 0)))
        n_params = sum(p.numel() for p in variants[1][2].model.parameters())
        for _impl, _comp, v in variants:
            v.run_steps(warmup, timed=False)
        base = {}
        for rnd in range(args.rounds):  # interleaved: a burst of load hits every variant alike
            for impl, comp, v in variants:  # transformers first in each pair, so its row gives the x HF base
                v.run_steps(steps, timed=True)
                if rnd < args.rounds - 1:
                    continue
                if impl == "hf":
                    base[comp] = v.best_tok_s
                label = impl + (" +compile" if comp else "") + (" +chunkCE" if impl != "hf" and chunk else "")
                mfu = flops_per_token(v.cfg, seq) * v.best_tok_s / peak if peak else float("nan")
                ratio = v.best_tok_s / base[comp] if comp in base else float("nan")
                print(f"{sname:<16}{label:<22}{n_params / 1e6:>7.1f}M{v.best_tok_s:>11,.0f}"
                      f"{ratio:>7.2f}{100 * mfu:>6.1f}%{v.peak_gib:>9.2f}{v.loss:>9.4f}", flush=True)
                if args.append:
                    with open(args.append, "a", encoding="utf-8") as f:
                        f.write(f"| {sname} | {label} | {n_params / 1e6:.1f}M | {v.best_tok_s:,.0f} | {ratio:.2f} | "
                                f"{100 * mfu:.1f}% | {v.peak_gib:.2f} | {v.loss:.4f} |\n")
        del variants
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    print("x HF compares with Hugging Face under the same compile setting; equal losses mean equal computation.")


if __name__ == "__main__":
    main()
