"""The architecture contract: one `Architecture` object per GGUF `general.architecture` value.

An architecture plugin registers its adapters through the `orcd_register_architectures` hook. An
adapter knows three things: which metadata the architecture requires (checked at load, before any
GPU work), how to build a typed config from the metadata, and how to turn the file's tensors into a
runnable model on a device (the forward pass is written once against the device interface).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from .shape import ModelShape


class Architecture:
    """Base class of architecture adapters."""

    #: The GGUF `general.architecture` value this adapter runs (e.g. "qwen2").
    name: ClassVar[str]
    #: Metadata keys (without the "{arch}." prefix) that must be present, with their Python type(s).
    required_metadata: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    def config(self, gguf) -> "ModelConfig":
        """A typed config built from the metadata of `gguf` (the opened file, an
        `orcd_core.gguf_file.GGUFModel`)."""
        raise NotImplementedError(f"{self.name}: config")

    def build(self, gguf, device, registry=None) -> "RunnableModel":
        """Map the tensors of `gguf` (the opened file) to weights on `device` and return the runnable model.
        `registry` resolves tensor types to `QuantFormat`s (`default_registry()` when None)."""
        raise NotImplementedError(f"{self.name}: build")

    def synth_spec(self):
        """Optional: the `orcd_core.testing.synth.SynthSpec` of this architecture's synthetic models
        (`orcd-worker synth`), or None (the default) when the adapter offers none. Test support: an
        implementation imports its tables on demand, so loading the plugin stays cheap."""
        return None

    def __repr__(self) -> str:
        return f"<Architecture {self.name}>"


class ModelConfig(Protocol):
    """What every architecture's config (`Architecture.config`) offers the core, whatever else it holds."""

    n_vocab: int  # rows of token_embd
    context_length: int | None  # {arch}.context_length; None when the file does not say

    def shape(self) -> ModelShape:
        """The sizes memory planning needs (`orcd_core.shape`): layers, KV heads and windows per layer, ..."""
        ...


class RunnableModel(Protocol):
    """What `Architecture.build` returns; the engine drives it (orcd_core.engine).

    `forward` is the whole model for one step: it issues device ops only (no host reads), so the
    CUDA backend can capture a decode step (T = 1) as one graph."""

    config: ModelConfig  # the engine reads `n_vocab`, `context_length` and `shape()`

    def new_kv_cache(self, n_ctx: int) -> Any:
        """A KV cache (`orcd_core.device.KVCache`) for `n_ctx` positions on the model's device."""
        ...

    def forward(self, step: Any, cache: Any, *, all_logits: bool = False) -> Any:
        """Logits of the step's tokens: [T, V] with `all_logits`, else [1, V] (the last token only)."""
        ...
