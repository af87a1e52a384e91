"""The numbers that the CUDA sources and their Python launchers (backends/cuda/) share: one table.

Every upper-case int of this module is passed to every compile of a source as `-DNAME=value`
(`define_options()`: NVRTC in backends/cuda/kernels.py, nvcc in core/tests/kernels/test_compile.py).
No source defines one, and `common.cuh` stops a compile that lacks one with `#error`; the launchers
import them from here. core/tests/kernels/test_constants.py checks that the table, the sources'
uses and that `#error` check name the same constants. Nothing here imports CuPy.
"""

from __future__ import annotations

# ---- quant_kernels.cuh: the dequantizing GEMVs every tensor format instantiates ----------------------
GEMV_MAX_T = 8  # rows of the decode GEMVs (gemv_t4_* up to 4, gemv_t8_* up to 8: a batched decode step's
#                rows) at most; more go through dequantize + GEMM
GEMV_WARPS = 4  # warps per GEMV block
GEMV_MAX_R = 4  # rows per warp at most (the launcher's rows_per_warp)
GEMV_TC_WARPS = 8  # warps per block of the tensor-core decode GEMV (gemv_tc_*): 16 rows each, K split over
#                   1, 2, 4 or 8 of them (the launcher's k_split)
XS_MAX_BYTES = 32768  # dynamic shared memory for the staged activations of one GEMV block at most
XS_TC_MAX_BYTES = 163840  # the same for the tensor-core GEMV (its launcher raises the kernel's limit): 8 rows of
#                          K = 5120 staged whole (a chunk of K costs the block one more round trip)
XS_CHUNK_ALIGN = 1024  # a chunk of K staged when all of it does not fit is a multiple of this many elements:
#                       whole k-quant blocks (256), and 128-element slabs for each of GEMV_TC_WARPS warps
GEMV_X_PLAIN = 0  # the one-token GEMV's input modes: x as given,
GEMV_X_RMS = 1  # rms_norm(x) * aux,
GEMV_X_SILU = 2  # silu(x) * aux
Q8_GROUP = 32  # elements per scale of an int8-quantized activation row (q8.cuh; fixed: the formats' blocks are
#               multiples of it, and 8 lanes of float4s quantize one group)
Q8_META_BYTES = 16  # bytes after the K int8 of a quantized row per group: float4 {d, sum of the first 16, of
#                    the second 16, of all 32} (q8.cuh); a row is K + K / Q8_GROUP * Q8_META_BYTES bytes
Q8_WARPS = 8  # warps per block of the int8-activation GEMVs (gemv_q8_*)
Q8_T8_ROWS = 2  # weight rows a warp of gemv_q8_t8_* takes together: each token's x read once from shared
#               memory for both (F::dot_q8<NT, NR>); the one-token kernel takes one
Q8_QUANT_THREADS = 256  # threads per block of quantize_q8 without the RMS norm (4 elements each; the RMS mode
#                        takes one block per row of up to 1024 threads)

# ---- core.cu: attention ----------------------------------------------------------------------------
AP_MAXD = 128  # head dim at most (the attention kernels' shared-memory rows)
AP_TC_QT = 64  # queries per block of the tensor-core prefill attention (attn_prefill_tc_*: 4 warps of 16)
AP_TC_KT = 64  # keys per tile of attn_prefill_tc_* (staged twice over: the next tile loads during this one)
AP_TC_PAD = 8  # halves after each shared row of attn_prefill_tc_* (rows hd + 8 halves apart: an ldmatrix's
#               8 rows in distinct banks); its dynamic shared memory is (QT + 4 KT) (hd + PAD) halves
AD_CHUNK_MIN = 128  # keys per split of the decode attention at least (a thread per key of its 128)
AD_CHUNK = 256  # keys per split of the decode attention at most
AD_SPLITS = 64  # splits a decode query's keys take at most while its split can double (AD_CHUNK_MIN up to
#                AD_CHUNK keys: the split of a query that sees `span` keys is a function of the span alone)
AD_MAX_SPLITS = 1024  # splits of one head's decode attention at most (the combine's weights in shared
#                      memory): contexts up to AD_CHUNK * AD_MAX_SPLITS = 262,144 positions

# ---- moe_kernels.cuh, moe.cu: mixture of experts ---------------------------------------------------
MOE_WARPS = 4  # output rows (one warp each) per block of the expert GEMVs and the router
MOE_MAX_K = 8  # experts per token at most (the decode down-projection keeps one partial per slot)
MOE_MAX_E_PER_LANE = 8  # experts per lane of moe_topk_softmax: at most 32 times this many experts
MOE_GEMM_BN = 128  # expert rows per block of the grouped prefill GEMM (moe_gemm_*; its block has 2 x this
#                   many threads: one half dequantizes a row each, the other copies the pairs' activations)
MOE_GEMM_BM = 64  # (token, expert) pairs per block of moe_gemm_*: an expert's pairs take ceil(count / this) tiles
MOE_GEMM_SMEM_BYTES = 55296  # moe_gemm_*'s dynamic shared memory: two buffers of BN + BM rows of 64 + 8 halves
MOE_ACT_SILU = 0  # the expert GLU: silu(g) * u
MOE_ACT_SWIGLU_OAI = 1  # ggml_swiglu_oai (clamped, with alpha)


def table() -> dict[str, int]:
    """Name -> value of every constant above."""
    return {k: v for k, v in globals().items() if k.isupper() and type(v) is int}


def define_options() -> tuple[str, ...]:
    """The table as compiler options: ("-DAD_CHUNK=256", ...)."""
    return tuple(f"-D{k}={v}" for k, v in sorted(table().items()))
