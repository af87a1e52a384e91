"""Reading architecture hyper-parameters from GGUF metadata: the helpers every adapter's config shares."""

from __future__ import annotations

from .errors import GGUFMetadataError


def uniform_per_layer(model, key: str, default: int | None = None, *, hi: int | None = None) -> int:
    """A count GGUF stores either as one integer or as an array of one value per layer (llama.cpp
    accepts both, e.g. `attention.head_count_kv`), for an architecture that needs every layer
    alike: the value, an int in 1..`hi` (no upper bound when None). `default` applies when the key is
    absent; without one, the key is required. `GGUFMetadataError` names the key when the layers
    differ or the value is bad."""
    if key not in model.metadata:
        if default is None:
            raise GGUFMetadataError(model.path, f"metadata key {key!r} is missing")
        value = default
    else:
        value = model.metadata[key]
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise GGUFMetadataError(model.path, f"metadata {key} varies per layer: {value!r:.80}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GGUFMetadataError(model.path, f"metadata {key} is {value!r:.60}, expected a positive int")
    if hi is not None and value > hi:
        raise GGUFMetadataError(model.path, f"metadata key {key!r} is {value!r:.60}, expected an integer in 1..{hi}")
    return value
