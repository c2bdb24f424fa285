"""Serving: OpenAI-compatible HTTP API and a web chat page."""
