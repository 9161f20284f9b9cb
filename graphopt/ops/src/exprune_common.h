// What graphopt's ExPrune kernels share: SIMD lanes, and the checkpoints of the probe with their float32
// score scales and boundary factors (see graphopt/ops/exprune.py for the semantics).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

// --- SIMD lanes: AVX-512, else AVX2+FMA, else GCC vector extensions (mul then add) --------------------------
#if defined(__AVX512F__)
typedef __m512 vec;
constexpr int64_t kLanes = 16;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload_part(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p);
}
inline vec vfma(vec a, vec b, vec acc) { return _mm512_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline vec vset1(float v) { return _mm512_set1_ps(v); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline uint32_t vless(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }  // lane bits of a < b
// max(a + b, 0) in the lanes whose bit is set in `keep`, 0 elsewhere
inline vec vrelu_kept(vec a, vec b, uint32_t keep) {
  return _mm512_maskz_max_ps(static_cast<__mmask16>(keep), _mm512_add_ps(a, b), _mm512_setzero_ps());
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
constexpr int64_t kLanes = 8;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload_part(const float* p, int64_t count) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes));
}
inline vec vfma(vec a, vec b, vec acc) { return _mm256_fmadd_ps(a, b, acc); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline vec vset1(float v) { return _mm256_set1_ps(v); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline uint32_t vless(vec a, vec b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
inline vec vrelu_kept(vec a, vec b, uint32_t keep) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(keep)), bits), bits);
  return _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_max_ps(_mm256_add_ps(a, b), _mm256_setzero_ps()));
}
#else
typedef float vec __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;
inline vec vzero() { return vec{0}; }
inline vec vload(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vec vload_part(const float* p, int64_t count) {
  vec v = {0};
  std::memcpy(&v, p, static_cast<size_t>(count) * sizeof(float));
  return v;
}
inline vec vfma(vec a, vec b, vec acc) { return acc + a * b; }
inline vec vadd(vec a, vec b) { return a + b; }
inline float vsum(vec a) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += a[i];
  return s;
}
inline vec vset1(float v) {
  vec r;
  for (int64_t i = 0; i < kLanes; ++i) r[i] = v;
  return r;
}
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
inline vec vmul(vec a, vec b) { return a * b; }
inline uint32_t vless(vec a, vec b) {
  uint32_t bits = 0;
  for (int64_t i = 0; i < kLanes; ++i) bits |= static_cast<uint32_t>(a[i] < b[i]) << i;
  return bits;
}
inline vec vrelu_kept(vec a, vec b, uint32_t keep) {
  vec r = a + b;
  for (int64_t i = 0; i < kLanes; ++i) r[i] = ((keep >> i) & 1u) && r[i] > 0.0f ? r[i] : 0.0f;
  return r;
}
#endif

// Loaded once, used by several FMAs: without this GCC folds the load into every FMA as a memory operand and
// loads it Q times again.
inline vec in_register(vec v) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  asm("" : "+v"(v));
#endif
  return v;
}

// The op's checkpoints k_1 = m < k_2 < ... (the attribute, or [m] for models written before it existed),
// validated against its rule; `op` names the op in the errors.
inline std::vector<int64_t> read_checkpoints(const Ort::ConstKernelInfo& info, int64_t m, const std::string& op) {
  const std::string rule = info.GetAttribute<std::string>("rule");
  if (rule != "threshold" && rule != "sequential")
    ORT_CXX_API_THROW(op + ": unknown rule " + rule, ORT_INVALID_ARGUMENT);
  std::vector<int64_t> checkpoints;
  try {
    checkpoints = info.GetAttributes<int64_t>("checkpoints");
  } catch (const Ort::Exception&) {
    checkpoints.clear();
  }
  if (checkpoints.empty()) checkpoints.push_back(m);
  if (rule == "threshold" && checkpoints.size() != 1)
    ORT_CXX_API_THROW(op + ": the threshold rule has the single checkpoint [m]", ORT_INVALID_ARGUMENT);
  bool valid = checkpoints[0] == m && m >= 1;
  for (size_t c = 1; c < checkpoints.size(); ++c) valid = valid && checkpoints[c] > checkpoints[c - 1];
  if (!valid) ORT_CXX_API_THROW(op + ": checkpoints must increase strictly from m", ORT_INVALID_ARGUMENT);
  return checkpoints;
}

// Per checkpoint k of d exchangeable terms: scale = float(d) / float(k) and the boundary factor
// f_k = sqrt((d - k) * k_1 / (k * (d - k_1))), each one float32 operation at a time as the function body.
inline void checkpoint_factors(int64_t d, const std::vector<int64_t>& checkpoints, std::vector<float>& scale,
                               std::vector<float>& factor) {
  const size_t count = checkpoints.size();
  scale.resize(count);
  factor.resize(count);
  const float first_rest = static_cast<float>(d - checkpoints[0]);
  const float first = static_cast<float>(checkpoints[0]);
  for (size_t c = 0; c < count; ++c) {
    const float k = static_cast<float>(checkpoints[c]);
    scale[c] = static_cast<float>(d) / k;
    const float numerator = static_cast<float>(d - checkpoints[c]) * first;
    const float denominator = k * first_rest;
    factor[c] = std::sqrt(numerator / denominator);
  }
}

// The first `depth` columns of a constant W [rows, columns] as panels of `width` rows (neurons, output channels),
// packed once when a kernel is created, k-major: values[((j / width) * depth + i) * width + j % width] = W[j, i],
// zero past the last row. The linear kernel packs its probe prefixes (depth m, width kLanes) for batch 1 and
// all of W (depth d, width kNr) for batch > 1; the convolution kernel all of W [M, C · kh · kw] (width kQ).
// A layout of a constant W [n, d] packed once (Panels here, the linear kernel's Tails); `ready` says whether a
// call's W is the one packed.
struct Packed {
  std::vector<float> values;
  const float* source = nullptr;  // W's data when packed: a call on other data does not use the packing
  int64_t n = 0, d = 0;

  bool ready(const float* w, int64_t rows, int64_t columns) const {
    return source != nullptr && w == source && rows == n && columns == d;
  }
};

struct Panels : Packed {
  int64_t panels = 0;

  void pack(const float* w, int64_t rows, int64_t columns, int64_t depth, int64_t width) {
    panels = (rows + width - 1) / width;
    values.assign(static_cast<size_t>(panels * depth * width), 0.0f);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t i = 0; i < depth; ++i) values[((j / width) * depth + i) * width + j % width] = w[j * columns + i];
    source = w;
    n = rows;
    d = columns;
  }
};

// An ExPrune op for onnxruntime's custom-op API: inputs X, W, B, Tau (float) and Perm (int64), one float output,
// run on the CPU provider by `Kernel`.
template <typename Kernel>
struct ExPruneOp : Ort::CustomOpBase<ExPruneOp<Kernel>, Kernel> {
  explicit ExPruneOp(const char* name) : name_(name) {}
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new Kernel(api, info); }
  const char* GetName() const { return name_; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  const char* name_;
};

}  // namespace

// graphopt.ExPruneConvRelu (exprune_conv_kernel.cc), registered beside graphopt.ExPruneLinearRelu.
const OrtCustomOp* exprune_conv_op();
