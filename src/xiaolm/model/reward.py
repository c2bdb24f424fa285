"""The reward model: the Llama body of the fine-tuned model with a scalar head (trained by ``xiaolm reward``,
loaded by ``xiaolm.model.io.load_reward_model``)."""
from __future__ import annotations

import torch
from torch import nn

from xiaolm.model.llama import Llama, LlamaConfig


class RewardModel(Llama):
    """The Llama body plus a scalar head on the last real token; ``forward(input_ids, lengths) -> scores [B]``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)
        if not cfg.tie_word_embeddings:  # the LM head is not used; keep it out of the optimiser
            self.lm_head.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.hidden_states(input_ids)
        last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.score(last).squeeze(-1).float()

    @classmethod
    def from_policy(cls, model: Llama) -> "RewardModel":
        rm = cls(model.config)
        missing, unexpected = rm.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.startswith("score.") for k in missing):
            raise ValueError(f"cannot build a reward model from this model (missing {missing}, "
                             f"unexpected {unexpected})")
        rm.tie_weights()
        return rm
