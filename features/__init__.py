"""Sequence feature store: per-user event sequences, user / item attributes and counters.

``open_store("rocksdb:///path")`` (the writer), ``SequenceStore.open_reader(path,
secondary_dir)`` (followers in other processes), ``read`` / ``read_batch`` for
the trainer and the servers alike. See :mod:`opengem.features.store`.
"""

from opengem.features.base import SequenceStoreBase, StoreBatch, open_store, register_backend
from opengem.features.memory import MemorySequenceStore
from opengem.features.store import SequenceStore, StoreConfig
from opengem.features.types import (
    EventColumns,
    ItemFeatures,
    JaggedSeq,
    SeqArrays,
    UserFeatures,
    country_code,
    country_name,
    to_columns,
)

__all__ = [
    "EventColumns", "ItemFeatures", "JaggedSeq", "MemorySequenceStore", "SeqArrays", "SequenceStore",
    "SequenceStoreBase", "StoreBatch", "StoreConfig", "UserFeatures", "country_code", "country_name",
    "open_store", "register_backend", "to_columns",
]
