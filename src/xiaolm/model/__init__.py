"""The Llama-style decoder, in one readable file (llama.py)."""
