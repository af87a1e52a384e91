"""Parity of the gpt-oss and gpt2 adapters (reference backend) with llama.cpp, on synthetic files from
`orcd_core.testing.synth` (tiny dims that keep every feature: gpt-oss with 8/1 heads of 64, sinks, SWA 128 on
even layers, YaRN, 32 MXFP4 experts top-4 with biases, o200k vocabulary; gpt2 with learned positions,
LayerNorm, fused c_attn, GELU, Q4_K_M mix, tied and untied).

Both sides evaluate the same ids; we compare the logits at every position. llama.cpp quantizes the
activations of its CPU matmuls (Q8_0 for MXFP4 and Q8_0 weights, Q8_K for k-quants, F16 for F16
weights), the reference computes in float32 on dequantized weights: the logits differ by about 1%.
Thresholds (issue 4): relative L2 error <= 2% at every position, top-1 equal at >= 90% of positions.

One deliberate allowance, for MoE only: with random router weights the 4th and 5th best of 32 expert
logits are sometimes closer than that 1% noise, and llama.cpp then picks the other expert (a 5-10%
logit difference at that position, and a little at the positions that attend to it). Such a
position passes only if it is *explained*: our forward with those two experts exchanged at one layer
of that token, where the router margin is a near-tie (under MAX_TIE of the token's router-logit
spread), brings it under 2%. The final comparison uses our forward with every accepted exchange
(llama.cpp's routing), where every position must be under 2%; at most 5% of the routing decisions
(tokens x layers) may need an exchange (we measure 2-3%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gguf import GGMLQuantizationType
from gpt_tiny_gguf import write_gpt_oss

from orcd_core.device import Step
from orcd_core.backends import create_device
from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import load_plugins
from orcd_core.testing.synth import synthesize

pytestmark = pytest.mark.oracle

MAX_REL_L2 = 0.02
MIN_TOP1 = 0.90
MAX_TIE = 0.05  # a router margin below 5% of the logits' std counts as a near-tie
MAX_EXPLAINED = 0.05  # at most this share of the routing decisions (tokens x layers) may need an exchange


@pytest.fixture(scope="module")
def registry():
    return load_plugins()


class Routes:
    """Wraps the reference device's `moe`: records every call's router logits per (layer, position),
    and recomputes the tokens listed in `swaps` with the k-th and (k+1)-th experts exchanged."""

    def __init__(self, dev, n_layer: int):
        self.dev, self.moe, self.n_layer = dev, dev.moe, n_layer
        self.logits: dict[tuple[int, int], np.ndarray] = {}
        self.swaps: set[tuple[int, int]] = set()
        self.calls, self.start = 0, 0
        dev.moe = self

    def __call__(self, x, router, router_b, gate_up, gate_up_b, down, down_b, *, top_k, act, alpha, limit):
        layer = self.calls % self.n_layer
        self.calls += 1
        out = self.moe(x, router, router_b, gate_up, gate_up_b, down, down_b, top_k=top_k, act=act,
                       alpha=alpha, limit=limit)  # [T, D]
        logits = x @ router.data.T + router_b  # [T, E]
        for row in range(x.shape[0]):
            pos = self.start + row
            self.logits[layer, pos] = logits[row]
            if (layer, pos) in self.swaps:
                order = np.argsort(-logits[row], kind="stable")
                chosen = np.r_[order[: top_k - 1], order[top_k]]  # the (k+1)-th replaces the k-th
                w = np.exp(logits[row][chosen] - logits[row][chosen].max())
                w /= w.sum()
                y = np.zeros_like(out[row])
                for e, we in zip(chosen, w):
                    h = gate_up.data[e] @ x[row] + gate_up_b[e]  # [2F]
                    F = h.shape[0] // 2
                    g, u = np.minimum(h[:F], limit), np.clip(h[F:], -limit, limit)
                    y += we * (down.data[e] @ (g / (1 + np.exp(-alpha * g)) * (u + 1)) + down_b[e])
                out[row] = y
        return out

    def margin(self, layer: int, pos: int, top_k: int) -> float:
        """(k-th - (k+1)-th best router logit) / std of the token's router logits."""
        s = np.sort(self.logits[layer, pos])[::-1]
        return float((s[top_k - 1] - s[top_k]) / s.std())


def reference_logits(built, dev, ids: list[int], chunk: int, routes: Routes | None = None,
                     last_only: bool = False) -> np.ndarray:
    """Our logits for `ids` ([T, V], or [1, V] of the last token with `last_only`), evaluated in steps
    of `chunk` tokens through one KV cache."""
    cache = built.new_kv_cache(len(ids))
    out = []
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            if routes is not None:
                routes.start = start
            step = Step(len(part), dev.to_device(part), dev.to_device(np.arange(start, start + len(part))),
                        dev.to_device([start]))
            logits = built.forward(step, cache, all_logits=not last_only)
            out.append(np.asarray(dev.to_host(logits), dtype=np.float32))
    finally:
        dev.free_kv_cache(cache)
    return out[-1] if last_only else np.concatenate(out)


def llama_cpp_logits(path: Path, ids: list[int], chunk: int) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=chunk, n_ubatch=chunk, logits_all=True,
                          verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def rel_l2(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ours - theirs, axis=-1) / np.linalg.norm(theirs, axis=-1)  # per position


def explain_by_routing_ties(built, dev, routes: Routes, ids, chunk, theirs, rel) -> dict[int, tuple[int, float]]:
    """Find the routing exchanges that turn our forward into llama.cpp's. Positions over the
    threshold are walked in order (a routing choice at position p changes only positions >= p):
    each is re-evaluated with the exchanges accepted so far (an earlier one often fixes it through
    attention); if still over, an exchange is tried at each layer whose router margin there is a
    near-tie, closest first, and the first that brings the position under the threshold is kept.
    An accepted exchange can move a later near-tie the other way, so the walk repeats on a fresh
    full evaluation until nothing is over the threshold or nothing more can be explained."""
    k, n_layer = built.config.n_expert_used, built.config.n_layer
    accepted: dict[int, tuple[int, float]] = {}  # position -> (layer, margin)

    def rel_at(p: int) -> float:
        ours = reference_logits(built, dev, ids[: p + 1], chunk, routes, last_only=True)[0]
        return float(np.linalg.norm(ours - theirs[p]) / np.linalg.norm(theirs[p]))

    for _ in range(3):
        n_before = len(accepted)
        for i, p in enumerate(int(i) for i in np.nonzero(rel > MAX_REL_L2)[0]):
            if p in accepted or (i and rel_at(p) <= MAX_REL_L2):
                continue
            ties = sorted((routes.margin(layer, p, k), layer) for layer in range(n_layer))
            for margin, layer in (t for t in ties if t[0] < MAX_TIE):
                routes.swaps.add((layer, p))
                if rel_at(p) <= MAX_REL_L2:
                    accepted[p] = (layer, margin)
                    break
                routes.swaps.discard((layer, p))
        if len(accepted) == n_before:
            break
        rel = rel_l2(reference_logits(built, dev, ids, chunk, routes), theirs)
        if rel.max() <= MAX_REL_L2:
            break
    return accepted


def check(path: Path, registry, *, n_tokens: int, chunk: int, vocab_hi: int) -> dict:
    pytest.importorskip("llama_cpp")
    ids = [int(i) for i in np.random.default_rng(7).integers(0, vocab_hi, n_tokens)]  # ordinary tokens
    theirs = llama_cpp_logits(path, ids, chunk)
    model = open_gguf(path)
    dev = create_device("reference")
    built = check_supported(model, registry).build(model, dev, registry)
    moe = hasattr(built.config, "n_expert")
    routes = Routes(dev, built.config.n_layer) if moe else None
    ours = reference_logits(built, dev, ids, chunk, routes)
    assert ours.shape == theirs.shape
    rel = rel_l2(ours, theirs)
    figures = {"max_rel_l2": float(rel.max()), "mean_rel_l2": float(rel.mean()),
               "top1": float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))}
    if moe and rel.max() > MAX_REL_L2:
        swaps = explain_by_routing_ties(built, dev, routes, ids, chunk, theirs, rel)
        figures["routing_ties"] = {p: f"layer {la}, margin {m:.4f}" for p, (la, m) in swaps.items()}
        rel = rel_l2(reference_logits(built, dev, ids, chunk, routes), theirs)  # with llama.cpp's choices
        figures["max_rel_l2_with_ties_swapped"] = float(rel.max())
        figures["exchanged_share_of_routing_decisions"] = len(swaps) / (n_tokens * built.config.n_layer)
        assert figures["exchanged_share_of_routing_decisions"] <= MAX_EXPLAINED, figures
    print(f"{path.name}: {figures}")
    over = np.nonzero(rel > MAX_REL_L2)[0]
    assert over.size == 0, f"positions over {MAX_REL_L2:.0%}: {over.tolist()} ({rel[over]}); {figures}"
    assert figures["top1"] >= MIN_TOP1, figures
    return figures


@pytest.mark.parametrize("seed,layers,chunk", [(0, 2, 160), (1, 3, 40), (2, 4, 160)])
def test_gpt_oss_matches_llama_cpp(tmp_path: Path, registry, seed: int, layers: int, chunk: int):
    # 160 tokens > the window of 128; chunk 40: both sides evaluate in steps of 40 tokens, so the SWA
    # layers read earlier keys from their caches (our ring buffer of 128; llama.cpp's SWA cache)
    path = tmp_path / f"gpt-oss-s{seed}-l{layers}.gguf"
    synthesize("gpt-oss", path, size="tiny", layers=layers, seed=seed, registry=registry)
    check(path, registry, n_tokens=160, chunk=chunk, vocab_hi=199_998)


@pytest.mark.parametrize("case", ["clamp", "gate_up_types_differ"])
def test_gpt_oss_builder_cases_match_llama_cpp(tmp_path: Path, registry, case: str):
    """Two features the synthetic recipe does not reach, on gpt_tiny_gguf files (one SWA layer with
    window 8 < 48 tokens, F32 attention):

    - clamp: random 1/sqrt(fan-in) experts never reach swiglu_oai's clamp (|x| = 7); gate/up outputs
      of RMS ~8 put about 24% of the gates and 49% of the ups beyond it. In this regime llama.cpp's
      Q8_0 activations cost more than 2% per layer (measured 2-5% with three layers), hence one
      layer; a wrong clamp costs far more (no clamp: 69% mean error; limit 6 instead of 7: 14%).
    - gate_up_types_differ: MXFP4 gate and F16 up experts, fused at load through F16.
    """
    T = GGMLQuantizationType
    kw = {"expert_gain": 8.0} if case == "clamp" else {"up_exps_type": T.F16}
    path = write_gpt_oss(tmp_path / f"gpt-oss-{case}.gguf", seed=5, n_layer=1, attn_type=T.F32, **kw)
    check(path, registry, n_tokens=48, chunk=48, vocab_hi=382)


@pytest.mark.parametrize("seed,layers,tied", [(0, 2, True), (1, 3, False), (2, 4, True)])
def test_gpt2_matches_llama_cpp(tmp_path: Path, registry, seed: int, layers: int, tied: bool):
    path = tmp_path / f"gpt2-s{seed}-l{layers}.gguf"
    synthesize("gpt2", path, size="tiny", layers=layers, seed=seed, tied=tied, registry=registry)
    check(path, registry, n_tokens=64, chunk=64, vocab_hi=50_256)
