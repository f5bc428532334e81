"""micropgpt: a character-level GPT trained with Lightning, configured with Hydra."""

# Registers the resolvers and typed schemas conf/ needs, so conf/*.yaml compose after `import micropgpt`.
from micropgpt import hydra_app  # noqa: F401

__version__ = "0.1.0"
