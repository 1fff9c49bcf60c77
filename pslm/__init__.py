"""pslm: train GPT-style language models on a parameter server."""

__version__ = "0.1.0"
