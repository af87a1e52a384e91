// orcd-worker core kernels: normalization, RoPE, element-wise ops, KV-cache writes, attention, argmax,
// decode-step bookkeeping, sampling.
//
// Every kernel that runs during a decode step reads positions and lengths from device memory, so a
// whole step can be captured once as a CUDA graph and replayed. Activations are float32; the KV cache
// is fp16. Launch geometry is chosen by the Python launchers in backends/cuda/ (device.py; sampler.py
// for sampling, graph.py for advance_rows) and validated by kernels.py's launch().
//
// One file per op family (as ggml-cuda): this file only gathers them into one module.
#include "common.cuh"
#include "norm.cuh"
#include "rope.cuh"
#include "eltwise.cuh"
#include "kv.cuh"
#include "attention.cuh"
#include "sampling.cuh"
#include "step.cuh"
