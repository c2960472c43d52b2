"""The activation store: run the backbone once per image, train everything from disk."""

from frozenlens.store.fingerprint import images_fingerprint
from frozenlens.store.store import (
    ActivationStore,
    TapSource,
    check_disk_room,
    extract,
    find_store,
    find_task_store,
    read_meta,
    store_root,
    token_maps,
    verify_store,
)

__all__ = ["ActivationStore", "TapSource", "check_disk_room", "extract", "find_store", "find_task_store",
           "images_fingerprint", "read_meta", "store_root", "token_maps", "verify_store"]
