// Selective scan host code: argument checks, allocation, dispatch by dtype (kernels in selective_scan.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "selective_scan.h"

namespace mmfm_selective_scan {
namespace {

// A chunk is the number of steps per block pass (256, 512, 1024 or 2048, chosen in Python). The forward
// saves the state at every multiple of the backward's chunk (`save_chunk`); its own chunk may differ.
void check_chunk(int chunk) {
  TORCH_CHECK(chunk == 256 || chunk == 512 || chunk == 1024 || chunk == 2048,
              "chunk must be 256, 512, 1024 or 2048, got ", chunk);
}

void check_row(const at::Tensor& t, const char* name, int64_t batch, int64_t dim, int64_t seqlen) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == dim && t.size(2) == seqlen, name,
              " must have shape (batch, D, L) = (", batch, ", ", dim, ", ", seqlen, "), got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 || seqlen == 1, name, " must have stride 1 along L");
}

void check_bc(const at::Tensor& t, const char* name, int64_t batch, int64_t dstate, int64_t seqlen) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(2) == dstate && t.size(3) == seqlen, name,
              " must have shape (batch, G, N, L), got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1 || seqlen == 1, name, " must have stride 1 along L");
}

const float* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

Params make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                   const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& h0,
                   bool softplus, int save_chunk) {
  check_chunk(save_chunk);
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2), dstate = A.size(1);
  check_row(u, "u", batch, dim, seqlen);
  check_row(delta, "delta", batch, dim, seqlen);
  check_bc(B, "B", batch, dstate, seqlen);
  check_bc(C, "C", batch, dstate, seqlen);
  TORCH_CHECK(B.size(1) == C.size(1), "B and C must have the same number of groups");
  TORCH_CHECK(dim % B.size(1) == 0, "the groups of B/C must divide D");
  TORCH_CHECK(dstate <= kMaxState, "N must be <= ", kMaxState);
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.size(0) == dim, "A must be fp32 (D, N)");
  TORCH_CHECK(delta.scalar_type() == u.scalar_type() && B.scalar_type() == u.scalar_type() &&
                  C.scalar_type() == u.scalar_type(),
              "delta, B and C must have u's dtype");
  for (const auto* t : {&D, &delta_bias, &h0})
    if (t->has_value())
      TORCH_CHECK((*t)->scalar_type() == at::kFloat && (*t)->is_contiguous(), "D/delta_bias/h0 must be fp32 contiguous");
  Params p{};
  p.batch = batch;
  p.dim = dim;
  p.dstate = dstate;
  p.seqlen = seqlen;
  p.group_size = dim / B.size(1);
  p.save_chunk = save_chunk;
  p.n_saved = (seqlen + save_chunk - 1) / save_chunk;
  p.softplus = softplus;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = opt_ptr(D);
  p.delta_bias = opt_ptr(delta_bias);
  p.h0 = opt_ptr(h0);
  p.u_sb = u.stride(0), p.u_sd = u.stride(1);
  p.delta_sb = delta.stride(0), p.delta_sd = delta.stride(1);
  p.B_sb = B.stride(0), p.B_sg = B.stride(1), p.B_sn = B.stride(2);
  p.C_sb = C.stride(0), p.C_sg = C.stride(1), p.C_sn = C.stride(2);
  if (z.has_value()) {
    check_row(*z, "z", batch, dim, seqlen);
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), "z must have u's dtype");
    p.z = z->data_ptr();
    p.z_sb = z->stride(0), p.z_sd = z->stride(1);
  }
  return p;
}

#define MMFM_DISPATCH_DTYPE(dtype, ...)                                            \
  [&] {                                                                            \
    if (dtype == at::kFloat) { using T = float; return __VA_ARGS__(); }            \
    if (dtype == at::kHalf) { using T = c10::Half; return __VA_ARGS__(); }          \
    if (dtype == at::kBFloat16) { using T = c10::BFloat16; return __VA_ARGS__(); }  \
    TORCH_CHECK(false, "selective scan: unsupported dtype ", dtype);               \
  }()

// Returns out (batch, D, L) in u's dtype, the last state (batch, D, N) fp32 and, when save_states, the
// state after every save_chunk steps (batch, D, ceil(L / save_chunk), N) fp32 for the backward (the
// last slot is not written: the backward never reads it).
std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            const c10::optional<at::Tensor>& h0, bool softplus, bool save_states, int64_t chunk, int64_t save_chunk,
                            int64_t variant) {
  const c10::cuda::CUDAGuard guard(u.device());
  check_chunk(int(chunk));
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, softplus, int(save_chunk));
  auto out = at::empty_like(u, at::MemoryFormat::Contiguous);
  auto f32 = u.options().dtype(at::kFloat);
  auto hlast = at::empty({p.batch, p.dim, p.dstate}, f32);
  auto hsave = save_states ? at::empty({p.batch, p.dim, p.n_saved, p.dstate}, f32) : at::empty({0}, f32);
  p.out = out.data_ptr();
  p.out_sb = out.stride(0), p.out_sd = out.stride(1);
  p.hlast = hlast.data_ptr<float>();
  p.hsave = save_states ? hsave.data_ptr<float>() : nullptr;
  if (p.seqlen > 0 && p.batch > 0 && p.dim > 0)
    MMFM_DISPATCH_DTYPE(u.scalar_type(), [&] {
      TORCH_CHECK(launch_fwd<T>(p, int(chunk), int(variant % 100), c10::cuda::getCurrentCUDAStream()),
                  "no selective scan variant ", variant, " for ", u.scalar_type());
    });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, hlast, hsave};
}

// Returns du, ddelta, dz (or an empty tensor), dA (D, N), dB, dC (batch, G, N, L), dD, ddelta_bias (D,)
// and dh0 (batch, D, N), all gradients of input-dependent tensors in u's dtype and the rest fp32.
std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                            const c10::optional<at::Tensor>& h0, const at::Tensor& hsave, const at::Tensor& dout,
                            const c10::optional<at::Tensor>& dhlast, bool softplus, int64_t chunk, int64_t variant) {
  const c10::cuda::CUDAGuard guard(u.device());
  TORCH_CHECK(u.is_contiguous() && delta.is_contiguous() && dout.is_contiguous() &&
                  (!z.has_value() || z->is_contiguous()),
              "the backward needs contiguous u, delta, z and dout");
  Params p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, softplus, int(chunk));
  // The backward runs on a (batch, D / rows) grid, as mamba-ssm's: co-resident blocks then add into different
  // batch rows' dB / dC. 4-7% faster than (D / rows, batch) at D4096 L2048 and D1536 L1024 up to batch 16
  // (H100; 1-5% slower at D1536 batch 32-64). The forward keeps (D, batch): 4% faster at B4 D4096 L2048
  // (BENCHMARKS.md, 2026-12-07). Variant + 100, or D beyond the grid's y extent: (D / rows, batch).
  p.batch_fast = variant < 100 && p.dim <= 65535;
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(), "dout must match u");
  TORCH_CHECK(hsave.numel() == int64_t(p.batch) * p.dim * p.n_saved * p.dstate,
              "hsave does not match the backward's chunk length");
  auto f32 = u.options().dtype(at::kFloat);
  auto du = at::empty_like(u), ddelta = at::empty_like(u);
  auto dz = z.has_value() ? at::empty_like(u) : at::empty({0}, u.options());
  // the atomically summed gradients start at zero: cudaMemsetAsync on the stream, not five fill kernels
  // through the dispatcher (host time that shows at MambaVision sizes, where launches outlast the kernels)
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto zeroed = [&](at::IntArrayRef sizes) {
    auto t = at::empty(sizes, f32);
    C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.numel() * sizeof(float), stream));
    return t;
  };
  auto dA = zeroed(A.sizes());
  auto dB = zeroed(B.sizes()), dC = zeroed(C.sizes());
  auto dD = zeroed({p.dim}), ddelta_bias = zeroed({p.dim});
  auto dh0 = at::empty({p.batch, p.dim, p.dstate}, f32);
  p.dout = dout.data_ptr();
  p.dout_sb = dout.stride(0), p.dout_sd = dout.stride(1);
  p.dhlast = opt_ptr(dhlast);
  p.hsave = hsave.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = z.has_value() ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = dD.data_ptr<float>();
  p.ddelta_bias = ddelta_bias.data_ptr<float>();
  p.dh0 = dh0.data_ptr<float>();
  if (p.seqlen > 0 && p.batch > 0 && p.dim > 0)
    MMFM_DISPATCH_DTYPE(u.scalar_type(), [&] {
      TORCH_CHECK(launch_bwd<T>(p, int(chunk), int(variant % 100), stream),
                  "no selective scan variant ", variant, " for ", u.scalar_type());
    });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dh0};
}

}  // namespace
}  // namespace mmfm_selective_scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &mmfm_selective_scan::fwd, "selective scan forward (input-dependent B/C)");
  m.def("bwd", &mmfm_selective_scan::bwd, "selective scan backward (input-dependent B/C)");
}
