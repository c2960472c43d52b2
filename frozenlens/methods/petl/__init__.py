"""PETL baselines with the backbone in the training loop (issue 5).

``full``, ``partial`` and ``bitfit`` tune backbone weights (copies);
``lora`` and ``adaptformer`` add small modules next to frozen weights;
``vpt-shallow`` and ``vpt-deep`` add prompt tokens; ``vqt+vpt`` and
``vqt+adaptformer`` put VQT's queries on the features those adapt. All change
the frozen backbone only through :mod:`frozenlens.backbones.hooks`.
``docs/methods/petl.md`` has the defaults, recipes and deviations.
"""

from frozenlens.methods.petl import adapters as _adapters  # noqa: F401  (registers)
from frozenlens.methods.petl import combos as _combos  # noqa: F401  (registers; after the parts)
from frozenlens.methods.petl import prompts as _prompts  # noqa: F401  (registers)
from frozenlens.methods.petl import tuning as _tuning  # noqa: F401  (registers)
