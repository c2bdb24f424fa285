"""Generation throughput: xiaolm's decoder against transformers' ``generate`` on the same weights, in one run.

Greedy decoding of a fixed number of new tokens (EOS ignored) from a 16-token prompt. Batch 1 measures
single-stream latency (launch-bound on a GPU for small models), a large batch measures aggregate throughput (what
on-policy data generation needs). Variants:
- hf dynamic: ``model.generate`` with the default dynamic cache;
- hf static+compile: ``cache_implementation="static"`` and a compiled forward (Hugging Face's fastest documented setup);
- xiaolm: our KV cache, eager; xiaolm static: fixed-shape cache; xiaolm static+compile: compiled decode step
  (CUDA graphs on GPU). Outputs of every variant are compared with the first: equal greedy tokens.

    python bench/generate_throughput.py                   # auto device
    python bench/generate_throughput.py --batches 1 64 --new-tokens 256 --compile

Each row is printed (and with ``--append``, appended to a Markdown file) the moment it is measured (the two
transformers rows together, as they give the "x HF best" base). The compiled forward of "hf static+compile" is
installed only while that variant runs: "hf dynamic" is transformers' plain eager generate.
"""
from __future__ import annotations

import argparse
import time

import torch

from xiaolm.infer.generate import generate_ids
from xiaolm.model.llama import Llama, LlamaConfig

SHAPES = {  # hidden, layers, heads, kv, mlp, vocab
    "58m-v8k": (512, 8, 8, 8, 1376, 8192),
    "58m-v64k": (512, 8, 8, 8, 1376, 64793),
    "quickstart-v4k": (128, 4, 4, 2, 352, 4096),
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(shape, max_pos, device, dtype):
    import transformers

    h, layers, heads, kv, mlp, vocab = shape
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos)
    ours = Llama(cfg)
    with torch.no_grad():  # sharpen the random model so greedy choices are not near-ties between implementations
        ours.model.embed_tokens.weight.mul_(8)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=max_pos, tie_word_embeddings=True,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, attn_implementation="sdpa",
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    hf.load_state_dict(ours.state_dict())
    return cfg, ours.to(device, dtype).eval(), hf.to(device, dtype).eval()


def time_it(fn, reps):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", default=None, help=f"one of {list(SHAPES)} (GPU 58m-v8k, CPU quickstart-v4k)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (GPU 1 64, CPU 1 16)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="GPU 256, CPU 64")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure compiled variants (default: on GPU)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions; the best counts")
    ap.add_argument("--append", default=None, help="also append each row to this Markdown file as it is measured")
    args = ap.parse_args(argv)
    from xiaolm.utils import pick_device

    device = pick_device(args.device)
    gpu = device.startswith("cuda")
    shape = SHAPES[args.shape or ("58m-v8k" if gpu else "quickstart-v4k")]
    batches = args.batches or ([1, 64] if gpu else [1, 16])
    new = args.new_tokens or (256 if gpu else 64)
    compile_too = gpu if args.compile is None else args.compile
    dtype = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else torch.float32
    cfg, ours, hf = build(shape, args.prompt_tokens + new + 8, device, dtype)
    print(f"device {torch.cuda.get_device_name() if gpu else 'cpu'}, {dtype}, shape {args.shape or shape}, "
          f"prompt {args.prompt_tokens} tokens, {new} new tokens, greedy, best of {args.reps}")
    header = f"{'batch':>6} {'variant':<26}{'tok/s':>12}{'x HF best':>11}{'same tokens':>13}"
    print(header)
    print("-" * len(header), flush=True)
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(f"{torch.cuda.get_device_name() if gpu else 'cpu'}, {dtype}, prompt {args.prompt_tokens} tokens, "
                    f"{new} new tokens, greedy, best of {args.reps}\n\n"
                    "| batch | variant | tok/s | x HF best | same tokens |\n|---|---|---|---|---|\n")
    plain_forward = hf.forward
    for B in batches:
        prompt = torch.randint(1, cfg.vocab_size, (B, args.prompt_tokens), generator=torch.Generator().manual_seed(B))
        prompts = prompt.tolist()
        x = prompt.to(device)
        variants = []
        compiled = {}

        def hf_gen(static, compile_forward=False):
            # the compiled forward is installed for this call only: every other variant runs the plain one
            if compile_forward and "forward" not in compiled:
                compiled["forward"] = torch.compile(plain_forward, mode="reduce-overhead" if gpu else "default")
            hf.forward = compiled["forward"] if compile_forward else plain_forward
            kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(x))
            if static:
                kw["cache_implementation"] = "static"
            try:
                with torch.no_grad():
                    return hf.generate(x, **kw)[:, args.prompt_tokens:].tolist()
            finally:
                hf.forward = plain_forward

        variants.append(("hf dynamic", lambda: hf_gen(False)))
        if compile_too:
            variants.append(("hf static+compile", lambda: hf_gen(True, compile_forward=True)))

        def ours_gen(**kw):
            return generate_ids(ours, prompts, new, pad_id=0, eos_ids=[], temperature=0.0, **kw)

        variants.append(("xiaolm", lambda: ours_gen()))
        variants.append(("xiaolm static", lambda: ours_gen(static_cache=True)))
        if compile_too:
            variants.append(("xiaolm static+compile", lambda: ours_gen(compile_step=True)))
        results = []
        n_hf = sum(name.startswith("hf") for name, _ in variants)

        def emit(name, tok_s, out, hf_best, ref):
            same = sum(a == b for a, b in zip(out, ref)) / len(ref)
            print(f"{B:>6} {name:<26}{tok_s:>12,.0f}{tok_s / hf_best:>11.2f}{100 * same:>12.0f}%", flush=True)
            if args.append:
                with open(args.append, "a", encoding="utf-8") as f:
                    f.write(f"| {B} | {name} | {tok_s:,.0f} | {tok_s / hf_best:.2f} | {100 * same:.0f}% |\n")

        for i, (name, fn) in enumerate(variants):
            fn()  # warmup (and compilation)
            sync(device)
            dt, out = time_it(lambda: (fn(), sync(device))[0], args.reps)
            results.append((name, B * new / dt, out))
            if i + 1 == n_hf:  # both transformers rows measured: the base is known
                hf_best = max(r[1] for r in results)
                for row in results:
                    emit(*row, hf_best, results[0][2])
            elif i + 1 > n_hf:
                emit(*results[-1], hf_best, results[0][2])
    print("'same tokens': share of rows whose greedy tokens equal hf dynamic's (bf16 can flip near-ties).")


if __name__ == "__main__":
    main()
