"""Data: tokenizers (tokenizer.py), document sources (sources.py over readers.py, hub_sources.py and the
shared epochs.py) and the batch pipeline (pipeline.py: shuffle, tokenize, pack, batch, with exact resume)."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"  # the bundled corpus and tokenizer
