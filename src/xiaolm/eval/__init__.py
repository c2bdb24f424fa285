"""Evaluation: perplexity and bits per character, instruction following, multiple choice."""
