// Native kernel of graphopt.ExPruneLinearRelu (see graphopt/ops/exprune.py for the semantics).
//
// Single-threaded (running it on onnxruntime's thread pool is not done yet). For every neuron j (outer loop)
// and every row r of X:
//   partial = W[j, :m] . x'[r, :m]; score = partial * (float(d) / float(m)) + B[j]
//   if score < Tau[j]: Y[r, j] = 0 and W[j, m:] is not read for this row; if every row of the batch skips j,
//   W[j, m:] is never read at all (rows are contiguous per neuron, probe prefix first: batch-1 decoding is
//   memory-bound, so this is where the time goes).
//   else Y[r, j] = max(partial + W[j, m:] . x'[r, m:] + B[j], 0).
// x' = X[..., Perm] is gathered once per call. Built with -ffp-contract=off so the score rounds as the
// function body's Mul then Add does; the dot products themselves use SIMD reductions (a different summation
// order than onnxruntime's MatMul, so a score within rounding of Tau may decide differently; the exprune
// pass keeps its thresholds a margin away from the calibration scores it must keep).
//
// Exposes RegisterCustomOps (the onnxruntime custom-op library entry point) and graphopt_exprune_calls, a
// counter of Compute calls that lets a test observe whether onnxruntime ran this kernel or the function body.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::atomic<int64_t> g_calls{0};

// Four independent 8-float vector accumulators (GCC vector extensions, AVX with -march=native): a single
// accumulator would make every step wait on the previous add. The lanes are reduced as a tree, in vector
// registers, so short dots (the probe) do not pay for a serial horizontal sum.
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float dot(const float* a, const float* b, int64_t count) {
  v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= count; i += 8) s0 += load8(a + i) * load8(b + i);
  v8f s = (s0 + s1) + (s2 + s3);
  float acc = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
  for (; i < count; ++i) acc += a[i] * b[i];
  return acc;
}

struct ExPruneKernel {
  int64_t m_;

  ExPruneKernel(const OrtApi& api, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    m_ = kernel_info.GetAttribute<int64_t>("m");
    std::string rule = kernel_info.GetAttribute<std::string>("rule");
    if (rule != "threshold") ORT_CXX_API_THROW("ExPruneLinearRelu: only rule=threshold is implemented", ORT_INVALID_ARGUMENT);
    (void)api;
  }

  void Compute(OrtKernelContext* raw_context) {
    g_calls.fetch_add(1, std::memory_order_relaxed);
    Ort::KernelContext context(raw_context);
    Ort::ConstValue x_value = context.GetInput(0);
    Ort::ConstValue w_value = context.GetInput(1);
    std::vector<int64_t> x_shape = x_value.GetTensorTypeAndShapeInfo().GetShape();
    std::vector<int64_t> w_shape = w_value.GetTensorTypeAndShapeInfo().GetShape();
    if (w_shape.size() != 2 || x_shape.empty() || x_shape.back() != w_shape[1])
      ORT_CXX_API_THROW("ExPruneLinearRelu: X [..., d] and W [n, d] disagree", ORT_INVALID_ARGUMENT);
    const int64_t n = w_shape[0], d = w_shape[1];
    const int64_t m = m_ < 1 ? 1 : (m_ > d ? d : m_);
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];
    const float* x = x_value.GetTensorData<float>();
    const float* w = w_value.GetTensorData<float>();
    const float* bias = context.GetInput(2).GetTensorData<float>();
    const float* tau = context.GetInput(3).GetTensorData<float>();
    const int64_t* perm = context.GetInput(4).GetTensorData<int64_t>();
    std::vector<int64_t> y_shape(x_shape);
    y_shape.back() = n;
    float* y = context.GetOutput(0, y_shape).GetTensorMutableData<float>();

    std::vector<float> gathered(static_cast<size_t>(rows * d));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) gathered[r * d + i] = x[r * d + perm[i]];
    const float scale = static_cast<float>(d) / static_cast<float>(m);
    const float* xp = gathered.data();

    for (int64_t j = 0; j < n; ++j) {
      const float* row = w + j * d;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + r * d;
        const float partial = dot(row, xr, m);
        const float scaled = partial * scale;
        const float score = scaled + bias[j];
        float out = 0.0f;
        if (!(score < tau[j])) {
          const float pre = partial + dot(row + m, xr + m, d - m) + bias[j];
          out = pre > 0.0f ? pre : 0.0f;
        }
        y[r * n + j] = out;
      }
    }
  }
};

struct ExPruneOp : Ort::CustomOpBase<ExPruneOp, ExPruneKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new ExPruneKernel(api, info); }
  const char* GetName() const { return "ExPruneLinearRelu"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int64_t graphopt_exprune_calls() { return g_calls.load(); }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static ExPruneOp op;
  static std::mutex guard;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    Ort::CustomOpDomain domain("graphopt");
    domain.Add(&op);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(domain);
    std::lock_guard<std::mutex> lock(guard);
    domains.push_back(std::move(domain));  // must outlive every session that uses it
  } catch (const Ort::Exception& error) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, error.what());
  }
  return nullptr;
}

}  // extern "C"
