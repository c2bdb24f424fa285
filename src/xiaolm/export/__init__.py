"""Export to Hugging Face and GGUF."""
