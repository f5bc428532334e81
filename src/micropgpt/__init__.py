"""micropgpt: a character-level GPT trained with Lightning, configured with Hydra."""

__version__ = "0.1.0"
