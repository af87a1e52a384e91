"""RoPE parameters from GGUF metadata, resolved as llama.cpp resolves them for a context
(src/llama-model.cpp load_hparams, src/llama-context.cpp): shared by every architecture adapter.

    freq_base   = {arch}.rope.freq_base (10000)
    scaling     = {arch}.rope.scaling.type ("linear"; "none" | "linear" | "yarn" | "longrope")
    freq_scale  = 1 / {arch}.rope.scaling.factor (or the older rope.scale_linear); 1 if absent or 0,
                  and 1 whenever scaling == "none"
    n_ctx_orig  = {arch}.rope.scaling.original_context_length, else {arch}.context_length, else 0
    ext_factor  = {arch}.rope.scaling.yarn_ext_factor, else 1 for "yarn" and 0 otherwise
    attn_factor = {arch}.rope.scaling.yarn_attn_factor (1); when ext_factor != 0 it becomes
                  mscale(factor) / (1 + 0.1 ln factor) with mscale(s) = 1 + 0.1 ln s (s > 1), which
                  cancels ggml's own YaRN magnitude term; then times {arch}.rope.scaling.attn_factor (1)
    beta_fast / beta_slow = {arch}.rope.scaling.yarn_beta_fast / _slow (32 / 1)

Also the RoPE math both backends share (`yarn_corr_dims`); each backend computes the angles itself.
"""

from __future__ import annotations

import math

from .device import RopeSpec
from .errors import GGUFMetadataError
from .gguf_file import MAX_CONTEXT_LENGTH

SCALING_TYPES = ("none", "linear", "yarn", "longrope")
DEFAULT_FREQ_BASE = 10000.0
#: Bounds of what a file may claim: real bases run up to ~1e8 (Llama 4: 5e5, Qwen3: 1e6), real
#: scaling factors up to a few hundred.
MAX_FREQ_BASE = 1e12
MAX_ROPE_FACTOR = 1e6


def rope_scaling_type(model, *, arch: str | None = None, allowed: tuple[str, ...] = SCALING_TYPES) -> str:
    """`{arch}.rope.scaling.type` ("linear" when absent), one of `allowed`. `arch` defaults to the
    file's architecture."""
    key = f"{arch or model.architecture}.rope.scaling.type"
    value = str(model.metadata.get(key, "linear"))
    if value not in allowed:
        raise GGUFMetadataError(model.path, f"metadata {key!r} is {value!r}, expected one of {allowed}")
    return value


def rope_spec_from_metadata(model, *, n_rot: int, neox: bool, arch: str | None = None,
                            scaling_types: tuple[str, ...] = SCALING_TYPES, ignored: tuple[str, ...] = ()) -> RopeSpec:
    """The RopeSpec llama.cpp would use for this file at its trained settings (freq_factors None:
    adapters add the factors tensor they pick, with `dataclasses.replace`).

    Overrides for architectures that llama.cpp reads differently: `arch` (the key prefix; default the
    file's architecture), `scaling_types` (the rope.scaling.type values accepted) and `ignored` (key
    suffixes the architecture does not read: their defaults above apply, e.g. gpt-oss's fixed betas)."""
    prefix = arch or model.architecture

    def key(suffix: str) -> str:
        return f"{prefix}.{suffix}"

    def num(suffix: str, default: float, **bounds) -> float:  # finite, range-checked where read
        return default if suffix in ignored else model.float_value(key(suffix), default, **bounds)

    scaling = rope_scaling_type(model, arch=prefix, allowed=scaling_types)
    factor = num("rope.scaling.factor", 0.0, lo=0.0, hi=MAX_ROPE_FACTOR) or num(
        "rope.scale_linear", 0.0, lo=0.0, hi=MAX_ROPE_FACTOR)
    freq_scale = 1.0 if factor == 0.0 or scaling == "none" else 1.0 / factor
    n_ctx_orig = (0 if "rope.scaling.original_context_length" in ignored else model.int_value(
        key("rope.scaling.original_context_length"), 0, lo=0, hi=MAX_CONTEXT_LENGTH)) or model.int_value(
        key("context_length"), 0, lo=0, hi=MAX_CONTEXT_LENGTH)
    ext_factor = num("rope.scaling.yarn_ext_factor", 1.0 if scaling == "yarn" else 0.0, lo=-1.0, hi=MAX_ROPE_FACTOR)
    attn_factor = num("rope.scaling.yarn_attn_factor", 1.0, lo=0.0, hi=MAX_ROPE_FACTOR)
    if ext_factor != 0.0:
        s = 1.0 / freq_scale
        mscale = 1.0 + 0.1 * math.log(s) if s > 1.0 else 1.0
        attn_factor = mscale / (1.0 + 0.1 * math.log(s))
    attn_factor *= num("rope.scaling.attn_factor", 1.0, lo=0.0, hi=MAX_ROPE_FACTOR, lo_open=True)
    return RopeSpec(
        n_rot=n_rot,
        neox=neox,
        base=DEFAULT_FREQ_BASE if "rope.freq_base" in ignored else rope_freq_base(model, key("rope.freq_base")),
        freq_scale=freq_scale,
        ext_factor=ext_factor,
        attn_factor=attn_factor,
        beta_fast=num("rope.scaling.yarn_beta_fast", 32.0, lo=0.0, hi=MAX_ROPE_FACTOR),
        beta_slow=num("rope.scaling.yarn_beta_slow", 1.0, lo=0.0, hi=MAX_ROPE_FACTOR),
        n_ctx_orig=n_ctx_orig,
    )


def rope_freq_base(model, key: str | None = None, default: float = DEFAULT_FREQ_BASE) -> float:
    """Metadata `key` (default `{arch}.rope.freq_base`): a finite base above 1 (0, 1, NaN or inf would
    make every angle 0 or NaN)."""
    return model.float_value(key or model.arch_key("rope.freq_base"), default, lo=1.0, hi=MAX_FREQ_BASE, lo_open=True)


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the dims where YaRN's ramp starts (floor) and ends (ceil)."""

    def corr_dim(n_rot: float) -> float:
        if n_ctx_orig <= 0:
            return -math.inf  # logf(0) in C; only reachable with a missing n_ctx_orig
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    start, end = corr_dim(beta_fast), corr_dim(beta_slow)
    start = math.floor(start) if math.isfinite(start) else start
    end = math.ceil(end) if math.isfinite(end) else end
    return float(max(0, start)), float(min(n_dims - 1, end))
