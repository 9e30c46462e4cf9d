// loss.cu: small loss reductions used by the graph runtime's loss ops.
// Defines: loss_mse_fwd (weighted mean squared error to one scalar, deterministic single-block
// reduction in double) and loss_mse_bwd (its gradient, accumulated into dpred).
#include "common.cuh"

// loss = (1/n) Σ_i w_i (pred_i − target_i)²; weight == nullptr means w_i = 1.
// One block of 1024 threads: a fixed reduction order, so the result is deterministic.
extern "C" __global__ void loss_mse_fwd(const float* __restrict__ pred, const float* __restrict__ target,
                                        const float* __restrict__ weight, int n, float* __restrict__ loss) {
    __shared__ double partial[32];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {  // 64-bit: i + 1024 may pass INT_MAX
        double d = (double)pred[i] - (double)target[i];
        double w = weight ? (double)weight[i] : 1.0;
        acc += w * d * d;
    }
    acc = warp_sum_d(acc);
    int warp = threadIdx.x / DFPO_WARP, lane = threadIdx.x % DFPO_WARP;
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nw = (blockDim.x + DFPO_WARP - 1) / DFPO_WARP;
        double v = lane < nw ? partial[lane] : 0.0;
        v = warp_sum_d(v);
        if (lane == 0) loss[0] = n > 0 ? (float)(v / (double)n) : 0.0f;
    }
}

// dpred_i += dloss · 2 w_i (pred_i − target_i) / n, with dloss read from device memory.
extern "C" __global__ void loss_mse_bwd(const float* __restrict__ pred, const float* __restrict__ target,
                                        const float* __restrict__ weight, int n, const float* __restrict__ dloss,
                                        float* __restrict__ dpred) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float w = weight ? weight[i] : 1.0f;
    dpred[i] += dloss[0] * 2.0f * w * (pred[i] - target[i]) / (float)n;
}
