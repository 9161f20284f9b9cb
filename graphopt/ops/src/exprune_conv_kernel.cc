// Native kernel of graphopt.ExPruneConvRelu (see graphopt/ops/exprune_conv.py for the semantics).
//
// Inputs X [N, C, H, W], W [M, C, kh, kw] (input channels permuted, probe channels first), B [M], Tau [M],
// Perm [C]. Output position (n, j, y, x) sums the C·kh·kw products of its receptive field channel by
// channel (all kh·kw taps of channel c before channel c + 1), so the probe of k channels is a prefix of the
// sum; at each checkpoint k the partial sum S gives score = S * (float(C) / float(k)) + B[j], and
// score < Tau[j] * f_k zeroes the output and stops its sum. A position that never fires gets
// max(S_C + B[j], 0).
//
// Layout: X' = X[:, Perm] is copied once per call into a zero-padded buffer (pads folded in, extra zero rows
// so whole vectors stay inside), and W is packed, once when the kernel is created for a constant W, into panels
// of kQ output channels, tap-major (panel[t][q] = W[j0 + q, t], t = (c·kh + a)·kw + b). Output positions are
// cut into tiles of V vectors of kLanes positions (V = 1..3, chosen per layer by the slots it computes,
// choose_tiles): square tiles of V rows where output rows fill most of a vector, strips of consecutive
// positions elsewhere. With stride 1 a vector's inputs at every tap are kLanes consecutive floats of the buffer
// (a direct convolution, no im2col); strided convolutions gather each tile's inputs first. For each panel a tile
// keeps kQ · V vectors of sums in registers: per tap, V loads of inputs and one broadcast weight per channel
// feed the FMAs. A task walks its tiles and panels one block of input channels at a time (about kBlockTaps
// taps: a block's inputs and weights stay in the L1 cache), keeping each tile's sums between blocks. At a
// checkpoint each channel's lanes are tested at once (the same float32 score and boundary as the function
// body, one operation at a time); a channel whose lanes have all fired leaves the tile's later taps. So the
// saving comes from output channels that are predicted negative over a whole tile of neighbouring positions,
// which is how ReLU maps of trained CNNs are zero (in regions), while scattered single positions are computed
// along and zeroed. Tasks (runs of tiles, and of panels where the tiles are few) are split over onnxruntime's
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
constexpr int kMaxV = kLanes == 16 ? 3 : 1;  // vectors per tile: kQ · V sums stay in registers (32 or 16)
constexpr int64_t kTilesPerTask = 8;       // tiles a task walks for every panel it holds
constexpr int64_t kBlockTaps = 128;        // taps (input channels x kernel taps) per block of a task's loops

struct ConvGeometry {
  int64_t n, c, h, w;          // input
  int64_t m, kh, kw;           // weight
  int64_t sh, sw, dh, dw;      // strides, dilations
  int64_t pt, pl, pb, pr;      // pads
  int64_t oh, ow;              // output
  int64_t hp, wp;              // padded buffer plane
  bool direct;                 // stride 1: a vector's inputs at a tap are consecutive floats of the buffer
  bool square;                 // tiles of V rows x kLanes columns (else V · kLanes consecutive slots)
  int64_t vectors;             // V, vectors of kLanes positions per tile

  int64_t taps() const { return c * kh * kw; }
  int64_t plane() const { return hp * wp; }
  // Flat tiles run over slots: output positions y · ow + x (gathered), or positions of the padded plane
  // y · wp + x (direct: its wp - ow columns hold no output). Square tiles cover V rows of kLanes columns.
  int64_t row_slots() const { return square ? tiles_x() * kLanes : (direct ? wp : ow); }
  int64_t tile_slots() const { return vectors * kLanes; }
  int64_t tiles_x() const { return (ow + kLanes - 1) / kLanes; }
  int64_t tiles() const {
    return square ? (oh + vectors - 1) / vectors * tiles_x() : (oh * row_slots() + tile_slots() - 1) / tile_slots();
  }
  int64_t staged_plane() const { return tiles() * tile_slots(); }  // outputs, vector v at vector_slot(t, v)
  int64_t vector_slot(int64_t tile, int64_t v) const {
    return square ? ((tile / tiles_x()) * vectors + v) * row_slots() + (tile % tiles_x()) * kLanes
                  : tile * tile_slots() + v * kLanes;
  }
  // Lane l of vector v of `tile` as an output position (y, x); false where it is none.
  bool position(int64_t tile, int64_t v, int64_t l, int64_t* y, int64_t* x) const {
    const int64_t slot = vector_slot(tile, v) + l;
    *y = slot / row_slots();
    *x = slot % row_slots();
    return *y < oh && *x < ow;
  }
  // Direct tiles: the buffer offset of a tile's first input. Any tile: the offset between its vectors' inputs
  // (gathered tiles hold [taps][V · kLanes]).
  int64_t input_offset(int64_t tile) const {
    return square ? (tile / tiles_x()) * vectors * wp + (tile % tiles_x()) * kLanes : tile * tile_slots();
  }
  int64_t input_stride() const { return direct && square ? wp : kLanes; }
};

// The tile shape that computes the fewest slots, weighted by what its vectors cost: V vectors (kMaxV down to
// 1), square where rows fill most of a vector (more neighbouring positions per tile than a strip), else flat.
// Fewer vectors per tile cost more per slot (each broadcast weight feeds fewer FMAs): measured on 3x3 layers
// at 56x56 to 7x7 (AVX-512), V = 1 ran at half the speed per slot of V = 3, V = 2 at about 0.9.
void choose_tiles(ConvGeometry& g) {
  constexpr double kSpeed[4] = {0.0, 0.5, 0.9, 1.0};
  double best = -1.0;
  for (int64_t v = kMaxV; v >= 1; --v) {
    ConvGeometry trial = g;
    trial.vectors = v;
    trial.square = v > 1 && 4 * g.ow >= 3 * kLanes;
    const double cost = static_cast<double>(trial.tiles() * trial.tile_slots()) / (kMaxV == 1 ? 1.0 : kSpeed[v]);
    if (best < 0.0 || cost < best) {
      best = cost;
      g.vectors = v;
      g.square = trial.square;
    }
  }
}

struct ConvProblem {
  ConvGeometry g;
  const float* xp;          // X' padded: [N, C, hp, wp]
  const float* panels;
  const int64_t* offsets;   // per tap t: its offset from a tile's first input (direct), or t · V · kLanes
  const int64_t* gather;    // per tap t: its offset in the buffer from an output position's corner
  const float* bias;
  const float* tau;
  float* staged;            // [N, M, staged_plane]: each tile's outputs (ConvGeometry::vector_slot)
  const int64_t* stages;    // tap count at each checkpoint (k · kh · kw)
  const float* scale;
  const float* factor;
  int64_t count;            // checkpoints
  int64_t tile_chunks, panel_chunks, panels_per_task;
  std::vector<int64_t> blocks;  // channel_blocks
};

// acc[live[i]][v] += Σ_t panel[t][live[i]] · x[offsets[t] + v · kLanes] over taps [t0, t1), for the Q channels
// `live` of a panel. Few channels get several accumulators each (over alternating taps) to hide the FMA latency.
template <int Q, int V>
inline void accumulate(const float* panel, const int* live, const float* base, const int64_t* offsets, int64_t stride,
                       int64_t t0, int64_t t1, vec (*acc)[V]) {
  constexpr int U = Q * V >= 8 ? 1 : (Q * V >= 4 ? 2 : 4);
  vec s[U][Q][V];
  const float* w[Q];
  for (int i = 0; i < Q; ++i) {
    w[i] = panel + live[i];
    for (int v = 0; v < V; ++v) {
      s[0][i][v] = acc[live[i]][v];
      for (int u = 1; u < U; ++u) s[u][i][v] = vzero();
    }
  }
  int64_t t = t0;
  for (; t + U <= t1; t += U)
    for (int u = 0; u < U; ++u) {
      vec xv[V];
      for (int v = 0; v < V; ++v) xv[v] = in_register(vload(base + offsets[t + u] + v * stride));
      for (int i = 0; i < Q; ++i) {
        const vec wv = vset1(w[i][(t + u) * kQ]);
        for (int v = 0; v < V; ++v) s[u][i][v] = vfma(wv, xv[v], s[u][i][v]);
      }
    }
  for (; t < t1; ++t) {
    vec xv[V];
    for (int v = 0; v < V; ++v) xv[v] = in_register(vload(base + offsets[t] + v * stride));
    for (int i = 0; i < Q; ++i) {
      const vec wv = vset1(w[i][t * kQ]);
      for (int v = 0; v < V; ++v) s[0][i][v] = vfma(wv, xv[v], s[0][i][v]);
    }
  }
  for (int i = 0; i < Q; ++i)
    for (int v = 0; v < V; ++v) {
      vec total = s[0][i][v];
      for (int u = 1; u < U; ++u) total = vadd(total, s[u][i][v]);
      acc[live[i]][v] = total;
    }
}

template <int V>
inline void accumulate_any(int count, const float* panel, const int* live, const float* base, const int64_t* offsets,
                           int64_t stride, int64_t t0, int64_t t1, vec (*acc)[V]) {
  switch (count) {
    case 1: return accumulate<1, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 2: return accumulate<2, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 3: return accumulate<3, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 4: return accumulate<4, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 5: return accumulate<5, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 6: return accumulate<6, V>(panel, live, base, offsets, stride, t0, t1, acc);
    case 7: return accumulate<7, V>(panel, live, base, offsets, stride, t0, t1, acc);
    default: return accumulate<kQ, V>(panel, live, base, offsets, stride, t0, t1, acc);
  }
}

// Which lanes of a tile are output positions: bit v · kLanes + l for lane l of vector v.
uint64_t tile_lanes(const ConvGeometry& g, int64_t tile) {
  uint64_t lanes = 0;
  int64_t y, x;
  for (int64_t v = 0; v < g.vectors; ++v)
    for (int64_t l = 0; l < kLanes; ++l)
      if (g.position(tile, v, l, &y, &x)) lanes |= uint64_t{1} << (v * kLanes + l);
  return lanes;
}

// The sums and decisions of one panel's output channels at one tile, kept between blocks of input channels.
template <int V>
struct TileState {
  vec acc[kQ][V];
  uint64_t fired[kQ];  // lanes decided zero (and lanes that are no output position)
  int live[kQ];        // the channels with a lane not yet fired, `alive` of them
  int alive;
};

template <int V>
void start_tile(const ConvGeometry& g, TileState<V>& s, uint64_t lanes, int64_t pb) {
  for (int q = 0; q < kQ; ++q) {
    for (int v = 0; v < V; ++v) s.acc[q][v] = vzero();
    s.fired[q] = ~lanes;
    s.live[q] = q;
  }
  s.alive = static_cast<int>(std::min<int64_t>(kQ, g.m - pb * kQ));  // the panel's channels
}

// Checkpoint c of the live channels of panel `pb`: the lanes whose score falls below the boundary fire, and a
// channel whose lanes have all fired leaves the tile.
template <int V>
void test_tile(const ConvProblem& p, TileState<V>& s, uint64_t lanes, int64_t pb, int64_t c) {
  const vec scale = vset1(p.scale[c]);
  int kept = 0;
  for (int i = 0; i < s.alive; ++i) {
    const int q = s.live[i];
    const int64_t j = pb * kQ + q;
    const vec bias = vset1(p.bias[j]);
    const vec bound = vset1(p.tau[j] * p.factor[c]);
    for (int v = 0; v < V; ++v)
      s.fired[q] |= static_cast<uint64_t>(vless(vadd(vmul(s.acc[q][v], scale), bias), bound)) << (v * kLanes);
    if ((s.fired[q] & lanes) != lanes) s.live[kept++] = q;
  }
  s.alive = kept;
}

template <int V>
void finish_tile(const ConvProblem& p, const TileState<V>& s, uint64_t lanes, int64_t n, int64_t tile, int64_t pb) {
  const ConvGeometry& g = p.g;
  const int channels = static_cast<int>(std::min<int64_t>(kQ, g.m - pb * kQ));
  for (int q = 0; q < channels; ++q) {
    float* out = p.staged + (n * g.m + pb * kQ + q) * g.staged_plane();
    const bool all_fired = (s.fired[q] & lanes) == lanes;
    const vec bias = vset1(p.bias[pb * kQ + q]);
    for (int v = 0; v < V; ++v)
      vstore(out + g.vector_slot(tile, v), all_fired ? vzero()
             : vrelu_kept(s.acc[q][v], bias, static_cast<uint32_t>(~s.fired[q] >> (v * kLanes))));
  }
}

// The input channels where a task's loops pause: every kBlockTaps taps or so (a block's inputs of one tile and
// weights of every panel stay in the L1 cache) and at every checkpoint.
std::vector<int64_t> channel_blocks(const ConvProblem& p) {
  const ConvGeometry& g = p.g;
  const int64_t per_tap = g.kh * g.kw;
  const int64_t step = std::max<int64_t>(1, kBlockTaps / per_tap);
  std::vector<int64_t> ends;
  for (int64_t c = step; c < g.c; c += step) ends.push_back(c);
  for (int64_t c = 0; c < p.count; ++c) ends.push_back(p.stages[c] / per_tap);
  ends.push_back(g.c);
  std::sort(ends.begin(), ends.end());
  ends.erase(std::unique(ends.begin(), ends.end()), ends.end());
  return ends;
}

// Gathered tiles (strides): each tile's inputs copied to [taps][V · kLanes], so every tap reads whole vectors.
std::vector<float> gather_tiles(const ConvProblem& p, const float* image, int64_t first_tile, int64_t last_tile) {
  const ConvGeometry& g = p.g;
  const int64_t taps = g.taps();
  std::vector<float> gathered(static_cast<size_t>((last_tile - first_tile) * taps * g.tile_slots()), 0.0f);
  int64_t y, x;
  for (int64_t tile = first_tile; tile < last_tile; ++tile) {
    float* buffer = gathered.data() + (tile - first_tile) * taps * g.tile_slots();
    for (int64_t v = 0; v < g.vectors; ++v)
      for (int64_t l = 0; l < kLanes; ++l) {
        if (!g.position(tile, v, l, &y, &x)) continue;
        const float* corner = image + y * g.sh * g.wp + x * g.sw;
        for (int64_t t = 0; t < taps; ++t) buffer[t * g.tile_slots() + v * kLanes + l] = corner[p.gather[t]];
      }
  }
  return gathered;
}

// Task `index`: a run of kTilesPerTask tiles of one image, for a run of panels. Input channels are walked in
// blocks (channel_blocks), each block over every tile and panel, the sums kept in TileStates between blocks
// and tested where a block ends at a checkpoint.
template <int V>
void conv_task(void* data, size_t index) {
  const ConvProblem& p = *static_cast<const ConvProblem*>(data);
  const ConvGeometry& g = p.g;
  const int64_t taps = g.taps(), per_tap = g.kh * g.kw;
  const int64_t panel_chunk = static_cast<int64_t>(index) % p.panel_chunks;
  const int64_t tile_chunk = static_cast<int64_t>(index) / p.panel_chunks;
  const int64_t n = tile_chunk / p.tile_chunks;
  const int64_t first_tile = (tile_chunk % p.tile_chunks) * kTilesPerTask;
  const int64_t tiles = std::min(g.tiles(), first_tile + kTilesPerTask) - first_tile;
  const int64_t first_panel = panel_chunk * p.panels_per_task;
  const int64_t panels = std::min((g.m + kQ - 1) / kQ, first_panel + p.panels_per_task) - first_panel;
  const float* image = p.xp + n * g.c * g.plane();
  const std::vector<float> gathered = g.direct ? std::vector<float>() : gather_tiles(p, image, first_tile,
                                                                                     first_tile + tiles);
  uint64_t lanes[kTilesPerTask];
  const float* base[kTilesPerTask];
  for (int64_t t = 0; t < tiles; ++t) {
    lanes[t] = tile_lanes(g, first_tile + t);
    base[t] = g.direct ? image + g.input_offset(first_tile + t) : gathered.data() + t * taps * g.tile_slots();
  }
  std::vector<TileState<V>> states(static_cast<size_t>(tiles * panels));
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t k = 0; k < panels; ++k)
      start_tile(g, states[t * panels + k], lanes[t], first_panel + k);
  int64_t begin = 0, stage = 0;
  for (const int64_t end : p.blocks) {
    const bool checkpoint = stage < p.count && p.stages[stage] == end * per_tap;
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t k = 0; k < panels; ++k) {
        TileState<V>& s = states[t * panels + k];
        if (s.alive == 0) continue;
        accumulate_any<V>(s.alive, p.panels + (first_panel + k) * taps * kQ, s.live, base[t], p.offsets,
                          g.input_stride(), begin * per_tap, end * per_tap, s.acc);
        if (checkpoint) test_tile(p, s, lanes[t], first_panel + k, stage);
      }
    stage += checkpoint;
    begin = end;
  }
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t k = 0; k < panels; ++k)
      finish_tile(p, states[t * panels + k], lanes[t], n, first_tile + t, first_panel + k);
}

struct ExPruneConvKernel {
  int64_t m_;
  std::vector<int64_t> checkpoints_;
  std::vector<int64_t> strides_, pads_, dilations_;
  Panels panels_;  // W [M, C, kh, kw] as panels of kQ output channels, tap-major (depth C · kh · kw)

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
      const int64_t taps = shape.size() == 4 ? shape[1] * shape[2] * shape[3] : 0;
      if (taps > 0) panels_.pack(weight.GetTensorData<float>(), shape[0], taps, taps, kQ);
    }
  }

  ConvGeometry geometry(const std::vector<int64_t>& x, const std::vector<int64_t>& w) const {
    if (x.size() != 4 || w.size() != 4 || x[1] != w[1])
      ORT_CXX_API_THROW("ExPruneConvRelu: X [N, C, H, W] and W [M, C, kh, kw] disagree", ORT_INVALID_ARGUMENT);
    ConvGeometry g{x[0], x[1], x[2], x[3], w[0], w[2], w[3], strides_[0], strides_[1], dilations_[0], dilations_[1],
                   pads_[0], pads_[1], pads_[2], pads_[3], 0, 0, 0, 0, strides_[0] == 1 && strides_[1] == 1, false, 1};
    g.oh = (g.h + g.pt + g.pb - g.dh * (g.kh - 1) - 1) / g.sh + 1;
    g.ow = (g.w + g.pl + g.pr - g.dw * (g.kw - 1) - 1) / g.sw + 1;
    if (g.oh < 1 || g.ow < 1) ORT_CXX_API_THROW("ExPruneConvRelu: empty output", ORT_INVALID_ARGUMENT);
    if (checkpoints_.back() >= g.c)
      ORT_CXX_API_THROW("ExPruneConvRelu: checkpoints must stay below C", ORT_INVALID_ARGUMENT);
    g.wp = g.w + g.pl + g.pr;
    // square tiles where rows fill most of a vector: they hold more neighbouring positions than a strip
    choose_tiles(g);
    // direct tiles read whole vectors past the last output row and column: extra zero rows keep them inside
    g.hp = g.h + g.pt + g.pb + (g.direct ? g.vectors + (g.tile_slots() + g.wp - 1) / g.wp + 1 : 0);
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
    Panels local;
    const Panels* panels = &panels_;
    if (!panels_.ready(w, g.m, taps)) {
      local.pack(w, g.m, taps, taps, kQ);
      panels = &local;
    }
    std::vector<int64_t> offsets(static_cast<size_t>(taps)), gather(static_cast<size_t>(taps));
    for (int64_t c = 0, t = 0; c < g.c; ++c)
      for (int64_t a = 0; a < g.kh; ++a)
        for (int64_t b = 0; b < g.kw; ++b, ++t) {
          gather[t] = c * g.plane() + a * g.dh * g.wp + b * g.dw;
          offsets[t] = g.direct ? gather[t] : t * g.tile_slots();
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
    std::vector<float> staged(static_cast<size_t>(g.n * g.m * g.staged_plane()));
    ConvProblem problem{g, padded.data(), panels->values.data(), offsets.data(), gather.data(),
                        context.GetInput(2).GetTensorData<float>(), context.GetInput(3).GetTensorData<float>(),
                        staged.data(), stages.data(), scale.data(), factor.data(), static_cast<int64_t>(stages.size()),
                        tile_chunks, (panels_total + panels_per_task - 1) / panels_per_task, panels_per_task, {}};
    problem.blocks = channel_blocks(problem);
    const size_t tasks = static_cast<size_t>(g.n * tile_chunks * problem.panel_chunks);
    void (*run)(void*, size_t) = g.vectors == 3 ? conv_task<kMaxV == 3 ? 3 : 1>
                                 : g.vectors == 2 ? conv_task<kMaxV == 3 ? 2 : 1> : conv_task<1>;
    if (tasks == 1 || g.n * g.oh * g.ow * g.m * taps < (int64_t{1} << 18)) {
      for (size_t task = 0; task < tasks; ++task) run(&problem, task);
    } else {
      context.ParallelFor(run, tasks, 0, &problem);
    }
    for (int64_t plane = 0; plane < g.n * g.m; ++plane)  // slots to output positions
      for (int64_t r = 0; r < g.oh; ++r)
        std::memcpy(y + (plane * g.oh + r) * g.ow, staged.data() + plane * g.staged_plane() + r * g.row_slots(),
                    static_cast<size_t>(g.ow) * sizeof(float));
  }
};

}  // namespace

const OrtCustomOp* exprune_conv_op() {
  static ExPruneOp<ExPruneConvKernel> op("ExPruneConvRelu");
  return &op;
}

extern "C" __attribute__((visibility("default"))) int64_t graphopt_exprune_conv_calls() { return g_conv_calls.load(); }
