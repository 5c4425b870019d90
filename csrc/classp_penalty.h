// The penalty a CLASSP step takes (SPEC section 4a), shared by the op's checks and the CPU and
// CUDA kernels. Plain C++, no ATen.
#pragma once

namespace classp {

// kNone also for the tensors a penalty does not cover. Explicit: 2 * scale * W * (theta - m)
// joins the unscaled gradient before the threshold. Proximal: each updated element moves to
// theta + w * (m - theta), w = c / (1 + c), c = min(2 * scale * W * eta, max / 2).
enum class PenaltyForm { kNone, kExplicit, kProximal };

}  // namespace classp
