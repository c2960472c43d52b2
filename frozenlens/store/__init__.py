"""The activation store: run the backbone once per image, train everything from disk."""

from frozenlens.store.fingerprint import images_fingerprint
from frozenlens.store.store import (
    ActivationStore,
    TapSource,
    extract,
    find_store,
    read_meta,
    store_root,
    verify_store,
)

__all__ = ["ActivationStore", "TapSource", "extract", "find_store", "images_fingerprint",
           "read_meta", "store_root", "verify_store"]
