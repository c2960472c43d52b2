"""TOAST (Top-Down Attention Steering): everything TOAST in one place.

``model`` holds the method (feature selection, feedback path, value-only
injection, TOAST and TOAST-Lite); ``pretune`` pre-tunes the top-down modules on
a general collection; ``explain`` draws the attention of pass 1 and pass 2.
"""

from frozenlens.methods.toast.model import TOAST, FeatureSelection, FeedbackPlan, TOASTConfig, TOASTLite

__all__ = ["TOAST", "TOASTLite", "TOASTConfig", "FeatureSelection", "FeedbackPlan"]
