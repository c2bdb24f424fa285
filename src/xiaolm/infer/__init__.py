"""Inference: generation with a KV cache, chat, quantisation."""
