"""Methods, one module each, registered by name.

``linear`` and ``head2toe`` read pooled taps from the activation store; ``vqt``,
``inca`` and ``open-inca`` read token taps from it.
"""

from frozenlens.methods import head2toe as _head2toe  # noqa: F401  (registers)
from frozenlens.methods import inca as _inca  # noqa: F401  (registers)
from frozenlens.methods import linear as _linear  # noqa: F401  (registers)
from frozenlens.methods import mist as _mist  # noqa: F401  (registers)
from frozenlens.methods import petl as _petl  # noqa: F401  (registers)
from frozenlens.methods import toast as _toast  # noqa: F401  (registers)
from frozenlens.methods import vqt as _vqt  # noqa: F401  (registers)
from frozenlens.methods.base import (
    Method,
    build_method,
    config_to_dict,
    get_method,
    make_config,
    method_for_config,
    method_names,
    register,
)

__all__ = ["Method", "build_method", "config_to_dict", "get_method", "make_config",
           "method_for_config", "method_names", "register"]
