"""frozenlens: transfer learning on frozen pretrained transformers.

The backbone runs once per image; methods train from stored activations and
are saved as small adapter files.

    >>> import frozenlens
    >>> report = frozenlens.fit("path/to/task", ["linear", "head2toe"], grid=True, out="runs/task")
    >>> frozenlens.predict(["runs/task/linear"], ["image.jpg"])
"""

__version__ = "0.1.0"

from frozenlens.adapter import Adapter, load_adapter  # noqa: E402
from frozenlens.api import FitReport, MethodSpec, Prediction, fit, predict  # noqa: E402
from frozenlens.backbones import DEFAULT_BACKBONE, FrozenBackbone, Tap, list_backbones, load_backbone  # noqa: E402
from frozenlens.methods import method_names  # noqa: E402

__all__ = [
    "Adapter", "DEFAULT_BACKBONE", "FitReport", "FrozenBackbone", "MethodSpec", "Prediction", "Tap",
    "fit", "list_backbones", "load_adapter", "load_backbone", "method_names", "predict", "__version__",
]
