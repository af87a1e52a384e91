"""The reference backend: every op of `orcd_core.device.Device` in NumPy, on the CPU.

It is the oracle the CUDA backend is tested against, and the way the worker runs where there is no
GPU (`--backend reference`, never a silent fallback). Each op follows llama.cpp's CPU semantics
(ggml/src/ggml-cpu/ops.cpp, src/llama-graph.cpp); where we deliberately differ, the op says so.

Weights are dequantized once at upload, tensor by tensor, to float32 through the registry's
`QuantFormat.dequantize`; a `linear` is then one BLAS matmul. K/V are stored in float16, as in
llama.cpp's default cache, so the values attention reads are rounded exactly as llama.cpp's are.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..device import MAX_BATCH, Device, KVBatch, KVCache, LoadProgress, RopeSpec, Step, Weight
from ..gguf_file import TensorInfo
from ..rope import yarn_corr_dims

F32 = np.float32


def _dequantize(part: TensorInfo, fmt) -> np.ndarray:
    if int(part.ggml_type) != int(fmt.ggml_type):
        raise ValueError(f"tensor {part.name!r} is {part.type_name}, not {fmt.name}")
    return fmt.dequantize(part.data, part.np_shape)


class ReferenceDevice(Device):
    """NumPy implementation of the device interface (float32 activations and weights)."""

    name = "reference"

    def __init__(self) -> None:
        self._weight_bytes = 0
        self._kv_bytes = 0
        self._load: LoadProgress | None = None

    # -- loading ----------------------------------------------------------------------------------

    def prepare_load(self, model, *, n_ctx: int, shape, progress=None, n_seq: int = 1) -> None:
        """Nothing to plan (host memory; the engine proves the KV cache fits); progress starts."""
        self._load = LoadProgress(progress, model.tensor_data_bytes)
        self._load.start()

    def finish_load(self) -> None:
        if self._load is not None:
            self._load.finish()
            self._load = None

    # -- memory -----------------------------------------------------------------------------------

    def upload_weight(self, name: str, parts: Sequence[TensorInfo], fmt: Any) -> Weight:
        """Dequantize each part to float32 and concatenate along the rows (axis -2 for stacked
        experts, axis 0 for a matrix or vector)."""
        if not parts:
            raise ValueError(f"weight {name!r}: no parts")
        arrays = [_dequantize(p, fmt) for p in parts]
        if len(arrays) == 1:
            data = arrays[0]
        else:
            ndim = arrays[0].ndim
            if any(a.ndim != ndim or a.shape[-1] != arrays[0].shape[-1] for a in arrays):
                raise ValueError(f"weight {name!r}: parts {[a.shape for a in arrays]} do not share a row length")
            data = np.concatenate(arrays, axis=-2 if ndim >= 2 else 0)
        data = np.ascontiguousarray(data, dtype=F32)
        self._weight_bytes += data.nbytes
        if self._load is not None:
            self._load.add(sum(p.nbytes for p in parts))
        return Weight(name=name, shape=tuple(data.shape), fmt=fmt, data=data, nbytes=data.nbytes)

    def upload_array(self, name: str, array) -> np.ndarray:
        out = np.array(array, dtype=F32, copy=True)
        self._weight_bytes += out.nbytes
        return out

    def new_kv_cache(self, n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int,
                     window: Sequence[int] | None = None) -> KVCache:
        windows = list(window) if window is not None else [0] * n_layers
        if len(windows) != n_layers:
            raise ValueError(f"window has {len(windows)} entries for {n_layers} layers")
        k, v, nbytes = [], [], 0
        try:
            for w in windows:
                rows = min(w, n_ctx) if w > 0 else n_ctx
                k.append(np.zeros((rows, n_kv_heads, head_dim), np.float16))  # calloc: pages on first write
                v.append(np.zeros((rows, n_kv_heads, head_dim), np.float16))
                nbytes += 2 * k[-1].nbytes
        except MemoryError:
            from ..generation import VramOOM

            raise VramOOM(f"the KV cache for {n_ctx} positions ({n_layers} layers) does not fit in host memory") from None
        self._kv_bytes += nbytes
        return KVCache(n_layers, n_ctx, n_kv_heads, head_dim, k, v, windows, nbytes)

    def free_kv_cache(self, cache: KVCache) -> None:
        if cache.k:
            self._kv_bytes -= cache.nbytes
        cache.k, cache.v = [], []

    def to_device(self, array, dtype: str = "int32") -> np.ndarray:
        return np.array(array, dtype=dtype, copy=True)

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def memory_report(self) -> dict[str, int]:
        return {"weights": self._weight_bytes, "kv_cache": self._kv_bytes, "workspace": 0}

    # -- ops --------------------------------------------------------------------------------------

    def embedding(self, table: Weight, ids) -> np.ndarray:
        return table.data[np.asarray(ids, dtype=np.int64)]  # [T, D]

    def linear(self, x, w: Weight, bias=None) -> np.ndarray:
        if w.data.ndim != 2:
            raise ValueError(f"linear: weight {w.name!r} has shape {w.shape}; expert stacks go through moe()")
        if x.ndim == 2 and x.shape[0] <= MAX_BATCH:
            # decode-size: one matvec per row, so that a row's result does not depend on how many
            # rows share the step (a sequence decodes the same tokens alone or batched)
            y = np.stack([w.data @ row for row in x])
        else:
            y = np.matmul(x, w.data.T)  # [T, K] @ [K, N] -> [T, N]
        if bias is not None:
            y += bias
        return y

    def rms_norm(self, x, weight, eps: float) -> np.ndarray:
        # ggml_rms_norm: mean of squares accumulated in double, scale = 1/sqrtf(mean + eps) in float
        mean = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(F32)
        scale = (F32(1.0) / np.sqrt(mean + F32(eps))).astype(F32)
        return (x * scale) * weight

    def layer_norm(self, x, weight, bias, eps: float) -> np.ndarray:
        # ggml_norm: mean in double, centred, variance in double, 1/sqrtf(var + eps); then * w + b
        mean = np.mean(x, axis=-1, keepdims=True, dtype=np.float64).astype(F32)
        xc = x - mean
        var = np.mean(np.square(xc, dtype=np.float64), axis=-1, keepdims=True).astype(F32)
        y = xc * (F32(1.0) / np.sqrt(var + F32(eps)))
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        return y

    def rope(self, x, positions, spec: RopeSpec) -> np.ndarray:
        cos, sin = rope_cos_sin(np.asarray(positions), spec)  # [T, n_rot/2] each
        out = np.array(x, dtype=F32, copy=True)  # [T, H, hd]; dims >= n_rot pass through
        half = spec.n_rot // 2
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, n_rot/2]
        if spec.neox:
            x0, x1 = x[..., :half], x[..., half : spec.n_rot]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half : spec.n_rot] = x0 * sin + x1 * cos
        else:
            x0, x1 = x[..., 0 : spec.n_rot : 2], x[..., 1 : spec.n_rot : 2]
            out[..., 0 : spec.n_rot : 2] = x0 * cos - x1 * sin
            out[..., 1 : spec.n_rot : 2] = x0 * sin + x1 * cos
        return out

    def attention(self, q, k, v, cache: KVCache | KVBatch, layer: int, step: Step, *, scale: float,
                  sinks=None, window: int = 0) -> np.ndarray:
        if isinstance(cache, KVBatch):  # a batched decode step: row t is one token of caches[t]
            pos = np.asarray(step.positions).reshape(-1)
            ids = np.asarray(step.ids).reshape(-1)
            rows = [self.attention(q[t : t + 1], k[t : t + 1], v[t : t + 1], c, layer,
                                   Step(1, ids[t : t + 1], pos[t : t + 1], pos[t : t + 1]), scale=scale,
                                   sinks=sinks, window=window)
                    for t, c in enumerate(cache.caches)]
            return np.concatenate(rows)
        T, Hq, hd = q.shape
        Hkv = k.shape[1]
        if Hq % Hkv:
            raise ValueError(f"attention: {Hq} query heads is not a multiple of {Hkv} KV heads")
        qpos = np.asarray(step.positions, dtype=np.int64)  # [T]
        n_past = int(np.asarray(step.n_past).reshape(-1)[0])
        kc, vc = cache.k[layer], cache.v[layer]
        rows = kc.shape[0]
        ring = cache.window[layer] > 0 if cache.window else False
        # keys already in the cache that these queries may see: [lo, n_past)
        lo = max(0, n_past - rows) if ring else 0
        past_pos = np.arange(lo, n_past, dtype=np.int64)
        slots = past_pos % rows if ring else past_pos
        k16, v16 = k.astype(np.float16), v.astype(np.float16)  # the cache's rounding, in-step keys too
        keys = np.concatenate([kc[slots], k16]).astype(F32)  # [S, Hkv, hd]
        vals = np.concatenate([vc[slots], v16]).astype(F32)  # [S, Hkv, hd]
        kpos = np.concatenate([past_pos, qpos])  # [S]
        # write this step's k, v (ring buffer: slot = position % rows)
        wslots = qpos % rows if ring else qpos
        if np.any(wslots >= rows):
            raise ValueError(f"attention: position {int(qpos.max())} beyond the cache ({rows} positions)")
        kc[wslots], vc[wslots] = k16, v16

        g = Hq // Hkv
        qh = q.reshape(T, Hkv, g, hd).transpose(1, 2, 0, 3).reshape(Hkv, g * T, hd)  # [Hkv, g*T, hd]
        scores = np.matmul(qh, keys.transpose(1, 2, 0)) * F32(scale)  # [Hkv, g*T, S]
        scores = scores.reshape(Hkv, g, T, -1)  # [Hkv, g, T, S]
        visible = kpos[None, :] <= qpos[:, None]  # [T, S]
        if window > 0:
            visible &= kpos[None, :] > qpos[:, None] - window
        scores = np.where(visible, scores, F32(-np.inf))
        m = scores.max(axis=-1, keepdims=True)  # [Hkv, g, T, 1]
        if sinks is not None:
            s = np.asarray(sinks, dtype=F32).reshape(Hkv, g, 1, 1)
            m = np.maximum(m, s)
        p = np.exp(scores - m)
        denom = p.sum(axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + np.exp(s - m)
        p = p / denom
        out = np.matmul(p.reshape(Hkv, g * T, -1), vals.transpose(1, 0, 2))  # [Hkv, g*T, hd]
        return np.ascontiguousarray(out.reshape(Hkv, g, T, hd).transpose(2, 0, 1, 3)).reshape(T, Hq, hd)

    def add(self, a, b) -> np.ndarray:
        return a + b

    def silu_mul(self, gate, up) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp(-gate) -> inf for gate < -88: x / inf = -0, as in C
            return gate / (F32(1.0) + np.exp(-gate)) * up

    def gelu(self, x) -> np.ndarray:
        """ggml_gelu's tanh approximation, evaluated in float32. (llama.cpp's CPU build reads it
        from an fp16 table for |x| < 10; its CUDA build computes it like this.)"""
        x = np.asarray(x, dtype=F32)
        inner = F32(math.sqrt(2.0 / math.pi)) * x * (F32(1.0) + F32(0.044715) * x * x)
        return F32(0.5) * x * (F32(1.0) + np.tanh(inner))

    def moe(self, x, router: Weight, router_bias, gate_up: Weight, gate_up_bias, down: Weight,
            down_bias, *, top_k: int, act: str, alpha: float = 1.702, limit: float = 7.0) -> np.ndarray:
        T, D = x.shape
        n_expert, two_f, _ = gate_up.shape
        F = two_f // 2
        logits = self.linear(x, router, router_bias)  # [T, E]
        chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]  # [T, k], lowest id on ties
        sel = np.take_along_axis(logits, chosen, axis=-1)  # [T, k]
        wts = np.exp(sel - sel.max(axis=-1, keepdims=True))
        wts = wts / wts.sum(axis=-1, keepdims=True)  # softmax over the chosen experts
        out = np.zeros((T, D), F32)
        # decode-size: token by token (each row computed as it would be alone, see `linear`)
        groups = [(np.array([t]), chosen[t : t + 1]) for t in range(T)] if T <= MAX_BATCH else [(np.arange(T), chosen)]
        for rows_of, ch in groups:
            self._moe_experts(x, rows_of, ch, wts, gate_up, gate_up_bias, down, down_bias, F, act, alpha, limit, out)
        return out

    def _moe_experts(self, x, token_ids, chosen, wts, gate_up, gate_up_bias, down, down_bias, F, act, alpha, limit,
                     out) -> None:
        """The chosen experts of the tokens `token_ids` (their rows of `chosen`), expert by expert
        (ascending), accumulated into `out`."""
        for e in np.unique(chosen):
            sub, slot = np.nonzero(chosen == e)  # tokens routed to expert e
            rows = token_ids[sub]
            xe = x[rows]  # [n, D]
            h = xe @ gate_up.data[e].T  # [n, 2F]
            if gate_up_bias is not None:
                h += gate_up_bias[e]
            a = self._glu(h[:, :F], h[:, F:], act, alpha, limit)  # [n, F]
            y = a @ down.data[e].T  # [n, D]
            if down_bias is not None:
                y += down_bias[e]
            out[rows] += y * wts[rows, slot][:, None]

    @staticmethod
    def _glu(gate, up, act: str, alpha: float, limit: float) -> np.ndarray:
        with np.errstate(over="ignore"):  # very negative gates: exp overflows to inf, the result is -0
            if act == "silu":
                return gate / (F32(1.0) + np.exp(-gate)) * up
            if act == "swiglu_oai":
                # ggml_swiglu_oai: x = min(gate, limit); y = clamp(up, -limit, limit); x*sigmoid(alpha*x)*(y+1)
                xg = np.minimum(gate, F32(limit))
                yu = np.clip(up, F32(-limit), F32(limit))
                return xg / (F32(1.0) + np.exp(F32(-alpha) * xg)) * (yu + F32(1.0))
        raise ValueError(f"moe: unknown activation {act!r} (expected 'silu' or 'swiglu_oai')")

    def logits_last(self, x) -> np.ndarray:
        return x[-1]

    def sample(self, logits, params, recent_ids, step_index) -> np.ndarray:
        from ..sampling import sample

        recent = np.asarray(recent_ids).reshape(-1)
        idx = int(np.asarray(step_index).reshape(-1)[0])
        return np.array([sample(np.asarray(logits, dtype=F32), params, recent[recent >= 0], idx)], np.int32)


def rope_cos_sin(positions: np.ndarray, spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [T, n_rot/2] of each rotated pair, as ggml's rope cache (ops.cpp rope_yarn):
    theta_i = p * base^(-2i/n_rot) (float32, by repeated multiplication as ggml does), divided by
    freq_factors[i]; interpolated by freq_scale and, when ext_factor != 0, YaRN-mixed with the
    extrapolated angle by a ramp over the correction dims, with mscale *= 1 + 0.1*ln(1/freq_scale);
    both scaled by attn_factor."""
    n_rot = spec.n_rot
    half = n_rot // 2
    theta_scale = np.power(F32(spec.base), F32(-2.0) / F32(n_rot), dtype=F32)
    steps = np.empty((len(positions), half), F32)
    steps[:, 0] = positions.astype(F32)
    steps[:, 1:] = theta_scale
    theta = np.cumprod(steps, axis=1, dtype=F32)  # [T, half]
    if spec.freq_factors is not None:
        theta = theta / np.asarray(spec.freq_factors, dtype=F32)[:half]
    freq_scale = F32(spec.freq_scale)
    interp = freq_scale * theta
    mscale = F32(spec.attn_factor)
    if spec.ext_factor != 0.0:
        low, high = yarn_corr_dims(n_rot, spec.n_ctx_orig, spec.base, spec.beta_fast, spec.beta_slow)
        i = np.arange(half, dtype=F32)
        y = (i - F32(low)) / F32(max(0.001, high - low))
        ramp_mix = (F32(1.0) - np.clip(y, F32(0.0), F32(1.0))) * F32(spec.ext_factor)
        theta = interp * (F32(1.0) - ramp_mix) + theta * ramp_mix
        mscale = F32(mscale * F32(1.0 + 0.1 * math.log(1.0 / float(freq_scale))))
    else:
        theta = interp
    return np.cos(theta) * mscale, np.sin(theta) * mscale
