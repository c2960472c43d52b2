"""Optional dependencies: import them where a feature needs them, naming the extra when missing.

``onnx`` (extra ``[onnx]``) converts the offline default backbone; ``matplotlib``
(extra ``[plots]``) draws ``frozenlens explain`` and the bench plots; ``transformers``
(extra ``[text]``) loads text encoders and causal LMs; ``ray`` (extra ``[ray]``) runs
``frozenlens serve --ray`` and ``bench --engine ray``. Everything else runs without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from frozenlens.errors import FrozenlensError

EXTRAS = {"onnx": "onnx", "matplotlib": "plots", "transformers": "text", "ray": "ray"}
"""Top-level module -> the frozenlens extra that installs it (pyproject.toml)."""


def require(module: str, purpose: str, *, error: type[FrozenlensError] = FrozenlensError) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) for ``purpose``, or raise ``error``
    saying which extra to install: ``pip install 'frozenlens[plots]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        how = f"pip install 'frozenlens[{extra}]'" if extra else f"pip install {top}"
        raise error(f"{purpose} needs the {top} package, which is not installed; install it with: "
                    f"{how}") from None
