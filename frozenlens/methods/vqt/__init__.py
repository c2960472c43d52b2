"""VQT (Visual Query Tuning): query-only tokens per layer, trained from stored block inputs.

``model`` holds the method (config, module, fit); ``query_attention`` the
mechanism it shares with the VQT + PETL combinations (queries that attend over
a block's tokens without changing any of them).
"""

from frozenlens.methods.vqt.model import CLS_KEY, VQT, VQTConfig
from frozenlens.methods.vqt.query_attention import forward_with_queries, input_taps, query_block

__all__ = ["CLS_KEY", "VQT", "VQTConfig", "forward_with_queries", "input_taps", "query_block"]
