"""Embedforge: decoder LLMs -> text-embedding and semantic-search models."""
