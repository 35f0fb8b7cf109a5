"""Evaluation: perplexity of text sources, and benchmark tasks."""
