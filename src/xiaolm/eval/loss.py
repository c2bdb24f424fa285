"""Loss, perplexity and bits per character of a model over a token stream (pretraining's validation,
``xiaolm eval ppl``)."""
from __future__ import annotations

import math

import numpy as np
import torch


class StreamEvaluator:
    """Loss, perplexity and bits per character over the first ``max_tokens`` of a token stream.

    Bits per character divides the total negative log-likelihood (in bits) by the characters those tokens decode
    to, counting each end-of-text token as one character (a document separator, like a newline): a measure that
    does not depend on the tokenizer, so runs with different vocabularies compare.
    """

    def __init__(self, tokens: np.ndarray, tokenizer, seq_len: int, batch_size: int, doc_mask: bool = False):
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < 1:
            raise ValueError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
        used = tokens[: n_windows * seq_len + 1].astype(np.int64)
        self.windows = torch.from_numpy(
            np.stack([used[i * seq_len : (i + 1) * seq_len + 1] for i in range(n_windows)])
        )
        self.batch_size, self.doc_mask, self.eot_id = batch_size, doc_mask, tokenizer.eot_id
        targets = used[1:]
        n_eot = int((targets == tokenizer.eot_id).sum())
        self.chars = len(tokenizer.decode(targets.tolist(), skip_special_tokens=True)) + n_eot
        self.bytes = len(tokenizer.decode(targets.tolist(), skip_special_tokens=True).encode("utf-8")) + n_eot
        self.tokens = len(targets)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from xiaolm.model.llama import doc_ids_from_tokens

        device = model.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        full = min(self.batch_size, len(self.windows))
        for i in range(0, len(self.windows), self.batch_size):
            rows = self.windows[i : i + self.batch_size].to(device)
            n = len(rows)
            if n < full:  # the last partial batch is padded to full size: one shape, so compiled kernels compile once
                rows = torch.cat([rows, rows[:1].expand(full - n, -1)])
            x, y = rows[:, :-1], rows[:n, 1:]
            doc_ids = doc_ids_from_tokens(x, self.eot_id) if self.doc_mask else None
            logits = model(x, doc_ids=doc_ids).logits[:n]
            total += torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="sum"
            ).double()
        nats = float(total)
        loss = nats / self.tokens
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_bpc": nats / math.log(2) / self.chars,
            "val_bpb": nats / math.log(2) / self.bytes,
            "val_tokens": self.tokens,
            "chars_per_token": self.chars / self.tokens,
        }
