"""The architecture contract: one `Architecture` object per GGUF `general.architecture` value.

An architecture plugin registers its adapters through the `orcd_register_architectures` hook. An
adapter knows three things: which metadata the architecture requires (checked at load, before any
GPU work), how to build a typed config from the metadata, and how to turn the file's tensors into a
runnable model on a device (the forward pass is written once against the device interface).
"""

from __future__ import annotations

from typing import Any, ClassVar


class Architecture:
    """Base class of architecture adapters."""

    #: The GGUF `general.architecture` value this adapter runs (e.g. "qwen2").
    name: ClassVar[str]
    #: Metadata keys (without the "{arch}." prefix) that must be present, with their Python type(s).
    required_metadata: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    def config(self, model) -> Any:
        """A typed config built from the GGUF metadata of `model` (an `orcd_core.gguf_file.GGUFModel`)."""
        raise NotImplementedError(f"{self.name}: config")

    def build(self, model, device) -> Any:
        """Map the file's tensors to weights on `device` and return the runnable model."""
        raise NotImplementedError(f"{self.name}: build")

    def __repr__(self) -> str:
        return f"<Architecture {self.name}>"
