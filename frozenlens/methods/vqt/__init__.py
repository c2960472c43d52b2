"""VQT (Visual Query Tuning): query-only tokens per layer, trained from stored block inputs.

``model`` holds the method (config, module, fit); ``query_attention`` the
mechanism it shares with the VQT + PETL combinations (queries that attend over
a block's tokens without changing any of them), for timm ViT blocks and, through
:mod:`frozenlens.backbones.text_blocks`, BERT-family text layers with padding masks.
"""

from frozenlens.methods.vqt.model import CLS_KEY, VQT, VQTConfig
from frozenlens.methods.vqt.query_attention import (
    BlockParts,
    TimmBlockParts,
    backbone_blocks,
    block_parts,
    forward_with_queries,
    input_taps,
    key_mask,
    query_block,
)

__all__ = ["CLS_KEY", "VQT", "BlockParts", "TimmBlockParts", "VQTConfig", "backbone_blocks", "block_parts",
           "forward_with_queries", "input_taps", "key_mask", "query_block"]
