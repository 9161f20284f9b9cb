// Native kernel of graphopt.ExPruneConvRelu (see graphopt/ops/exprune_conv.py for the semantics).
//
// Inputs X [N, C, H, W], W [M, C, kh, kw] (input channels permuted, probe channels first), B [M], Tau [M],
// Perm [C]. Output position (n, j, y, x) sums the C·kh·kw products of its receptive field channel by
// channel (all kh·kw taps of channel c before channel c + 1), so the probe of k channels is a prefix of the
// sum; at each checkpoint k the partial sum S gives score = S * (float(C) / float(k)) + B[j], and
// score < Tau[j] * f_k zeroes the output and stops its sum. A position that never fires gets
// max(S_C + B[j], 0).
//
// Layout: X' = X[:, Perm] is copied once per call into a zero-padded buffer (pads folded in, rows widened so
// whole vectors stay inside), and W is packed, once when the kernel is created for a constant W, into panels
// of kQ output channels, tap-major (panel[t][q] = W[j0 + q, t], t = (c·kh + a)·kw + b). Output rows are
// cut into tiles of kLanes consecutive positions; with stride 1 along the width a tile's inputs at every tap
// are kLanes consecutive floats of the buffer (a direct convolution, no im2col), otherwise they are gathered
// into a small tile buffer first. For each panel a tile keeps one vector of sums per output channel: per tap,
// one load of the inputs and one broadcast weight per channel feed the FMAs. At a checkpoint each channel's
// lanes are tested at once (the same float32 score and boundary as the function body, one operation at a
// time); a channel whose lanes have all fired leaves the tile's later taps, and a tile whose channels have
// all fired stops. So the saving comes from output channels that are predicted negative over a run of
// kLanes neighbouring positions, which is how ReLU maps of trained CNNs are zero (in regions), while
// scattered single positions are computed along and zeroed. Rows of output are split over onnxruntime's
// intra-op thread pool.
//
// Numerics: FMA in SIMD lanes, summed in tap order (onnxruntime's Conv sums in its own order), so a score
// within rounding of its boundary may decide differently than the function body; the exprune pass keeps
// its thresholds a margin away from the calibration scores it must keep.

#include "exprune_common.h"

#include <algorithm>
#include <atomic>

namespace {

std::atomic<int64_t> g_conv_calls{0};

constexpr int kQ = 8;                      // output channels per weight panel
constexpr int kV = kLanes == 16 ? 2 : 1;   // vectors of slots per tile: kQ · kV sums stay in registers
constexpr int64_t kT = kV * kLanes;        // slots (output positions) per tile
constexpr int64_t kTilesPerTask = 8;       // tiles a task walks for every panel it holds

struct ConvGeometry {
  int64_t n, c, h, w;          // input
  int64_t m, kh, kw;           // weight
  int64_t sh, sw, dh, dw;      // strides, dilations
  int64_t pt, pl, pb, pr;      // pads
  int64_t oh, ow;              // output
  int64_t hp, wp;              // padded buffer plane
  bool direct;                 // stride 1: slots are positions of the padded plane, y · wp + x

  int64_t taps() const { return c * kh * kw; }
  int64_t plane() const { return hp * wp; }
  int64_t row_slots() const { return direct ? wp : ow; }  // slots per output row (direct: wp - ow unused)
  int64_t slots() const { return oh * row_slots(); }
  int64_t tiles() const { return (slots() + kT - 1) / kT; }
};

// W [M, C, kh, kw] as panels of kQ output channels, tap-major: values[(j / kQ) * T * kQ + t * kQ + j % kQ],
// zero past M.
struct ConvPanels {
  std::vector<float> values;
  const float* source = nullptr;
  int64_t m = 0, taps = 0;

  void pack(const float* w, int64_t channels, int64_t tap_count) {
    const int64_t panels = (channels + kQ - 1) / kQ;
    values.assign(static_cast<size_t>(panels * tap_count * kQ), 0.0f);
    for (int64_t j = 0; j < channels; ++j)
      for (int64_t t = 0; t < tap_count; ++t) values[((j / kQ) * tap_count + t) * kQ + j % kQ] = w[j * tap_count + t];
    source = w;
    m = channels;
    taps = tap_count;
  }

  bool ready(const float* w, int64_t channels, int64_t tap_count) const {
    return source != nullptr && w == source && channels == m && tap_count == taps;
  }
};

struct ConvProblem {
  ConvGeometry g;
  const float* xp;          // X' padded: [N, C, hp, wp]
  const float* panels;
  const int64_t* offsets;   // per tap t: its offset from a tile's first input (direct), or t · kT (gathered)
  const int64_t* gather;    // per tap t: its offset in the buffer from an output position's corner
  const float* bias;
  const float* tau;
  float* staged;            // [N, M, tiles · kT]: each tile's outputs, by slot
  const int64_t* stages;    // tap count at each checkpoint (k · kh · kw)
  const float* scale;
  const float* factor;
  int64_t count;            // checkpoints
  int64_t tile_chunks, panel_chunks, panels_per_task;
};

// acc[live[i]][v] += Σ_t panel[t][live[i]] · x[offsets[t] + v · kLanes] over taps [t0, t1), for the Q channels
// `live` of a panel. Few channels get several accumulators each (over alternating taps) to hide the FMA latency.
template <int Q>
inline void accumulate(const float* panel, const int* live, const float* base, const int64_t* offsets, int64_t t0,
                       int64_t t1, vec (*acc)[kV]) {
  constexpr int U = Q * kV >= 8 ? 1 : (Q * kV >= 4 ? 2 : 4);
  vec s[U][Q][kV];
  const float* w[Q];
  for (int i = 0; i < Q; ++i) {
    w[i] = panel + live[i];
    for (int v = 0; v < kV; ++v) {
      s[0][i][v] = acc[live[i]][v];
      for (int u = 1; u < U; ++u) s[u][i][v] = vzero();
    }
  }
  int64_t t = t0;
  for (; t + U <= t1; t += U)
    for (int u = 0; u < U; ++u) {
      vec xv[kV];
      for (int v = 0; v < kV; ++v) xv[v] = in_register(vload(base + offsets[t + u] + v * kLanes));
      for (int i = 0; i < Q; ++i) {
        const vec wv = vset1(w[i][(t + u) * kQ]);
        for (int v = 0; v < kV; ++v) s[u][i][v] = vfma(wv, xv[v], s[u][i][v]);
      }
    }
  for (; t < t1; ++t) {
    vec xv[kV];
    for (int v = 0; v < kV; ++v) xv[v] = in_register(vload(base + offsets[t] + v * kLanes));
    for (int i = 0; i < Q; ++i) {
      const vec wv = vset1(w[i][t * kQ]);
      for (int v = 0; v < kV; ++v) s[0][i][v] = vfma(wv, xv[v], s[0][i][v]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int v = 0; v < kV; ++v) {
      vec total = s[0][i][v];
      for (int u = 1; u < U; ++u) total = vadd(total, s[u][i][v]);
      acc[live[i]][v] = total;
    }
}

inline void accumulate_any(int count, const float* panel, const int* live, const float* base, const int64_t* offsets,
                           int64_t t0, int64_t t1, vec (*acc)[kV]) {
  switch (count) {
    case 1: return accumulate<1>(panel, live, base, offsets, t0, t1, acc);
    case 2: return accumulate<2>(panel, live, base, offsets, t0, t1, acc);
    case 3: return accumulate<3>(panel, live, base, offsets, t0, t1, acc);
    case 4: return accumulate<4>(panel, live, base, offsets, t0, t1, acc);
    case 5: return accumulate<5>(panel, live, base, offsets, t0, t1, acc);
    case 6: return accumulate<6>(panel, live, base, offsets, t0, t1, acc);
    case 7: return accumulate<7>(panel, live, base, offsets, t0, t1, acc);
    default: return accumulate<kQ>(panel, live, base, offsets, t0, t1, acc);
  }
}

// Which of the kT slots from `first` are output positions (bit l): inside the plane and, for direct tiles,
// not in the wp - ow columns of a padded row that no output position has.
uint32_t tile_lanes(const ConvGeometry& g, int64_t first) {
  uint32_t lanes = 0;
  for (int64_t l = 0; l < kT && first + l < g.slots(); ++l)
    if ((first + l) % g.row_slots() < g.ow) lanes |= 1u << l;
  return lanes;
}

// The output channels of panel `pb` at one tile of image n; `base` is the tile's first input (direct) or
// its gathered buffer.
void conv_tile(const ConvProblem& p, const float* base, uint32_t lanes, int64_t n, int64_t tile, int64_t pb) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.taps();
  const int64_t j0 = pb * kQ;
  const int channels = static_cast<int>(std::min<int64_t>(kQ, g.m - j0));
  const float* panel = p.panels + pb * taps * kQ;
  vec acc[kQ][kV];
  uint32_t fired[kQ];
  int live[kQ];
  for (int q = 0; q < kQ; ++q) {
    for (int v = 0; v < kV; ++v) acc[q][v] = vzero();
    fired[q] = ~lanes;  // slots that are no output position never count as alive
    live[q] = q;
  }
  int alive = channels;
  int64_t t0 = 0;
  for (int64_t c = 0; c <= p.count && alive > 0; ++c) {
    const int64_t t1 = c < p.count ? p.stages[c] : taps;
    accumulate_any(alive, panel, live, base, p.offsets, t0, t1, acc);
    t0 = t1;
    if (c == p.count) break;
    const vec scale = vset1(p.scale[c]);
    int kept = 0;
    for (int i = 0; i < alive; ++i) {
      const int q = live[i];
      const vec bias = vset1(p.bias[j0 + q]);
      const vec bound = vset1(p.tau[j0 + q] * p.factor[c]);
      for (int v = 0; v < kV; ++v) fired[q] |= vless(vadd(vmul(acc[q][v], scale), bias), bound) << (v * kLanes);
      if ((fired[q] & lanes) != lanes) live[kept++] = q;
    }
    alive = kept;
  }
  for (int q = 0; q < channels; ++q) {
    float* out = p.staged + (n * g.m + j0 + q) * g.tiles() * kT + tile * kT;
    const bool all_fired = (fired[q] & lanes) == lanes;
    const vec bias = vset1(p.bias[j0 + q]);
    for (int v = 0; v < kV; ++v)
      vstore(out + v * kLanes, all_fired ? vzero() : vrelu_kept(acc[q][v], bias, ~fired[q] >> (v * kLanes)));
  }
}

// Task `index`: a run of kTilesPerTask tiles of one image, for a run of panels (panels outer, so a panel's
// weights are read once per run of tiles).
void conv_task(void* data, size_t index) {
  const ConvProblem& p = *static_cast<const ConvProblem*>(data);
  const ConvGeometry& g = p.g;
  const int64_t taps = g.taps();
  const int64_t panel_chunk = static_cast<int64_t>(index) % p.panel_chunks;
  const int64_t tile_chunk = static_cast<int64_t>(index) / p.panel_chunks;
  const int64_t n = tile_chunk / p.tile_chunks;
  const int64_t first_tile = (tile_chunk % p.tile_chunks) * kTilesPerTask;
  const int64_t last_tile = std::min(g.tiles(), first_tile + kTilesPerTask);
  const int64_t panels = (g.m + kQ - 1) / kQ;
  const int64_t first_panel = panel_chunk * p.panels_per_task;
  const int64_t last_panel = std::min(panels, first_panel + p.panels_per_task);
  const float* image = p.xp + n * g.c * g.plane();
  uint32_t lanes[kTilesPerTask];
  std::vector<float> gathered(g.direct ? 0 : static_cast<size_t>((last_tile - first_tile) * taps * kT), 0.0f);
  for (int64_t tile = first_tile; tile < last_tile; ++tile) {
    lanes[tile - first_tile] = tile_lanes(g, tile * kT);
    if (g.direct) continue;
    float* buffer = gathered.data() + (tile - first_tile) * taps * kT;
    for (int64_t l = 0; l < kT; ++l) {
      if (!((lanes[tile - first_tile] >> l) & 1u)) continue;
      const int64_t y = (tile * kT + l) / g.ow, x = (tile * kT + l) % g.ow;
      const float* corner = image + y * g.sh * g.wp + x * g.sw;
      for (int64_t t = 0; t < taps; ++t) buffer[t * kT + l] = corner[p.gather[t]];
    }
  }
  for (int64_t pb = first_panel; pb < last_panel; ++pb)
    for (int64_t tile = first_tile; tile < last_tile; ++tile) {
      const float* base = g.direct ? image + tile * kT : gathered.data() + (tile - first_tile) * taps * kT;
      conv_tile(p, base, lanes[tile - first_tile], n, tile, pb);
    }
}

struct ExPruneConvKernel {
  int64_t m_;
  std::vector<int64_t> checkpoints_;
  std::vector<int64_t> strides_, pads_, dilations_;
  ConvPanels panels_;

  ExPruneConvKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    m_ = kernel_info.GetAttribute<int64_t>("m");
    checkpoints_ = read_checkpoints(kernel_info, m_, "ExPruneConvRelu");
    strides_ = kernel_info.GetAttributes<int64_t>("strides");
    pads_ = kernel_info.GetAttributes<int64_t>("pads");
    dilations_ = kernel_info.GetAttributes<int64_t>("dilations");
    bool valid = strides_.size() == 2 && dilations_.size() == 2 && pads_.size() == 4;
    for (int64_t v : strides_) valid = valid && v >= 1;
    for (int64_t v : dilations_) valid = valid && v >= 1;
    for (int64_t v : pads_) valid = valid && v >= 0;
    if (!valid) ORT_CXX_API_THROW("ExPruneConvRelu: 2 strides and dilations >= 1, 4 pads >= 0", ORT_INVALID_ARGUMENT);
    int is_constant = 0;
    Ort::ConstValue weight = kernel_info.GetTensorConstantInput(1, &is_constant);
    if (is_constant) {
      const std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() == 4) panels_.pack(weight.GetTensorData<float>(), shape[0], shape[1] * shape[2] * shape[3]);
    }
  }

  ConvGeometry geometry(const std::vector<int64_t>& x, const std::vector<int64_t>& w) const {
    if (x.size() != 4 || w.size() != 4 || x[1] != w[1])
      ORT_CXX_API_THROW("ExPruneConvRelu: X [N, C, H, W] and W [M, C, kh, kw] disagree", ORT_INVALID_ARGUMENT);
    ConvGeometry g{x[0], x[1], x[2], x[3], w[0], w[2], w[3], strides_[0], strides_[1], dilations_[0], dilations_[1],
                   pads_[0], pads_[1], pads_[2], pads_[3], 0, 0, 0, 0, strides_[0] == 1 && strides_[1] == 1};
    g.oh = (g.h + g.pt + g.pb - g.dh * (g.kh - 1) - 1) / g.sh + 1;
    g.ow = (g.w + g.pl + g.pr - g.dw * (g.kw - 1) - 1) / g.sw + 1;
    if (g.oh < 1 || g.ow < 1) ORT_CXX_API_THROW("ExPruneConvRelu: empty output", ORT_INVALID_ARGUMENT);
    if (checkpoints_.back() >= g.c)
      ORT_CXX_API_THROW("ExPruneConvRelu: checkpoints must stay below C", ORT_INVALID_ARGUMENT);
    g.wp = g.w + g.pl + g.pr;
    // a direct tile reads kT consecutive floats at every tap: extra zero rows keep the last tile inside
    g.hp = g.h + g.pt + g.pb + (g.direct ? (kT + g.wp - 1) / g.wp + 1 : 0);
    return g;
  }

  void Compute(OrtKernelContext* raw_context) {
    g_conv_calls.fetch_add(1, std::memory_order_relaxed);
    Ort::KernelContext context(raw_context);
    Ort::ConstValue x_value = context.GetInput(0);
    Ort::ConstValue w_value = context.GetInput(1);
    const ConvGeometry g = geometry(x_value.GetTensorTypeAndShapeInfo().GetShape(),
                                    w_value.GetTensorTypeAndShapeInfo().GetShape());
    float* y = context.GetOutput(0, {g.n, g.m, g.oh, g.ow}).GetTensorMutableData<float>();
    if (g.n == 0 || g.m == 0) return;
    const float* x = x_value.GetTensorData<float>();
    const int64_t* perm = context.GetInput(4).GetTensorData<int64_t>();

    std::vector<float> padded(static_cast<size_t>(g.n * g.c * g.plane()), 0.0f);
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t c = 0; c < g.c; ++c) {
        const float* source = x + (n * g.c + perm[c]) * g.h * g.w;
        float* target = padded.data() + (n * g.c + c) * g.plane() + g.pt * g.wp + g.pl;
        for (int64_t r = 0; r < g.h; ++r) std::memcpy(target + r * g.wp, source + r * g.w, g.w * sizeof(float));
      }
    const int64_t taps = g.taps();
    const float* w = w_value.GetTensorData<float>();
    ConvPanels local;
    const ConvPanels* panels = &panels_;
    if (!panels_.ready(w, g.m, taps)) {
      local.pack(w, g.m, taps);
      panels = &local;
    }
    std::vector<int64_t> offsets(static_cast<size_t>(taps)), gather(static_cast<size_t>(taps));
    for (int64_t c = 0, t = 0; c < g.c; ++c)
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b, ++t) {
          gather[t] = c * g.plane() + a * g.dh * g.wp + b * g.dw;
          offsets[t] = g.direct ? gather[t] : t * kT;
        }
    const int64_t per_tap = g.kh * g.kw;
    std::vector<int64_t> stages(checkpoints_.size());
    for (size_t c = 0; c < checkpoints_.size(); ++c) stages[c] = checkpoints_[c] * per_tap;
    std::vector<float> scale, factor;
    checkpoint_factors(g.c, checkpoints_, scale, factor);
    // tasks: runs of kTilesPerTask tiles per image, and the panels split too when that leaves fewer than 16
    const int64_t panels_total = (g.m + kQ - 1) / kQ;
    const int64_t tile_chunks = (g.tiles() + kTilesPerTask - 1) / kTilesPerTask;
    const int64_t panel_chunks = std::min(panels_total, std::max<int64_t>(1, 16 / (g.n * tile_chunks)));
    const int64_t panels_per_task = (panels_total + panel_chunks - 1) / panel_chunks;
    std::vector<float> staged(static_cast<size_t>(g.n * g.m * g.tiles() * kT));
    ConvProblem problem{g, padded.data(), panels->values.data(), offsets.data(), gather.data(),
                        context.GetInput(2).GetTensorData<float>(), context.GetInput(3).GetTensorData<float>(),
                        staged.data(),
                        stages.data(), scale.data(), factor.data(), static_cast<int64_t>(stages.size()),
                        tile_chunks, (panels_total + panels_per_task - 1) / panels_per_task, panels_per_task};
    const size_t tasks = static_cast<size_t>(g.n * tile_chunks * problem.panel_chunks);
    if (tasks == 1 || g.n * g.oh * g.ow * g.m * taps < (int64_t{1} << 18)) {
      for (size_t task = 0; task < tasks; ++task) conv_task(&problem, task);
    } else {
      context.ParallelFor(conv_task, tasks, 0, &problem);
    }
    for (int64_t plane = 0; plane < g.n * g.m; ++plane)  // slots to output positions
      for (int64_t r = 0; r < g.oh; ++r)
        std::memcpy(y + (plane * g.oh + r) * g.ow, staged.data() + plane * g.tiles() * kT + r * g.row_slots(),
                    static_cast<size_t>(g.ow) * sizeof(float));
  }
};

struct ExPruneConvOp : Ort::CustomOpBase<ExPruneConvOp, ExPruneConvKernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new ExPruneConvKernel(api, info); }
  const char* GetName() const { return "ExPruneConvRelu"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 4 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

const OrtCustomOp* exprune_conv_op() {
  static ExPruneConvOp op;
  return &op;
}

extern "C" __attribute__((visibility("default"))) int64_t graphopt_exprune_conv_calls() { return g_conv_calls.load(); }
