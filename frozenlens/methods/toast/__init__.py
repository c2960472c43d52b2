"""TOAST (Top-Down Attention Steering): everything TOAST in one place.

``core`` holds the architecture-independent pieces (feature selection, feedback
layers, the variational loss); ``model`` the registered methods (TOAST and
TOAST-Lite, used by ``frozenlens fit``) on timm ViTs and, through ``bert``, on
frozen BERT-family text encoders; ``hf`` the value-input edits of Hugging Face
models shared by ``bert`` and ``lm``; ``lm`` and ``lm_train`` TOAST on Hugging
Face causal language models (``frozenlens toast-lm``; needs the ``[text]`` extra,
imported only when used); ``convnext`` TOAST on timm ConvNeXts (Python API);
``pretune`` pre-tunes the top-down modules on a general collection; ``explain``
draws the attention of pass 1 and pass 2.
"""

from frozenlens.methods.toast.convnext import ConvNeXtTOAST
from frozenlens.methods.toast.core import FeatureSelection, FeedbackLayer
from frozenlens.methods.toast.lm import TOASTForCausalLM, TOASTLMConfig
from frozenlens.methods.toast.model import TOAST, FeedbackPlan, TOASTConfig, TOASTLite

__all__ = ["TOAST", "TOASTLite", "TOASTConfig", "FeatureSelection", "FeedbackLayer", "FeedbackPlan",
           "TOASTForCausalLM", "TOASTLMConfig", "ConvNeXtTOAST"]
