"""A result cache for per-tensor results and reusable decompositions, keyed by what determines them.

Used by ``compare``, ``compare_many``, ``rank_curve``, ``locking_onset`` and ``follow`` (``cache=``; on by
default for checkpoints on disk): docs/caching.md says exactly what is cached.

>>> import tempfile, torch
>>> cache = resolve_cache(tempfile.mkdtemp())
>>> ident = {"format": "safetensors", "file": {"path": "/m/model.safetensors", "size": 10, "mtime_ns": 1},
...          "tensor": "layers.0.q_proj.weight", "dtype": "torch.bfloat16", "shape": [8, 8], "byte_range": [80, 208]}
>>> key = cache.key("pair_row", inputs=[ident, ident], metrics=["spectral_drift"], options={"k": 4}, policy="p")
>>> cache.put(key, {"spectral_drift": 0.0})
True
>>> cache.get(key).row, cache.stats.hits
({'spectral_drift': 0.0}, 1)

Modules: :mod:`~weightgeo.cache.keys` (canonical JSON, sha256 keys), :mod:`~weightgeo.cache.codec` (exact row
and dataclass round trips), :mod:`~weightgeo.cache.store` (:class:`ResultCache`: atomic entries, validation,
counters, info, prune), :mod:`~weightgeo.cache.location` (``cache=`` / ``WEIGHTGEO_CACHE`` / XDG).
"""

from __future__ import annotations

from .codec import decode_row, encode_row, pack, unpack
from .keys import KEY_FORMAT, NOT_IN_KEY, CacheKey, canonical_json, in_key, not_in_key, result_key
from .location import ENV_VAR, cacheable, default_cache_dir, resolve_cache
from .store import FORMAT, CacheEntry, CacheInfo, CacheStats, PruneResult, ResultCache, sum_counts

__all__ = [
    "ResultCache",
    "CacheKey",
    "CacheEntry",
    "CacheStats",
    "CacheInfo",
    "PruneResult",
    "resolve_cache",
    "default_cache_dir",
    "cacheable",
    "canonical_json",
    "result_key",
    "not_in_key",
    "in_key",
    "NOT_IN_KEY",
    "encode_row",
    "decode_row",
    "pack",
    "unpack",
    "FORMAT",
    "KEY_FORMAT",
    "ENV_VAR",
    "sum_counts",
]
