// CUDA kernels of classp_fused::classp_step_: a multi-tensor chunked launch.
//
// Every tensor is split into chunks of kChunkElements; a launch carries a table of tensor
// addresses and a block -> (tensor, chunk) map in its kernel arguments, and the host launches
// again while chunks remain (classp_plan.h). Each block updates one chunk: 128-bit loads where
// aligned, fp32 arithmetic (fp64 for fp64 params) with explicitly rounded operations (no FMA
// contraction, IEEE division and square root: the CPU kernel's results), and no store at all for
// unselected elements. lr, grad_scale and found_inf are read on the device; counts are reduced
// per block and added atomically.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "classp_cuda.h"
#include "classp_plan.h"

namespace classp {
namespace {

constexpr int kThreads = 512;
constexpr int kPack = 4;  // elements per thread and vector load

enum class Power { kOne, kTwo, kGeneric };

template <typename scalar_t>
using math_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Kernel arguments of one launch: with StepArgs and the counts pointer under the 4 KiB limit.
struct LaunchTable {
  void* params[kLaunchMaxTensors];
  const void* grads[kLaunchMaxTensors];
  void* accs[kLaunchMaxTensors];
  int64_t numels[kLaunchMaxTensors];
  int64_t rows[kLaunchMaxTensors];
  uint8_t block_tensor[kLaunchMaxBlocks];  // slot in the arrays above
  int32_t block_chunk[kLaunchMaxBlocks];   // chunk index within that tensor
};
static_assert(kLaunchMaxTensors <= 256, "block_tensor holds a uint8_t slot");
static_assert(sizeof(LaunchTable) + sizeof(StepArgs) + sizeof(int64_t*) <= 4096,
              "kernel arguments exceed 4 KiB");

__device__ __forceinline__ double read_scalar(const ScalarArg& s) {
  if (s.ptr == nullptr) {
    return s.host_value;
  }
  return s.is_double ? *static_cast<const double*>(s.ptr) : *static_cast<const float*>(s.ptr);
}

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float log2_of(float a) { return log2f(a); }
__device__ __forceinline__ double log2_of(double a) { return log2(a); }
__device__ __forceinline__ float exp2_of(float a) { return exp2f(a); }
__device__ __forceinline__ double exp2_of(double a) { return exp2(a); }

// The step's scalars in the arithmetic type, rounded as the reference rounds them.
template <typename T>
struct Hyper {
  T lr, threshold, eps, power, inv_power, grad_scale;
  bool apply_scaling, has_grad_scale;
};

// The CLASSP update of one element: returns whether it is selected, and then its new values.
template <Power kPower, typename T>
__device__ __forceinline__ bool update_element(T param, T grad, T acc, const Hyper<T>& h,
                                               T& new_param, T& new_acc, bool& finite) {
  if (h.has_grad_scale) {
    grad = div_rn(grad, h.grad_scale);
  }
  const T magnitude = fabs(grad);
  const T square = mul_rn(grad, grad);
  finite = isfinite(grad);
  if (!(finite && square > h.threshold)) {
    return false;
  }
  if constexpr (kPower == Power::kOne) {
    new_acc = add_rn(acc, magnitude);
  } else if constexpr (kPower == Power::kTwo) {
    new_acc = add_rn(acc, square);
  } else {
    new_acc = add_rn(acc, exp2_of(mul_rn(h.power, log2_of(magnitude))));
  }
  T step = grad;
  if (h.apply_scaling) {
    const T denom = add_rn(h.eps, new_acc);
    if constexpr (kPower == Power::kOne) {
      step = div_rn(grad, denom);
    } else if constexpr (kPower == Power::kTwo) {
      step = mul_rn(grad, div_rn(T(1), sqrt_rn(denom)));
    } else {
      step = div_rn(grad, exp2_of(mul_rn(log2_of(denom), h.inv_power)));
    }
  }
  new_param = sub_rn(param, mul_rn(h.lr, step));
  return true;
}

template <typename T>
struct alignas(sizeof(T) * kPack) Pack {
  T v[kPack];
};

template <typename T>
__device__ __forceinline__ bool is_pack_aligned(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<T>) == 0;
}

// Sums `value` over the block; the result is valid in thread 0. Starts with a barrier, so the
// scratch space can be reused by consecutive calls.
__device__ __forceinline__ int block_sum(int value, int* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) {
    scratch[threadIdx.x / 32] = value;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    value = threadIdx.x < kThreads / 32 ? scratch[threadIdx.x] : 0;
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

template <typename scalar_t, Power kPower>
__global__ void __launch_bounds__(kThreads)
    classp_step_kernel(const LaunchTable table, const StepArgs args, int64_t* counts) {
  using T = math_t<scalar_t>;
  if (args.has_found_inf && read_scalar(args.found_inf) != 0.0) {
    return;  // an overflowed AMP step changes and counts nothing
  }
  const Hyper<T> h{static_cast<T>(read_scalar(args.lr)),
                   static_cast<T>(args.threshold),
                   static_cast<T>(args.eps),
                   static_cast<T>(args.power),
                   static_cast<T>(1.0 / args.power),
                   static_cast<T>(args.has_grad_scale ? read_scalar(args.grad_scale) : 1.0),
                   args.apply_scaling,
                   args.has_grad_scale};

  const int slot = table.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunkElements;
  const int64_t rest = table.numels[slot] - begin;
  const int64_t n = rest < kChunkElements ? rest : kChunkElements;
  scalar_t* param = static_cast<scalar_t*>(table.params[slot]) + begin;
  const scalar_t* grad = static_cast<const scalar_t*>(table.grads[slot]) + begin;
  T* acc = static_cast<T*>(table.accs[slot]) + begin;

  int updated = 0;
  int nonfinite = 0;
  int64_t scalar_from = 0;  // where the one-element-at-a-time loop starts
  if (is_pack_aligned(param) && is_pack_aligned(grad) && is_pack_aligned(acc)) {
    const int64_t packs = n / kPack;
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      const Pack<scalar_t> p = reinterpret_cast<const Pack<scalar_t>*>(param)[i];
      const Pack<scalar_t> g = reinterpret_cast<const Pack<scalar_t>*>(grad)[i];
      Pack<T> a = reinterpret_cast<const Pack<T>*>(acc)[i];
      Pack<scalar_t> new_p = p;
      bool selected[kPack];
      int selected_count = 0;
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        T new_param, new_acc;
        bool finite;
        selected[k] = update_element<kPower>(static_cast<T>(p.v[k]), static_cast<T>(g.v[k]),
                                             a.v[k], h, new_param, new_acc, finite);
        nonfinite += !finite;
        if (selected[k]) {
          new_p.v[k] = static_cast<scalar_t>(new_param);
          a.v[k] = new_acc;
          ++selected_count;
        }
      }
      updated += selected_count;
      if (selected_count == kPack) {
        reinterpret_cast<Pack<scalar_t>*>(param)[i] = new_p;
        reinterpret_cast<Pack<T>*>(acc)[i] = a;
      } else if (selected_count > 0) {
#pragma unroll
        for (int k = 0; k < kPack; ++k) {
          if (selected[k]) {
            param[i * kPack + k] = new_p.v[k];
            acc[i * kPack + k] = a.v[k];
          }
        }
      }
    }
    scalar_from = packs * kPack;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < n; i += kThreads) {
    T new_param, new_acc;
    bool finite;
    if (update_element<kPower>(static_cast<T>(param[i]), static_cast<T>(grad[i]), acc[i], h,
                               new_param, new_acc, finite)) {
      param[i] = static_cast<scalar_t>(new_param);
      acc[i] = new_acc;
      ++updated;
    }
    nonfinite += !finite;
  }

  __shared__ int scratch[kThreads / 32];
  updated = block_sum(updated, scratch);
  nonfinite = block_sum(nonfinite, scratch);
  if (threadIdx.x == 0) {
    auto* row = reinterpret_cast<unsigned long long*>(counts + 2 * table.rows[slot]);
    if (updated != 0) {
      atomicAdd(row, static_cast<unsigned long long>(updated));
    }
    if (nonfinite != 0) {
      atomicAdd(row + 1, static_cast<unsigned long long>(nonfinite));
    }
  }
}

template <typename scalar_t, Power kPower>
cudaError_t launch_all(const std::vector<DeviceTensors>& tensors, const StepArgs& args,
                       int64_t* counts, cudaStream_t stream) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const DeviceTensors& t : tensors) {
    numels.push_back(t.numel);
  }
  // One part: every chunk starts at a multiple of kChunkElements, so a block's chunk index
  // locates it.
  const std::vector<Chunk> chunks = plan_work(numels, 1).chunks;
  const std::vector<int64_t> launch_starts = plan_launches(chunks);
  for (size_t launch = 0; launch + 1 < launch_starts.size(); ++launch) {
    LaunchTable table;
    int slot = -1;
    int64_t last_tensor = -1;
    const int64_t first = launch_starts[launch];
    const int num_blocks = static_cast<int>(launch_starts[launch + 1] - first);
    for (int block = 0; block < num_blocks; ++block) {
      const Chunk& chunk = chunks[first + block];
      if (chunk.tensor != last_tensor) {
        const DeviceTensors& t = tensors[chunk.tensor];
        ++slot;
        table.params[slot] = t.param;
        table.grads[slot] = t.grad;
        table.accs[slot] = t.acc;
        table.numels[slot] = t.numel;
        table.rows[slot] = t.row;
        last_tensor = chunk.tensor;
      }
      table.block_tensor[block] = static_cast<uint8_t>(slot);
      table.block_chunk[block] = static_cast<int32_t>(chunk.begin / kChunkElements);
    }
    classp_step_kernel<scalar_t, kPower><<<num_blocks, kThreads, 0, stream>>>(table, args, counts);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) {
      return status;
    }
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t launch_for_power(const std::vector<DeviceTensors>& tensors, const StepArgs& args,
                             int64_t* counts, cudaStream_t stream) {
  if (args.power == 1.0) {
    return launch_all<scalar_t, Power::kOne>(tensors, args, counts, stream);
  }
  if (args.power == 2.0) {
    return launch_all<scalar_t, Power::kTwo>(tensors, args, counts, stream);
  }
  return launch_all<scalar_t, Power::kGeneric>(tensors, args, counts, stream);
}

}  // namespace

cudaError_t launch_classp_step(ParamDtype dtype, const std::vector<DeviceTensors>& tensors,
                               const StepArgs& args, int64_t* counts, cudaStream_t stream) {
  switch (dtype) {
    case ParamDtype::kFloat:
      return launch_for_power<float>(tensors, args, counts, stream);
    case ParamDtype::kBFloat16:
      return launch_for_power<c10::BFloat16>(tensors, args, counts, stream);
    case ParamDtype::kHalf:
      return launch_for_power<c10::Half>(tensors, args, counts, stream);
    case ParamDtype::kDouble:
      return launch_for_power<double>(tensors, args, counts, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace classp
