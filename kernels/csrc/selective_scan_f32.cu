// Selective scan kernels for float inputs (one file per dtype so that they compile in parallel).
#include "selective_scan.cuh"

namespace mmfm_selective_scan {
MMFM_INSTANTIATE(float)
}  // namespace mmfm_selective_scan
