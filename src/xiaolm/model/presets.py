"""``xiaolm presets``: the model presets' shapes and parameter counts (the table lives in ``llama.py``)."""
from __future__ import annotations

from xiaolm.model.llama import PRESETS, count_parameters, preset_config


def presets_main(argv: list[str]) -> int:
    """``xiaolm presets``: every preset's shape and parameter count with a given vocabulary."""
    import argparse

    parser = argparse.ArgumentParser(prog="xiaolm presets", description=presets_main.__doc__)
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    parser.add_argument("--tied", action="store_true",
                        help="count a head tied to the embedding (pretraining's default is untied)")
    args = parser.parse_args(argv)
    print(f"{'preset':<13}{'hidden':>7}{'layers':>7}{'heads':>6}{'kv':>4}{'mlp':>6}{'params':>10}{'embedding':>11}{'body':>9}")
    for name in PRESETS:
        cfg = preset_config(name, vocab_size=args.vocab_size, tie_word_embeddings=args.tied)
        n = count_parameters(cfg)
        print(
            f"{name:<13}{cfg.hidden_size:>7}{cfg.num_hidden_layers:>7}{cfg.num_attention_heads:>6}"
            f"{cfg.num_key_value_heads:>4}{cfg.intermediate_size:>6}{n['total'] / 1e6:>9.2f}M"
            f"{100 * n['embedding'] / n['total']:>10.0f}%{n['body'] / 1e6:>8.2f}M"
        )
    print(f"(vocabulary {args.vocab_size}, {'tied' if args.tied else 'untied'} embeddings)")
    return 0
