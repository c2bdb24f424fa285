"""Tokenizer: byte-level BPE trained on the corpus, saved as a Hugging Face tokenizer directory."""
