// orcd-worker core kernels: decode-loop bookkeeping (part of core.cu, which includes every op family).
#pragma once
#include "common.cuh"

// ================================================================================================
// Decode-loop bookkeeping, run at the end of a captured step so the next replay needs no host copy:
// row b's chosen token becomes its next input id, its position and step index advance by one, and the
// token replaces the oldest id of its repetition window (a ring of windows[b] ids: slot step % W).
// ================================================================================================
extern "C" __global__ void advance_rows(const int* __restrict__ token, int* __restrict__ ids, int* __restrict__ positions,
                                        int* __restrict__ step_index, int* __restrict__ recent, int rs,
                                        const int* __restrict__ windows, int B) {
    pdl_trigger();
    pdl_wait();  // (launched by PDL behind the sampler)
    const int b = threadIdx.x;
    if (b < B) {
        const int t = token[b], W = windows[b];
        ids[b] = t;
        positions[b] += 1;
        if (W > 0) recent[(i64)b * rs + step_index[b] % W] = t;
        step_index[b] += 1;
    }
}
