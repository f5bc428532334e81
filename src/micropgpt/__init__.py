"""micropgpt: a character-level GPT trained with Lightning, configured with Hydra.

`micropgpt.train`, `micropgpt.sample` and `micropgpt.evaluate` run what train.py, generate.py and
eval.py run (micropgpt.api). Importing the package registers the resolvers and typed schemas
conf/ needs, so conf/*.yaml also compose with Hydra's Compose API after `import micropgpt`.
"""

from micropgpt.api import evaluate, sample, train
from micropgpt.errors import UserError
from micropgpt.summary import RunResult

__all__ = ["RunResult", "UserError", "evaluate", "sample", "train"]
__version__ = "0.1.0"
