"""Token sampling, shared by every backend: the exact semantics the CUDA kernel reproduces.

`sample(logits, params, recent_ids, step_index)` picks one id from float32 logits [V]:

1. Temperature. `T = params.temperature`. If T > 0: `l = logits / T` (float32 division).
   If T <= 0 the run is greedy (step 3 returns the argmax).
2. Penalties (llama.cpp's `penalties` sampler), when `repetition_penalty != 1` or a frequency or
   presence penalty is set: for each *distinct* id among the last `repetition_window` entries of
   `recent_ids` (ids < 0 are empty slots), occurring c times there:
   `l[id] = l[id] / penalty` if `l[id] > 0`, else `l[id] * penalty`; then
   `l[id] -= c * frequency_penalty + presence_penalty` (float32, that order of operations).
   The engine feeds the prompt's ids and the generated ids into the window (as llama.cpp does; an
   OpenAI server counts generated tokens only).
3. Greedy (T <= 0): return the lowest id among those with the maximal `l`.
4. Candidates, sorted by (l descending, id ascending). Top-k (`top_k > 0`): the first k of them.
5. From here on in float64: `e_i = exp(l_i - l_0)` over the sorted candidates (l_0 the largest),
   `c_i = e_0 + ... + e_i` summed sequentially in that order.
   Top-p (`top_p < 1`): keep the first n candidates, n the smallest with `c_{n-1} >= top_p * c_last`.
6. Min-p (`min_p > 0`): of those, keep the candidates with `e_i >= min_p` (p_i >= min_p * p_max).
7. Sample: `u = uniform(seed, step_index)`; recompute `c_i` over the kept candidates; return the
   first candidate with `c_i > u * c_last` (the last candidate if rounding leaves none).

`uniform(seed, step_index)`, one uniform per step from a counter-based generator (SplitMix64):
    x = (seed + (step_index + 1) * 0x9E3779B97F4A7C15) mod 2^64
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 mod 2^64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB mod 2^64
    x =  x ^ (x >> 31)
    u = (x >> 40) * 2^-24            # 24 random bits: exactly representable in float32, in [0, 1)
`step_index` is the 0-based index of the token being generated in the request, so a request's ids
depend only on (seed, logits), never on what else the process ran.

Same seed and same logits give the same id on every backend; the only float operations whose
rounding could differ between implementations are the float64 `exp` and sums of step 5-7, which
can only matter when `u * c_last` lands within ~1e-15 relative of a boundary.
"""

from __future__ import annotations

import numpy as np

from .generation import SamplingParams, TokenLogprobs

_MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """The SplitMix64 output function applied to a 64-bit state."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step_index: int) -> float:
    """The step's uniform in [0, 1): 24 bits of SplitMix64 of (seed, step_index)."""
    x = splitmix64(int(seed) + (int(step_index) + 1) * GOLDEN_GAMMA)
    return (x >> 40) * (1.0 / (1 << 24))


def apply_temperature_and_penalty(logits: np.ndarray, params: SamplingParams, recent_ids) -> np.ndarray:
    """Steps 1-2: a new float32 array."""
    l = np.array(logits, dtype=np.float32, copy=True)
    if params.temperature > 0:
        l /= np.float32(params.temperature)
    if penalties_on(params):
        recent = np.asarray(recent_ids, dtype=np.int64).reshape(-1)[-params.repetition_window :]
        ids, counts = np.unique(recent[(recent >= 0) & (recent < l.size)], return_counts=True)
        if ids.size:
            pen = np.float32(params.repetition_penalty)
            vals = l[ids]
            vals = np.where(vals > 0, vals / pen, vals * pen).astype(np.float32)
            sub = counts.astype(np.float32) * np.float32(params.frequency_penalty) + np.float32(params.presence_penalty)
            l[ids] = vals - sub.astype(np.float32)
    return l


def penalties_on(params: SamplingParams) -> bool:
    """Whether step 2 changes anything."""
    return params.repetition_window > 0 and (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                                             or params.presence_penalty != 0.0)


def plain_greedy(params: SamplingParams) -> bool:
    """Whether the pick is the argmax of the logits themselves: greedy (temperature <= 0), no penalty."""
    return params.temperature <= 0.0 and not penalties_on(params)


def sorted_candidates(l: np.ndarray, top_k: int) -> np.ndarray:
    """Step 4: candidate ids sorted by (logit desc, id asc), cut to `top_k` when it is > 0."""
    V = l.size
    if 0 < top_k < V:
        thr = np.partition(l, V - top_k)[V - top_k]  # the k-th largest value
        cand = np.nonzero(l >= thr)[0]  # ascending ids, includes every tie at the boundary
    else:
        cand = np.arange(V)
    order = np.lexsort((cand, -l[cand]))
    out = cand[order]
    return out[:top_k] if top_k > 0 else out


def sample(logits: np.ndarray, params: SamplingParams, recent_ids=(), step_index: int = 0) -> int:
    """Choose the next id from `logits` [V] (see the module docstring for the exact rule)."""
    l = apply_temperature_and_penalty(logits, params, recent_ids)
    if params.temperature <= 0:
        return int(np.argmax(l))  # the first (lowest) id among equal maxima
    cand = sorted_candidates(l, params.top_k)
    lc = l[cand].astype(np.float64)
    e = np.exp(lc - lc[0])
    if params.top_p < 1.0:
        c = np.cumsum(e)
        n = int(np.argmax(c >= params.top_p * c[-1])) + 1  # the first index reaching top_p
        cand, e = cand[:n], e[:n]
    if params.min_p > 0.0:
        keep = e >= params.min_p
        cand, e = cand[keep], e[keep]
    c = np.cumsum(e)
    target = uniform(params.seed, step_index) * c[-1]
    i = min(int(np.searchsorted(c, target, side="right")), len(cand) - 1)
    return int(cand[i])


def token_logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprobs:
    """The log-probability of `token` under softmax(`logits`) (one step's raw logits, before temperature,
    penalties and filters) and the `k` likeliest ids' (likeliest first, ties to the lower id), computed
    in float64 on the host for every backend."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        k = min(k, x.size)
        kth = np.partition(x, x.size - k)[x.size - k]  # the k-th largest value
        cand = np.flatnonzero(x >= kth)  # every id tied with it too, then: value descending, id ascending
        order = cand[np.lexsort((cand, -x[cand]))][:k]
        top = tuple((int(i), float(x[i] - lse)) for i in order)
    return TokenLogprobs(logprob=float(x[int(token)] - lse), top=top)
