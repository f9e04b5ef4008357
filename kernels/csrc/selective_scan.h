// Shared between the host code (selective_scan.cpp) and the kernels (selective_scan.cuh, one .cu per dtype).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mmfm_selective_scan {

constexpr int kMaxState = 256;

struct Params {
  int batch, dim, dstate, seqlen, group_size;
  int save_chunk, n_saved;  // states saved for the backward: at every multiple of save_chunk steps
  bool softplus;
  bool batch_fast;  // grid (batch, D / rows) instead of (D / rows, batch): see block_d / block_b
  const void *u, *delta, *z, *B, *C, *dout;
  const float *A, *D, *delta_bias, *h0, *dhlast;
  void *out, *du, *ddelta, *dz;
  float *hlast, *hsave, *dA, *dB, *dC, *dD, *ddelta_bias, *dh0;
  int64_t u_sb, u_sd, delta_sb, delta_sd, z_sb, z_sd, out_sb, out_sd, dout_sb, dout_sd;
  int64_t B_sb, B_sg, B_sn, C_sb, C_sg, C_sn;  // dB / dC are contiguous (batch, G, N, L)
};

// Launch the forward / backward for dtype T with `chunk` steps per block pass (256, 512, 1024 or 2048;
// the backward's is p.save_chunk, the forward's may differ); `variant` 0 is the default configuration for the chunk, others are benchmark alternatives (bf16
// only). Returns false for a variant that does not exist for T or has another chunk length.
template <typename T>
bool launch_fwd(const Params& p, int chunk, int variant, cudaStream_t stream);
template <typename T>
bool launch_bwd(const Params& p, int chunk, int variant, cudaStream_t stream);

}  // namespace mmfm_selective_scan
