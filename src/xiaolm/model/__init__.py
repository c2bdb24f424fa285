"""The Llama-style decoder, in one readable file (llama.py); loading one from disk (io.py)."""
