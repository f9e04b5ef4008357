// Selective scan kernels for c10::BFloat16 inputs (one file per dtype so that they compile in parallel).
#include "selective_scan.cuh"

namespace mmfm_selective_scan {
MMFM_INSTANTIATE(c10::BFloat16)
}  // namespace mmfm_selective_scan
