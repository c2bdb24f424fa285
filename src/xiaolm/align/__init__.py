"""Preference alignment: reward model, DPO family, GRPO."""
