"""Data: the built-in story corpus, ingestion and cleaning, token shards, instruction and preference data."""
