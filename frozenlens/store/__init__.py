"""The activation store: run the backbone once per image, train everything from disk."""

from frozenlens.store.store import ActivationStore, TapSource, extract, find_store, store_root

__all__ = ["ActivationStore", "TapSource", "extract", "find_store", "store_root"]
