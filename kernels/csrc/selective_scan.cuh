// Selective scan (Mamba-1 S6) forward and backward for input-dependent (grouped) B and C.
//
// One thread block scans one (batch, channel) row. The sequence is walked in chunks of NT * NI steps;
// thread t of the block owns NI consecutive steps of the chunk. Per state index n the linear recurrence
// h[t] = a[t] h[t-1] + b[t] (a = exp(dt A), b = dt B u) is a scan over pairs (a, b): each thread folds its
// NI pairs, the block scans the NT thread aggregates with warp shuffles (one __syncthreads), and each
// thread replays its steps from its exclusive prefix. The chain that is sequential per thread is NI
// steps long instead of L, which is why this beats one-thread-per-(d, n) loops over time.
//
// The backward walks the chunks in reverse. Per chunk and n it recomputes the states from the state the
// forward saved at the chunk's start, then runs the adjoint as a reverse scan of q[t] = dL/dh[t-1]:
//   g[t] = C[t] dy[t] + q[t+1],   q[t] = a[t] g[t]   ->   pairs (a[t], a[t] C[t] dy[t]) in reverse order.
// B/C gradients are summed over the channels of a group with fp32 atomics (transposed through shared
// memory first so that a warp's atomics hit consecutive addresses).
//
// Layout contract (checked on the host): u, delta, z, dout (batch, D, L), B and C (batch, G, N, L), all
// with stride 1 along L; A (D, N), D and delta_bias (D,), initial/last states (batch, D, N) fp32 contiguous.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "selective_scan.h"

namespace mmfm_selective_scan {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

struct Pair {  // the affine map h -> a * h + b
  float a, b;
};

// `first` applied, then `second`.
__device__ __forceinline__ Pair compose(Pair first, Pair second) {
  return {first.a * second.a, fmaf(second.a, first.b, second.b)};
}

// The block's (channel block, batch) coordinates. With p.batch_fast (the backward's default) the grid is
// (batch, D / rows), as mamba-ssm's, so that co-resident blocks (consecutive block indices) belong to
// different batch rows: the backward's dB / dC atomics spread over `batch` times more addresses instead
// of all SMs adding into one batch row's.
__device__ __forceinline__ int block_d(const Params& p) { return p.batch_fast ? blockIdx.y : blockIdx.x; }
__device__ __forceinline__ int block_b(const Params& p) { return p.batch_fast ? blockIdx.x : blockIdx.y; }
inline dim3 grid_of(const Params& p, int rows) {
  return p.batch_fast ? dim3(p.batch, p.dim / rows) : dim3(p.dim / rows, p.batch);
}

// Exclusive scan over the block's threads in thread order (REV: reverse thread order). `warp_tot` is
// NT / 32 Pairs of shared memory; callers alternate two buffers so one barrier per scan suffices.
// With several rows per block (threads [r * NT, (r + 1) * NT) scan row r) every row passes the barrier.
template <int NT, bool REV>
__device__ __forceinline__ Pair block_exclusive_scan(Pair v, Pair* warp_tot) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31;
  const int warp = (threadIdx.x % NT) >> 5;
  Pair inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float pa = REV ? __shfl_down_sync(kFull, inc.a, off) : __shfl_up_sync(kFull, inc.a, off);
    const float pb = REV ? __shfl_down_sync(kFull, inc.b, off) : __shfl_up_sync(kFull, inc.b, off);
    // lanes without a partner compose with the identity: selects instead of a predicated update (fewer moves)
    const bool has = REV ? lane + off < 32 : lane >= off;
    inc = compose({has ? pa : 1.f, has ? pb : 0.f}, inc);
  }
  const float ea = REV ? __shfl_down_sync(kFull, inc.a, 1) : __shfl_up_sync(kFull, inc.a, 1);
  const float eb = REV ? __shfl_down_sync(kFull, inc.b, 1) : __shfl_up_sync(kFull, inc.b, 1);
  Pair ex = (REV ? lane == 31 : lane == 0) ? Pair{1.f, 0.f} : Pair{ea, eb};
  if (NW == 1) {
    __syncwarp();  // orders the callers' shared-memory traffic around the scan, as the barrier below does
    return ex;
  }
  if (lane == (REV ? 0 : 31)) warp_tot[warp] = inc;
  __syncthreads();
  Pair before = {1.f, 0.f};
#pragma unroll
  for (int k = 0; k < NW; ++k) {
    const int w = REV ? NW - 1 - k : k;
    if (REV ? w > warp : w < warp) before = compose(before, warp_tot[w]);
  }
  return compose(before, ex);
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// Loads this thread's NI consecutive items (zeros past `valid`); 16-byte vector loads when possible.
template <typename T, int NI>
__device__ __forceinline__ void load_items(const T* __restrict__ p, int valid, float (&v)[NI]) {
  constexpr bool kVec = (NI * sizeof(T)) % 16 == 0;
  if (kVec && valid >= NI && (reinterpret_cast<std::uintptr_t>(p) & 15) == 0) {
    alignas(16) T tmp[NI];
#pragma unroll
    for (int k = 0; k < int(NI * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(tmp)[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
#pragma unroll
    for (int i = 0; i < NI; ++i) v[i] = to_float(tmp[i]);
  } else {
#pragma unroll
    for (int i = 0; i < NI; ++i) v[i] = i < valid ? to_float(p[i]) : 0.f;
  }
}

// As load_items, but keeps the items in T (two bf16 / fp16 per register): the forward holds B and C of a
// state this way, which frees the registers that fp32 copies took (the 2048-step forward spilled).
// VEC8: also 8-byte vector loads (the 4-row forward's staging slices of 4 bf16 / fp16; off elsewhere, where
// the extra branch made the 256-step forward 7% slower at MambaVision's shape on an H100).
template <typename T, int NI, bool VEC8 = false>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, int valid, T (&v)[NI]) {
  constexpr bool kVec = (NI * sizeof(T)) % 16 == 0;
  constexpr bool kVec8 = VEC8 && NI * sizeof(T) == 8;
  if (kVec && valid >= NI && (reinterpret_cast<std::uintptr_t>(p) & 15) == 0) {
#pragma unroll
    for (int k = 0; k < int(NI * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(v)[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
  } else if (kVec8 && valid >= NI && (reinterpret_cast<std::uintptr_t>(p) & 7) == 0) {
    *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(p));
  } else {
#pragma unroll
    for (int i = 0; i < NI; ++i) v[i] = i < valid ? p[i] : T(0.f);
  }
}

// Item i of load_raw's array as float. bf16 pairs share a 32-bit word: the high item is the word with its
// low half masked off, one instruction instead of an extract and a shift.
template <typename T, int NI>
__device__ __forceinline__ float raw_item(const T (&v)[NI], int i) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && NI % 2 == 0) {
    const uint32_t w = reinterpret_cast<const uint32_t*>(v)[i / 2];
    return __uint_as_float(i % 2 ? (w & 0xffff0000u) : (w << 16));
  } else {
    return to_float(v[i]);
  }
}

template <typename T, int NI>
__device__ __forceinline__ void store_items(T* __restrict__ p, int valid, const float (&v)[NI]) {
  constexpr bool kVec = (NI * sizeof(T)) % 16 == 0;
  if (kVec && valid >= NI && (reinterpret_cast<std::uintptr_t>(p) & 15) == 0) {
    alignas(16) T tmp[NI];
#pragma unroll
    for (int i = 0; i < NI; ++i) tmp[i] = static_cast<T>(v[i]);
#pragma unroll
    for (int k = 0; k < int(NI * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(tmp)[k];
  } else {
#pragma unroll
    for (int i = 0; i < NI; ++i)
      if (i < valid) p[i] = static_cast<T>(v[i]);
  }
}

// NI consecutive items from shared memory (16-byte aligned when NI items fill whole vectors).
template <typename T, int NI>
__device__ __forceinline__ void load_shared(const T* p, float (&v)[NI]) {
  if constexpr ((NI * sizeof(T)) % 16 == 0) {
    alignas(16) T tmp[NI];
#pragma unroll
    for (int k = 0; k < int(NI * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(tmp)[k] = reinterpret_cast<const uint4*>(p)[k];
#pragma unroll
    for (int i = 0; i < NI; ++i) v[i] = raw_item<T, NI>(tmp, i);
  } else {
#pragma unroll
    for (int i = 0; i < NI; ++i) v[i] = to_float(p[i]);
  }
}

__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }


// PQ: each thread keeps its steps' inclusive prefix maps (P[i], Q[i]) from the fold, so that after the
// scan h[i] = P[i] h_in + Q[i] are independent FMAs instead of a second dependent chain of NI steps.
// MINB > 0 asks the compiler for at least MINB resident blocks per SM (a register cap).
template <int NT, int NI, bool PQ, int MINB, typename T>
__global__ void __launch_bounds__(NT, MINB) selective_scan_fwd_kernel(Params p) {
  constexpr int CHUNK = NT * NI;
  __shared__ Pair warp_tot[2][NT / 32];
  __shared__ float h_run[2][kMaxState];
  const int d = block_d(p), b = block_b(p), tid = threadIdx.x, N = p.dstate;
  const int g = d / p.group_size;
  const T* u = static_cast<const T*>(p.u) + b * p.u_sb + d * p.u_sd;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_sb + d * p.delta_sd;
  const T* Bp = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg;
  const T* Cp = static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg;
  const float* A = p.A + int64_t(d) * N;
  const float Dskip = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int64_t row_state = (int64_t(b) * p.dim + d) * N;
  for (int n = tid; n < N; n += NT) h_run[0][n] = p.h0 ? p.h0[row_state + n] : 0.f;
  __syncthreads();
  int scans = 0;
  const int n_chunks = (p.seqlen + CHUNK - 1) / CHUNK;
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * CHUNK + tid * NI;
    const int valid = min(NI, p.seqlen - t0);
    // the backward's chunk length (save_chunk) need not be this kernel's: whichever thread ends on a
    // multiple of it saves the state there
    const int t_end = t0 + NI;
    const bool saves = p.hsave && t_end % p.save_chunk == 0 && t_end < p.seqlen;
    float* hsave = saves ? p.hsave + row_state * p.n_saved + int64_t(t_end / p.save_chunk - 1) * N : nullptr;
    float uv[NI], dt[NI], acc[NI];
    load_items<T, NI>(u + t0, valid, uv);
    load_items<T, NI>(delta + t0, valid, dt);
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const float x = dt[i] + bias;
      dt[i] = i < valid ? (p.softplus ? softplus(x) : x) : 0.f;
      acc[i] = Dskip * uv[i];
      uv[i] *= dt[i];  // dt * u from here on
    }
    // B and C stay in T until used (alignas: vector loads); the row pointers step by one state per pass
    alignas(16) T Bv[NI];
    alignas(16) T Cv[NI];
    const T* Bn = Bp + t0;
    const T* Cn = Cp + t0;
    load_raw<T, NI>(Bn, valid, Bv);
    for (int n = 0; n < N; ++n) {
      load_raw<T, NI>(Cn, valid, Cv);  // needed after the scan: issued first
      Cn += p.C_sn;
      const float A2 = A[n] * kLog2e;
      float a[NI], bb[NI];  // PQ: the inclusive prefix maps P, Q of this thread's steps
      Pair agg;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const float ai = exp2f(dt[i] * A2);  // dt = 0 past the end: the identity step
        const float bi = uv[i] * raw_item<T, NI>(Bv, i);
        agg = i == 0 ? Pair{ai, bi} : compose(agg, {ai, bi});
        a[i] = PQ ? agg.a : ai;
        bb[i] = PQ ? agg.b : bi;
      }
      Bn += p.B_sn;
      if (n + 1 < N) load_raw<T, NI>(Bn, valid, Bv);  // next state's B, early
      const Pair ex = block_exclusive_scan<NT, false>(agg, warp_tot[scans++ & 1]);
      const float h_in = h_run[c & 1][n];
      float h = fmaf(ex.a, h_in, ex.b);
      const float h0 = h;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        h = PQ ? fmaf(a[i], h0, bb[i]) : fmaf(a[i], h, bb[i]);
        acc[i] = fmaf(raw_item<T, NI>(Cv, i), h, acc[i]);
      }
      if (saves) hsave[n] = h;
      if (tid == NT - 1) {  // the last thread's state is the chunk's end state
        h_run[(c + 1) & 1][n] = h;
        if (c == n_chunks - 1) p.hlast[row_state + n] = h;
      }
    }
    if (p.z) {
      float zv[NI];
      load_items<T, NI>(static_cast<const T*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, zv);
#pragma unroll
      for (int i = 0; i < NI; ++i) acc[i] *= zv[i] * sigmoid(zv[i]);
    }
    store_items<T, NI>(static_cast<T*>(p.out) + b * p.out_sb + d * p.out_sd + t0, valid, acc);
    __syncthreads();  // h_run of this chunk is read before the next chunk overwrites the other buffer
  }
}

// Forward with R rows (channels of one group) per block that share the B / C loads: per state the
// block stages the chunk's B and C in shared memory once (each thread loads NI / R items of each), and
// every row reads them from there, R times fewer L2 reads than one row per block. The default 512-step
// forward when 4 divides the group size (R = 4: 11% faster at B1 D4096 L16384 on an H100), and sweep
// variants 12-14; same math as selective_scan_fwd_kernel with PQ.
template <int NT, int NI, int R, int MINB, typename T>
__global__ void __launch_bounds__(NT * R, MINB) selective_scan_fwd_rows_kernel(Params p) {
  constexpr int CHUNK = NT * NI;
  constexpr int SLICE = NI / R;                  // B (and C) items each thread stages per state
  constexpr int PAD = 16 / sizeof(T);            // one 16-byte pad per 4 threads' NI items: conflict-free reads
  constexpr int SMEM_ROW = CHUNK + (NT / 4) * PAD;
  static_assert(NI % R == 0, "each thread stages NI / R items");
  __shared__ Pair warp_tot_all[R][2][NT / 32];
  __shared__ float h_run_all[R][2][kMaxState];
  __shared__ alignas(16) unsigned char bc_bytes[2 * 2 * SMEM_ROW * sizeof(T)];  // [buffer][B, C][padded chunk]
  T* bc = reinterpret_cast<T*>(bc_bytes);
  const int row = threadIdx.x / NT, tid = threadIdx.x % NT, N = p.dstate;
  auto& warp_tot = warp_tot_all[row];
  auto& h_run = h_run_all[row];
  const int d = block_d(p) * R + row, b = block_b(p);
  const int g = d / p.group_size;  // the same for every row (the host checks R divides the group size)
  const T* u = static_cast<const T*>(p.u) + b * p.u_sb + d * p.u_sd;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_sb + d * p.delta_sd;
  const T* Bp = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg;
  const T* Cp = static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg;
  const float* A = p.A + int64_t(d) * N;
  const float Dskip = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int64_t row_state = (int64_t(b) * p.dim + d) * N;
  for (int n = tid; n < N; n += NT) h_run[0][n] = p.h0 ? p.h0[row_state + n] : 0.f;
  // staging: block thread j loads items [j * SLICE, (j + 1) * SLICE) of the chunk; the item of thread t's
  // step i sits at t * NI + i + (t / 4) * PAD
  const int j0 = threadIdx.x * SLICE;
  const int stage_at = j0 + (j0 / NI / 4) * PAD;
  const int read_at = tid * NI + (tid / 4) * PAD;
  // B and C are copied as T, not through float; one 8-byte (bf16 / fp16) or 16-byte (fp32) store each: the
  // slice's place is that aligned (j0 * sizeof(T) is a multiple of it, PAD is 16 bytes)
  using Slice = std::conditional_t<SLICE * sizeof(T) == 16, uint4, uint2>;
  static_assert(SLICE * sizeof(T) == sizeof(Slice), "a staging slice is one 8- or 16-byte word");
  auto stage = [&](int buf, int n, int c) {
    const int t_first = c * CHUNK + j0;
    const int v = min(SLICE, p.seqlen - t_first);
    alignas(16) T bs[SLICE];
    alignas(16) T cs[SLICE];
    load_raw<T, SLICE, true>(Bp + n * p.B_sn + t_first, v, bs);
    load_raw<T, SLICE, true>(Cp + n * p.C_sn + t_first, v, cs);
    *reinterpret_cast<Slice*>(bc + (buf * 2) * SMEM_ROW + stage_at) = *reinterpret_cast<const Slice*>(bs);
    *reinterpret_cast<Slice*>(bc + (buf * 2 + 1) * SMEM_ROW + stage_at) = *reinterpret_cast<const Slice*>(cs);
  };
  int scans = 0, sbuf = 0;
  const int n_chunks = (p.seqlen + CHUNK - 1) / CHUNK;
  for (int c = 0; c < n_chunks; ++c) {
    const int t0 = c * CHUNK + tid * NI;
    const int valid = max(0, min(NI, p.seqlen - t0));
    const int t_end = t0 + NI;
    const bool saves = p.hsave && t_end % p.save_chunk == 0 && t_end < p.seqlen;
    float* hsave = saves ? p.hsave + row_state * p.n_saved + int64_t(t_end / p.save_chunk - 1) * N : nullptr;
    float uv[NI], dt[NI], acc[NI];
    load_items<T, NI>(u + t0, valid, uv);
    load_items<T, NI>(delta + t0, valid, dt);
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const float x = dt[i] + bias;
      dt[i] = i < valid ? (p.softplus ? softplus(x) : x) : 0.f;
      acc[i] = Dskip * uv[i];
      uv[i] *= dt[i];
    }
    stage(sbuf, 0, c);
    __syncthreads();
    for (int n = 0; n < N; ++n) {
      float Bv[NI];
      load_shared<T, NI>(bc + (sbuf * 2) * SMEM_ROW + read_at, Bv);
      const float A2 = A[n] * kLog2e;
      float a[NI], bb[NI];
      Pair agg = {1.f, 0.f};
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        agg = compose(agg, {exp2f(dt[i] * A2), uv[i] * Bv[i]});
        a[i] = agg.a;
        bb[i] = agg.b;
      }
      // the next state's B / C go to the other buffer, whose readers (state n - 1) are past the barrier
      // at the end of the previous state
      if (n + 1 < N) stage(sbuf ^ 1, n + 1, c);
      const Pair ex = block_exclusive_scan<NT, false>(agg, warp_tot[scans++ & 1]);
      float Cv[NI];
      load_shared<T, NI>(bc + (sbuf * 2 + 1) * SMEM_ROW + read_at, Cv);
      const float h0 = fmaf(ex.a, h_run[c & 1][n], ex.b);
      float h = h0;
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        h = fmaf(a[i], h0, bb[i]);
        acc[i] = fmaf(Cv[i], h, acc[i]);
      }
      if (saves) hsave[n] = h;
      if (tid == NT - 1) {
        h_run[(c + 1) & 1][n] = h;
        if (c == n_chunks - 1) p.hlast[row_state + n] = h;
      }
      sbuf ^= 1;
      __syncthreads();  // staged buffer complete before it is read; this one's reads done before it is refilled
    }
    if (p.z) {
      float zv[NI];
      load_items<T, NI>(static_cast<const T*>(p.z) + b * p.z_sb + d * p.z_sd + t0, valid, zv);
#pragma unroll
      for (int i = 0; i < NI; ++i) acc[i] *= zv[i] * sigmoid(zv[i]);
    }
    store_items<T, NI>(static_cast<T*>(p.out) + b * p.out_sb + d * p.out_sd + t0, valid, acc);
  }
}

// Sum over the NT threads of one row; `red` holds NT / 32 floats per row, indexed by the warp within
// the row (with several rows per block, a block-wide warp index would write into the next row's slots).
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[(threadIdx.x % NT) >> 5] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) s += red[w];
  return s;
}

// R rows (channels of one group) per block: their B/C gradients are summed in shared memory before
// the global atomics, R times fewer of them (the host uses R > 1 only when R divides the group size).
template <int NT, int NI, int R, int MINB, typename T>
__global__ void __launch_bounds__(NT * R, MINB) selective_scan_bwd_kernel(Params p) {
  constexpr int CHUNK = NT * NI;
  constexpr int PAD = NI + 1;  // conflict-free transposes through `exch`
  static_assert(NI % R == 0, "each thread sums NI / R steps of the rows' B/C gradients");
  __shared__ Pair warp_tot_all[R][2][NT / 32];
  __shared__ float q_run_all[R][2][kMaxState];
  __shared__ float dA_acc_all[R][kMaxState];
  __shared__ float exch[R][2][NT * PAD];
  __shared__ float red_all[R][NT / 32];
  const int row = threadIdx.x / NT;
  auto& warp_tot = warp_tot_all[row];
  auto& q_run = q_run_all[row];
  auto& dA_acc = dA_acc_all[row];
  float* red = red_all[row];
  const int d = block_d(p) * R + row, b = block_b(p), tid = threadIdx.x % NT, N = p.dstate;
  const int g = d / p.group_size;
  // du / ddelta / dz are allocated like u and dout is contiguous too (both checked on the host)
  const int64_t u_off = b * p.u_sb + d * p.u_sd;
  const T* u = static_cast<const T*>(p.u) + u_off;
  const T* delta = static_cast<const T*>(p.delta) + b * p.delta_sb + d * p.delta_sd;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_sb + d * p.dout_sd;
  const T* Bp = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg;
  const T* Cp = static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg;
  const int groups = p.dim / p.group_size;
  float* dBp_block = p.dB + (int64_t(b) * groups + g) * N * p.seqlen;  // all rows share the group
  float* dCp_block = p.dC + (int64_t(b) * groups + g) * N * p.seqlen;
  const float* A = p.A + int64_t(d) * N;
  const float Dskip = p.D ? p.D[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int64_t row_state = (int64_t(b) * p.dim + d) * N;
  const int n_chunks = (p.seqlen + CHUNK - 1) / CHUNK;  // == p.n_saved: the forward saved at this chunk
  for (int n = tid; n < N; n += NT) {
    q_run[(n_chunks - 1) & 1][n] = p.dhlast ? p.dhlast[row_state + n] : 0.f;
    dA_acc[n] = 0.f;
  }
  __syncthreads();
  float dD_part = 0.f, dbias_part = 0.f;
  int scans = 0;
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int t0 = c * CHUNK + tid * NI;
    const int valid = min(NI, p.seqlen - t0);
    // z and the softplus derivative are reloaded after the state loop instead of held across it:
    // registers, not bandwidth, limit how many blocks run at once
    const T* zrow = p.z ? static_cast<const T*>(p.z) + b * p.z_sb + d * p.z_sd + t0 : nullptr;
    float uv[NI], dt[NI], dy[NI], y[NI], du[NI], ddt[NI];
    load_items<T, NI>(u + t0, valid, uv);
    load_items<T, NI>(delta + t0, valid, dt);
    load_items<T, NI>(dout + t0, valid, dy);
    if (p.z) {
      float zv[NI];
      load_items<T, NI>(zrow, valid, zv);
#pragma unroll
      for (int i = 0; i < NI; ++i) dy[i] *= zv[i] * sigmoid(zv[i]);  // dL/dy, y before the gate
    }
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const float x = dt[i] + bias;
      dt[i] = i < valid ? (p.softplus ? softplus(x) : x) : 0.f;
      y[i] = Dskip * uv[i];
      du[i] = Dskip * dy[i];
      ddt[i] = 0.f;
      dD_part = fmaf(dy[i], uv[i], dD_part);
    }
    const float* h_start = c == 0 ? p.h0 : p.hsave + row_state * p.n_saved + int64_t(c - 1) * N;
    float Bv[NI], Cv[NI];
    load_items<T, NI>(Bp + t0, valid, Bv);
    load_items<T, NI>(Cp + t0, valid, Cv);
    for (int n = 0; n < N; ++n) {
      const float Av = A[n], A2 = Av * kLog2e;
      float a[NI], hp[NI];
      Pair agg = {1.f, 0.f};
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        a[i] = exp2f(dt[i] * A2);
        agg = compose(agg, {a[i], dt[i] * uv[i] * Bv[i]});
      }
      const Pair ex = block_exclusive_scan<NT, false>(agg, warp_tot[scans++ & 1]);
      float h = fmaf(ex.a, h_start ? h_start[(c == 0 ? row_state : 0) + n] : 0.f, ex.b);
      float* ex_dB = exch[row][0] + tid * PAD;
      float* ex_dC = exch[row][1] + tid * PAD;
      Pair ragg = {1.f, 0.f};
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        hp[i] = h;
        h = fmaf(a[i], h, dt[i] * uv[i] * Bv[i]);
        y[i] = fmaf(Cv[i], h, y[i]);
        ex_dC[i] = dy[i] * h;
      }
#pragma unroll
      for (int i = NI - 1; i >= 0; --i) ragg = compose(ragg, {a[i], a[i] * Cv[i] * dy[i]});
      const Pair rex = block_exclusive_scan<NT, true>(ragg, warp_tot[scans++ & 1]);
      float q = fmaf(rex.a, q_run[c & 1][n], rex.b);  // q at the step after this thread's last one
      float dA_part = 0.f;
#pragma unroll
      for (int i = NI - 1; i >= 0; --i) {
        const float gr = fmaf(Cv[i], dy[i], q);  // dL/dh[t]
        const float qi = a[i] * gr;              // dL/dh[t-1]
        ex_dB[i] = gr * dt[i] * uv[i];
        du[i] = fmaf(gr * dt[i], Bv[i], du[i]);
        ddt[i] = fmaf(gr, Bv[i] * uv[i], fmaf(qi * Av, hp[i], ddt[i]));
        dA_part = fmaf(dt[i] * hp[i], qi, dA_part);
        q = qi;
      }
      if (tid == 0) {
        if (c > 0) q_run[(c - 1) & 1][n] = q;
        else if (p.dh0) p.dh0[row_state + n] = q;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dA_part += __shfl_xor_sync(kFull, dA_part, off);
      if ((tid & 31) == 0) atomicAdd(&dA_acc[n], dA_part);
      if (n + 1 < N) {  // next state's B and C, issued before this state's atomics
        load_items<T, NI>(Bp + (n + 1) * p.B_sn + t0, valid, Bv);
        load_items<T, NI>(Cp + (n + 1) * p.C_sn + t0, valid, Cv);
      }
      __syncthreads();
      const int64_t base = int64_t(n) * p.seqlen + int64_t(c) * CHUNK;
#pragma unroll
      for (int i = 0; i < NI / R; ++i) {
        const int j = i * NT * R + threadIdx.x;  // chunk-local step: consecutive threads, consecutive addresses
        if (c * CHUNK + j < p.seqlen) {
          const int k = (j / NI) * PAD + j % NI;
          float sb = 0.f, sc = 0.f;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            sb += exch[r][0][k];
            sc += exch[r][1][k];
          }
          atomicAdd(dBp_block + base + j, sb);
          atomicAdd(dCp_block + base + j, sc);
        }
      }
    }
    if (p.z) {
      float zv[NI], go[NI];
      load_items<T, NI>(zrow, valid, zv);
      load_items<T, NI>(dout + t0, valid, go);
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const float s = sigmoid(zv[i]);
        zv[i] = go[i] * y[i] * s * (1.f + zv[i] * (1.f - s));  // dz
      }
      store_items<T, NI>(static_cast<T*>(p.dz) + u_off + t0, valid, zv);
    }
    float dd[NI];  // dL/d delta = dL/d dt * d softplus / d (delta + bias)
    load_items<T, NI>(delta + t0, valid, dd);
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      dd[i] = i < valid ? ddt[i] * (p.softplus ? sigmoid(dd[i] + bias) : 1.f) : 0.f;
      dbias_part += dd[i];
    }
    store_items<T, NI>(static_cast<T*>(p.du) + u_off + t0, valid, du);
    store_items<T, NI>(static_cast<T*>(p.ddelta) + u_off + t0, valid, dd);
    __syncthreads();
  }
  for (int n = tid; n < N; n += NT) atomicAdd(p.dA + int64_t(d) * N + n, dA_acc[n]);
  const float dD_sum = block_sum<NT>(dD_part, red);
  const float dbias_sum = block_sum<NT>(dbias_part, red);
  if (tid == 0) {
    if (p.dD) atomicAdd(p.dD + d, dD_sum);
    if (p.ddelta_bias) atomicAdd(p.ddelta_bias + d, dbias_sum);
  }
}

// Launch configurations: NT threads x NI steps per block pass (chunk = NT * NI). The forward and the
// backward of one call use the same chunk length, not necessarily the same NT / NI.
#define MMFM_LAUNCH_FWD(NT, NI, PQ, MINB) \
  selective_scan_fwd_kernel<NT, NI, PQ, MINB, T><<<grid_of(p, 1), NT, 0, stream>>>(p)
#define MMFM_LAUNCH_FWD_ROWS(NT, NI, R, MINB)                                          \
  selective_scan_fwd_rows_kernel<NT, NI, R, MINB, T><<<grid_of(p, R), (NT) * (R), 0, stream>>>(p)
#define MMFM_LAUNCH_BWD(NT, NI, R, MINB) \
  selective_scan_bwd_kernel<NT, NI, R, MINB, T><<<grid_of(p, R), (NT) * (R), 0, stream>>>(p)

// Alternative configurations, bf16 only, for benchmark sweeps (`variant` > 0; VARIANT_CHUNK in
// kernels/selective_scan.py): (NT, NI) of the forward and of the backward, same chunk length.
// Backward variants with R = 2 rows per block run only when 2 divides the group size.
#define MMFM_VARIANTS(X)                          \
  X(1, (128, 16, true, 5), (32, 8, 4, 5))         \
  X(2, (32, 16, true, 20), (32, 8, 4, 6))         \
  X(3, (64, 4, true, 16), (32, 8, 8, 2))          \
  X(4, (64, 8, true, 12), (32, 16, 4, 4))         \
  X(5, (32, 16, false, 16), (64, 8, 4, 2))        \
  X(6, (128, 16, true, 4), (32, 8, 4, 3))         \
  X(7, (128, 16, true, 4), (64, 8, 4, 2))         \
  X(8, (128, 16, true, 3), (32, 8, 4, 4))         \
  X(9, (256, 8, true, 2), (32, 8, 4, 4))          \
  X(10, (128, 16, false, 4), (32, 8, 4, 4))       \
  X(11, (32, 16, true, 12), (32, 8, 4, 4))

#define MMFM_UNPACK(...) __VA_ARGS__
#define MMFM_LAUNCH_FWD_I(...) MMFM_LAUNCH_FWD(__VA_ARGS__)
#define MMFM_LAUNCH_BWD_I(...) MMFM_LAUNCH_BWD(__VA_ARGS__)
#define MMFM_CHUNK_OF(NT, NI, ...) ((NT) * (NI))
#define MMFM_ROWS_OF(NT, NI, R, MINB) (R)
#define MMFM_FWD_CASE(K, F, B)                                \
  case K:                                                     \
    if (MMFM_CHUNK_OF F != ch) return false;                  \
    MMFM_LAUNCH_FWD_I(MMFM_UNPACK F);                         \
    return true;
#define MMFM_BWD_CASE(K, F, B)                                \
  case K:                                                     \
    if (MMFM_CHUNK_OF B != ch || p.group_size % MMFM_ROWS_OF B != 0) return false; \
    MMFM_LAUNCH_BWD_I(MMFM_UNPACK B);                                             \
    return true;

// Defaults (H200, bf16 sweeps of scripts/bench_selective_scan.py): registers limit how many blocks
// run at once, so the kernels are capped at 128 registers (MINB); the backward sums the B/C gradients
// of 4 channels per block when the group size allows.
#define MMFM_LAUNCH_BWD_ROWS(NT, NI, MINB4)                                       \
  if (p.group_size % 4 == 0) MMFM_LAUNCH_BWD(NT, NI, 4, MINB4);                 \
  else if (p.group_size % 2 == 0) MMFM_LAUNCH_BWD(NT, NI, 2, 2 * (MINB4));      \
  else MMFM_LAUNCH_BWD(NT, NI, 1, 4 * (MINB4))

template <typename T>
bool launch_fwd(const Params& p, int ch, int variant, cudaStream_t stream) {
  if (variant == 0) {
    if (ch == 256) MMFM_LAUNCH_FWD(64, 4, true, 0);
    else if (ch == 512 && p.group_size % 4 == 0) MMFM_LAUNCH_FWD_ROWS(32, 16, 4, 4);  // rows share B / C
    else if (ch == 512) MMFM_LAUNCH_FWD(32, 16, true, 16);
    else if (ch == 1024) MMFM_LAUNCH_FWD(64, 16, true, 8);
    else MMFM_LAUNCH_FWD(128, 16, true, 4);
    return true;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (variant) { MMFM_VARIANTS(MMFM_FWD_CASE) }
    // rows variants: R channels per block share the staged B / C (R must divide the group size)
    if (variant == 12 && ch == 2048 && p.group_size % 2 == 0) MMFM_LAUNCH_FWD_ROWS(128, 16, 2, 2);
    else if (variant == 13 && ch == 2048 && p.group_size % 4 == 0) MMFM_LAUNCH_FWD_ROWS(128, 16, 4, 1);
    else if (variant == 14 && ch == 512 && p.group_size % 4 == 0) MMFM_LAUNCH_FWD_ROWS(32, 16, 4, 4);
    else if (variant == 15 && ch == 512) MMFM_LAUNCH_FWD(32, 16, true, 16);  // the 512-step default's forward
    else return false;
    return true;
  }
  return false;
}

template <typename T>
bool launch_bwd(const Params& p, int ch, int variant, cudaStream_t stream) {
  if (variant == 0) {
    if (ch == 256) {
      MMFM_LAUNCH_BWD_ROWS(32, 8, 4);
    } else if (ch == 512) {
      MMFM_LAUNCH_BWD(64, 8, 1, 0);
    } else if (ch == 1024) {
      MMFM_LAUNCH_BWD(128, 8, 1, 0);
    } else {
      MMFM_LAUNCH_BWD(256, 8, 1, 0);
    }
    return true;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (variant) { MMFM_VARIANTS(MMFM_BWD_CASE) }
    if (variant >= 12 && variant <= 15 && ch == 256) {  // these variants differ in the forward only
      MMFM_LAUNCH_BWD_ROWS(32, 8, 4);
      return true;
    }
  }
  return false;
}

#define MMFM_INSTANTIATE(T)                                           \
  template bool launch_fwd<T>(const Params&, int, int, cudaStream_t); \
  template bool launch_bwd<T>(const Params&, int, int, cudaStream_t);

}  // namespace mmfm_selective_scan
