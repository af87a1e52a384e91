"""Bytes a decode step reads per token, and the GPU's measured copy bandwidth, for the perf report.

    python3 scripts/bytes_per_token.py MODEL [--pos 512] [--tok-s 270.8]

Bytes per token, from the file's tensor table: every weight a decode step reads (all but the token
embedding, of which one row), the mixture's expert stacks at (experts used / experts), and the KV cache
read at position `pos` (full-attention layers: pos + 1 rows; sliding-window layers: the window).
Copy bandwidth: a 4 GiB device-to-device copy (cupy), bytes read + bytes written per second, median of
20 timed with CUDA events. With --tok-s, the effective read bandwidth of that decode rate and its
fraction of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import statistics

from orcd_core.gguf_file import check_supported, open_gguf
from orcd_core.plugins import default_registry
from orcd_core.shape import KV_BYTES_PER_ELEMENT


def bytes_per_token(path, pos: int) -> tuple[int, dict[str, int]]:
    g = open_gguf(path)
    arch = g.architecture
    md = g.metadata
    n_exp = int(md.get(f"{arch}.expert_count", 0) or 0)
    k_used = int(md.get(f"{arch}.expert_used_count", 0) or 0)
    parts = {"dense": 0, "experts": 0, "embedding_row": 0, "kv": 0}
    for t in g.tensors.values():
        if t.name == "token_embd.weight" and "output.weight" in g.tensors:  # else it is also the output head
            parts["embedding_row"] += t.nbytes // int(t.shape[-1] if len(t.shape) > 1 else 1)
        elif "_exps" in t.name and n_exp:
            parts["experts"] += t.nbytes * k_used // n_exp
        else:
            parts["dense"] += t.nbytes
    shape = check_supported(g, default_registry()).config(g).shape()
    for n_kv, w in zip(shape.n_head_kv, shape.kv_windows):
        rows = min(pos + 1, w) if w > 0 else pos + 1
        parts["kv"] += rows * n_kv * (shape.head_dim_k + shape.head_dim_v) * KV_BYTES_PER_ELEMENT  # K and V
    return sum(parts.values()), parts


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> float:
    import cupy

    a = cupy.empty(nbytes, cupy.uint8)
    a.fill(7)
    b = cupy.empty_like(a)
    b[...] = a  # warm-up
    times = []
    for _ in range(reps):
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        e0.record()
        b[...] = a
        e1.record()
        e1.synchronize()
        times.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
    return 2 * nbytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--tok-s", type=float, default=None)
    args = ap.parse_args()
    total, parts = bytes_per_token(args.model, args.pos)
    print(f"bytes per decoded token at position {args.pos}: {total / 1e9:.3f} GB "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts.items()))
    bw = copy_bandwidth()
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"copy bandwidth ({name.decode() if isinstance(name, bytes) else name}): {bw / 1e12:.3f} TB/s (read + write)"
          f"; floor {bw / total:.0f} tok/s")
    if args.tok_s:
        eff = total * args.tok_s
        print(f"at {args.tok_s} tok/s: {eff / 1e12:.3f} TB/s read, {eff / bw:.1%} of the copy bandwidth")


if __name__ == "__main__":
    main()
