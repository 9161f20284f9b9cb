// Native kernel of graphopt.ExPruneLinearRelu (see graphopt/ops/exprune.py for the semantics).
//
// For every row r of X and neuron j, with checkpoints k_1 = m < k_2 < ... < k_c < d:
//   S = W[j, :k_1] . x'[r, :k_1]; at each checkpoint k the dot product is continued to k (the accumulators
//   carry on, nothing is re-read) and tested: score = S * (float(d) / float(k)) + B[j] < Tau[j] * f_k fires,
//   Y[r, j] = 0, and W[j, k:] is not read for this row. A row that never fires reads the rest of the row:
//   Y[r, j] = max(S_d + B[j], 0). Rows of W are contiguous per neuron, probe prefix first: batch-1 decoding
//   is memory-bound, so the time saved is the skipped tails.
//
// Numerics: the dot products use fused multiply-add in SIMD lanes (explicit intrinsics; a different
// summation order than onnxruntime's MatMul, so a score within rounding of its boundary may decide
// differently, and the exprune pass keeps its thresholds a margin away from the calibration scores it must
// keep). The score and the boundary are single float32 operations, unfused: the library is built with
// -ffp-contract=off, so they round as the function body's Mul, Add and Mul do.
//
// Paths: batch 1 with a constant W (an initializer, as the exprune pass writes it) packs the probe prefixes
// once, when the kernel is created, into panels of kLanes neurons stored transposed (m · n floats), and the
// rest of each row after it contiguously ((d - m) · n floats, Tails; together one copy of W beside it): the
// probes of kPanels panels then cost one broadcast of x' per kPanels FMAs over contiguous memory, like
// onnxruntime's packed GEMV, instead of a load of x' per FMA; the neurons a checkpoint keeps are continued
// four at a time from their packed tails, sharing each load of x'. Without a constant W, batch 1 walks the neurons
// in order, each row from its prefix on, prefetching the probe prefixes a few neurons ahead (a skipped tail
// breaks the hardware prefetcher's stream). Batch > 1 without a constant W takes blocks of up to
// kRowBlock rows and kTile neurons: register tiles of kTile neurons x kTile rows (8 loads feed 16 FMAs)
// over the rows and neurons still undecided, so a tail is read only while some row needs it. Neurons are
// split in chunks over onnxruntime's intra-op thread pool (KernelContext_ParallelFor; serial with one
// thread or little work). x' = X[..., Perm] is gathered once per call.
//
// Exposes RegisterCustomOps (the onnxruntime custom-op library entry point) and graphopt_exprune_calls, a
// counter of Compute calls that lets a test observe whether onnxruntime ran this kernel or the function body
// (graphopt_exprune_conv_calls counts the convolution kernel's).

#include "exprune_common.h"

#include <algorithm>
#include <atomic>
#include <mutex>

namespace {

std::atomic<int64_t> g_calls{0};

constexpr int kTile = 4;        // batch > 1: neurons x rows per micro-kernel call (8 loads feed 16 FMAs)
constexpr int kRowBlock = 32;   // batch > 1: rows whose accumulators a block of kTile neurons keeps at once
constexpr int64_t kPrefetchAhead = 4;  // batch 1, W not constant: neurons ahead whose probe prefix is prefetched
constexpr int64_t kPanels = 4;         // batch 1: probe panels of kLanes neurons computed together
constexpr int64_t kGemmRows = 2;       // from this many rows on, a constant W runs on panels of all of W (Panels)

// acc[q * kTile + r] += w[q][a:b) . x[r][a:b) for Q neurons and R rows: each weight load feeds R FMAs and
// each row load Q. With a single row and neuron, four independent accumulators hide the FMA latency (they
// are folded into acc at the end of the segment).
template <int Q, int R>
inline void dot_tile(const float* const* w, const float* const* x, int64_t a, int64_t b, vec* acc) {
  constexpr int U = Q * R == 1 ? 4 : 1;
  vec s[U][Q][R];
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) {
      s[0][q][r] = acc[q * kTile + r];
      for (int u = 1; u < U; ++u) s[u][q][r] = vzero();
    }
  int64_t i = a;
  for (; i + U * kLanes <= b; i += U * kLanes)
    for (int u = 0; u < U; ++u) {
      vec xv[R];
      for (int r = 0; r < R; ++r) xv[r] = in_register(vload(x[r] + i + u * kLanes));
      for (int q = 0; q < Q; ++q) {
        const vec wv = in_register(vload(w[q] + i + u * kLanes));
        for (int r = 0; r < R; ++r) s[u][q][r] = vfma(wv, xv[r], s[u][q][r]);
      }
    }
  for (; i + kLanes <= b; i += kLanes)
    for (int q = 0; q < Q; ++q) {
      const vec wv = vload(w[q] + i);
      for (int r = 0; r < R; ++r) s[0][q][r] = vfma(wv, vload(x[r] + i), s[0][q][r]);
    }
  if (i < b)
    for (int q = 0; q < Q; ++q) {
      const vec wv = vload_part(w[q] + i, b - i);
      for (int r = 0; r < R; ++r) s[0][q][r] = vfma(wv, vload_part(x[r] + i, b - i), s[0][q][r]);
    }
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) {
      vec total = s[0][q][r];
      for (int u = 1; u < U; ++u) total = vadd(total, s[u][q][r]);
      acc[q * kTile + r] = total;
    }
}

template <int Q>
inline void dot_tile_rows(int rows, const float* const* w, const float* const* x, int64_t a, int64_t b, vec* acc) {
  switch (rows) {
    case 1: return dot_tile<Q, 1>(w, x, a, b, acc);
    case 2: return dot_tile<Q, 2>(w, x, a, b, acc);
    case 3: return dot_tile<Q, 3>(w, x, a, b, acc);
    default: return dot_tile<Q, 4>(w, x, a, b, acc);
  }
}

// dot_tile for 1..kTile neurons and 1..kTile rows chosen at run time.
inline void dot_tile_any(int neurons, int rows, const float* const* w, const float* const* x, int64_t a, int64_t b,
                         vec* acc) {
  switch (neurons) {
    case 1: return dot_tile_rows<1>(rows, w, x, a, b, acc);
    case 2: return dot_tile_rows<2>(rows, w, x, a, b, acc);
    case 3: return dot_tile_rows<3>(rows, w, x, a, b, acc);
    default: return dot_tile_rows<4>(rows, w, x, a, b, acc);
  }
}

inline void prefetch_lines(const float* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(float)); offset += 64)
    __builtin_prefetch(bytes + offset, 0, 3);
}

// The rest of each row of a constant W [n, d] after its probe prefix, packed once when the kernel is created:
// values[j * (d - m) + i - m] = W[j, i] for i >= m. Kept tails are one stream where nothing is skipped and
// skipped ones leave gaps of whole tails, not of tails and prefixes: at batch 1, 768->3072 with nothing
// skipped, the kernel ran at 0.93x of dense reading W's own rows and at 0.98x reading these.
struct Tails : Packed {
  void pack(const float* w, int64_t rows, int64_t columns, int64_t m) {
    const int64_t width = columns - m;
    values.resize(static_cast<size_t>(rows * width));
    for (int64_t j = 0; j < rows; ++j) std::memcpy(&values[j * width], w + j * columns + m, width * sizeof(float));
    source = w;
    n = rows;
    d = columns;
  }
};

// One call's operands; a chunk of neurons is computed by run_chunk, from a thread of onnxruntime's pool.
struct Problem {
  const float* x;  // gathered rows x' [rows, d]
  const float* w;
  const float* panel;  // packed probe prefixes (see Panels), or nullptr
  const float* tails;  // with panel: the rest of each row, packed (see Tails)
  const float* bias;
  const float* tau;
  float* y;        // [rows, n]
  int64_t rows, n, d;
  const int64_t* ks;   // checkpoints
  const float* scale;  // float(d) / float(k)
  const float* factor; // f_k
  int64_t count;       // number of checkpoints
  int64_t chunk;       // neurons per task
};

inline bool fires(const Problem& p, int64_t c, float partial, int64_t j) {
  const float scaled = partial * p.scale[c];
  const float score = scaled + p.bias[j];
  const float bound = p.tau[j] * p.factor[c];
  return score < bound;
}

inline float relu_output(float total, float bias) {
  const float pre = total + bias;
  return pre > 0.0f ? pre : 0.0f;
}

// Batch 1 with packed probes: the probe prefixes of kPanels * kLanes neurons are stored transposed, panel by
// panel (panel[(j / kLanes) * m + i][j % kLanes] = W[j, i]), so one broadcast of x'[i] feeds kPanels FMAs over
// contiguous weights, as onnxruntime's packed GEMV does; the rows that survive a checkpoint are then read in
// groups of four, from their packed tails (Tails), sharing each load of x'.
template <int Q>
inline void panel_probe(const float* panel, const float* x, int64_t m, int64_t panel0, float* out) {
  vec even[Q], odd[Q];
  for (int q = 0; q < Q; ++q) even[q] = odd[q] = vzero();
  const float* base = panel + panel0 * m * kLanes;
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) {
    const vec x0 = vset1(x[i]), x1 = vset1(x[i + 1]);
    for (int q = 0; q < Q; ++q) {
      const float* weights = base + (q * m + i) * kLanes;
      even[q] = vfma(vload(weights), x0, even[q]);
      odd[q] = vfma(vload(weights + kLanes), x1, odd[q]);
    }
  }
  if (i < m) {
    const vec x0 = vset1(x[i]);
    for (int q = 0; q < Q; ++q) even[q] = vfma(vload(base + (q * m + i) * kLanes), x0, even[q]);
  }
  for (int q = 0; q < Q; ++q) vstore(out + q * kLanes, vadd(even[q], odd[q]));
}

inline void panel_probe_any(int panels, const float* panel, const float* x, int64_t m, int64_t panel0, float* out) {
  switch (panels) {
    case 1: return panel_probe<1>(panel, x, m, panel0, out);
    case 2: return panel_probe<2>(panel, x, m, panel0, out);
    case 3: return panel_probe<3>(panel, x, m, panel0, out);
    default: return panel_probe<kPanels>(panel, x, m, panel0, out);
  }
}

// sums[k] += w[k][a:b) . x[a:b) for K rows of W and one row x (two or four accumulators per row of W).
template <int K>
inline void dot_rows(const float* const* w, const float* x, int64_t a, int64_t b, float* sums) {
  constexpr int U = K <= 2 ? 4 : 2;
  vec acc[U][K];
  for (int u = 0; u < U; ++u)
    for (int k = 0; k < K; ++k) acc[u][k] = vzero();
  int64_t i = a;
  for (; i + U * kLanes <= b; i += U * kLanes)
    for (int u = 0; u < U; ++u) {
      const vec xv = in_register(vload(x + i + u * kLanes));
      for (int k = 0; k < K; ++k) acc[u][k] = vfma(vload(w[k] + i + u * kLanes), xv, acc[u][k]);
    }
  for (; i + kLanes <= b; i += kLanes) {
    const vec xv = vload(x + i);
    for (int k = 0; k < K; ++k) acc[0][k] = vfma(vload(w[k] + i), xv, acc[0][k]);
  }
  if (i < b) {
    const vec xv = vload_part(x + i, b - i);
    for (int k = 0; k < K; ++k) acc[0][k] = vfma(vload_part(w[k] + i, b - i), xv, acc[0][k]);
  }
  for (int k = 0; k < K; ++k) {
    vec total = acc[0][k];
    for (int u = 1; u < U; ++u) total = vadd(total, acc[u][k]);
    sums[k] += vsum(total);
  }
}

inline void dot_rows_any(int count, const float* const* w, const float* x, int64_t a, int64_t b, float* sums) {
  switch (count) {
    case 1: return dot_rows<1>(w, x, a, b, sums);
    case 2: return dot_rows<2>(w, x, a, b, sums);
    case 3: return dot_rows<3>(w, x, a, b, sums);
    default: return dot_rows<4>(w, x, a, b, sums);
  }
}

void single_row_packed(const Problem& p, int64_t first, int64_t last) {
  constexpr int64_t kBlock = kPanels * kLanes;
  const int64_t m = p.ks[0];
  float partial[kBlock];
  int64_t live[kBlock];
  for (int64_t j0 = first; j0 < last; j0 += kBlock) {
    const int64_t count = std::min(kBlock, last - j0);
    panel_probe_any(static_cast<int>((count + kLanes - 1) / kLanes), p.panel, p.x, p.ks[0], j0 / kLanes, partial);
    int64_t alive = 0;
    for (int64_t k = 0; k < count; ++k) {
      if (fires(p, 0, partial[k], j0 + k)) {
        p.y[j0 + k] = 0.0f;
      } else {
        live[alive++] = k;
      }
    }
    int64_t done = p.ks[0];
    for (int64_t c = 1; c <= p.count && alive > 0; ++c) {
      const int64_t until = c < p.count ? p.ks[c] : p.d;
      for (int64_t a = 0; a < alive; a += 4) {
        const int group = static_cast<int>(std::min<int64_t>(4, alive - a));
        const float* rows[4];
        float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < group; ++k) rows[k] = p.tails + (j0 + live[a + k]) * (p.d - m);
        dot_rows_any(group, rows, p.x + m, done - m, until - m, sums);
        for (int k = 0; k < group; ++k) partial[live[a + k]] += sums[k];
      }
      done = until;
      int64_t kept = 0;
      for (int64_t a = 0; a < alive; ++a) {
        const int64_t k = live[a];
        if (c == p.count) {
          p.y[j0 + k] = relu_output(partial[k], p.bias[j0 + k]);
        } else if (fires(p, c, partial[k], j0 + k)) {
          p.y[j0 + k] = 0.0f;
        } else {
          live[kept++] = k;
        }
      }
      alive = c == p.count ? 0 : kept;
    }
  }
}

// Batch 1 without packed probes (W not a constant): neurons in order, each row read from its prefix on, so that a kept
// neuron's probe and tail and the next neuron's probe are one contiguous stream; the probe prefix kPrefetchAhead
// neurons ahead is prefetched, since a skipped tail breaks the hardware prefetcher's stream.
void single_row(const Problem& p, int64_t first, int64_t last) {
  const float* x = p.x;
  for (int64_t j = first; j < last; ++j) {
    if (j + kPrefetchAhead < last) prefetch_lines(p.w + (j + kPrefetchAhead) * p.d, p.ks[0]);
    const float* row = p.w + j * p.d;
    vec acc = vzero();
    int64_t done = 0;
    bool skipped = false;
    for (int64_t c = 0; c < p.count && !skipped; ++c) {
      dot_tile<1, 1>(&row, &x, done, p.ks[c], &acc);
      done = p.ks[c];
      skipped = fires(p, c, vsum(acc), j);
    }
    if (!skipped) dot_tile<1, 1>(&row, &x, done, p.d, &acc);
    p.y[j] = skipped ? 0.0f : relu_output(vsum(acc), p.bias[j]);
  }
}

// Rows [r0, r0 + block) for neurons [first, last), kTile neurons at a time. At every stage (each
// checkpoint, then the tail) the tile spans the neurons still undecided for some row and the rows still
// undecided for some neuron, kTile rows at a time: a pair decided already is computed along and ignored,
// and a tail is read only while some row needs it.
void row_block(const Problem& p, int64_t first, int64_t last, int64_t r0, int block) {
  vec state[kRowBlock][kTile];
  float partial[kRowBlock][kTile];
  bool live[kRowBlock][kTile];
  int rows[kRowBlock];
  for (int64_t j0 = first; j0 < last; j0 += kTile) {
    const int neurons = static_cast<int>(std::min<int64_t>(kTile, last - j0));
    int live_rows[kTile] = {0};
    for (int i = 0; i < block; ++i) {
      rows[i] = i;
      for (int q = 0; q < kTile; ++q) {
        state[i][q] = vzero();
        live[i][q] = q < neurons;
      }
    }
    for (int q = 0; q < neurons; ++q) live_rows[q] = block;
    int undecided = block;
    int64_t done = 0;
    for (int64_t c = 0; c <= p.count && undecided > 0; ++c) {
      const int64_t until = c < p.count ? p.ks[c] : p.d;
      int active[kTile], count = 0;
      const float* w[kTile];
      for (int q = 0; q < neurons; ++q)
        if (live_rows[q] > 0) {
          w[count] = p.w + (j0 + q) * p.d;
          active[count++] = q;
        }
      for (int i = 0; i < undecided; i += kTile) {
        const int tile_rows = std::min(kTile, undecided - i);
        const float* x[kTile];
        vec tile[kTile * kTile];
        for (int r = 0; r < tile_rows; ++r) {
          x[r] = p.x + (r0 + rows[i + r]) * p.d;
          for (int a = 0; a < count; ++a) tile[a * kTile + r] = state[rows[i + r]][active[a]];
        }
        dot_tile_any(count, tile_rows, w, x, done, until, tile);
        for (int r = 0; r < tile_rows; ++r)
          for (int a = 0; a < count; ++a) {
            state[rows[i + r]][active[a]] = tile[a * kTile + r];
            partial[rows[i + r]][active[a]] = vsum(tile[a * kTile + r]);
          }
      }
      done = until;
      int kept = 0;
      for (int i = 0; i < undecided; ++i) {
        const int row = rows[i];
        bool any = false;
        for (int a = 0; a < count; ++a) {
          const int q = active[a];
          if (!live[row][q]) continue;
          float* out = p.y + (r0 + row) * p.n + j0 + q;
          if (c == p.count) {
            *out = relu_output(partial[row][q], p.bias[j0 + q]);
          } else if (fires(p, c, partial[row][q], j0 + q)) {
            *out = 0.0f;
            live[row][q] = false;
            --live_rows[q];
          } else {
            any = true;
          }
        }
        if (any) rows[kept++] = row;
      }
      undecided = kept;
    }
  }
}

void run_chunk(void* data, size_t index) {
  const Problem& p = *static_cast<const Problem*>(data);
  const int64_t first = static_cast<int64_t>(index) * p.chunk;
  const int64_t last = std::min(p.n, first + p.chunk);
  if (p.rows == 1) return p.panel != nullptr ? single_row_packed(p, first, last) : single_row(p, first, last);
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowBlock)
    row_block(p, first, last, r0, static_cast<int>(std::min<int64_t>(kRowBlock, p.rows - r0)));
}

// Neurons per task: tasks of at least ~64K multiply-adds (below that the pool's hand-off costs more than
// it saves), at most 64 tasks, whole multiples of one probe block (kPanels panels of kLanes neurons).
int64_t chunk_size(int64_t rows, int64_t n, int64_t d) {
  constexpr int64_t kBlock = kPanels * kLanes;
  const int64_t per_neuron = std::max<int64_t>(1, rows * d);
  int64_t chunk = std::max<int64_t>(kBlock, (int64_t{1} << 16) / per_neuron);
  chunk = std::max(chunk, (n + 63) / 64);
  return (chunk + kBlock - 1) / kBlock * kBlock;
}

// Batch > 1 (kGemmRows rows or more) with a constant W: a GEMM over weight panels packed once, by the first such call
// (kNr neurons per panel, stored k-major: panel[i][0..kNr) = W[j0.., i], zero-padded past n; d · n floats beside W; a
// model whose layers run dense from kGemmRows rows never packs them), with register tiles of up to kMr rows x kNr
// neurons (per k: two weight loads, kMr broadcasts of x', 2·kMr FMAs). Each tile keeps its sums in registers from k = 0
// to d, tests them at every checkpoint (the same float32 score and boundary as the other paths, branch-free) and stops
// at the first checkpoint where every pair of the tile has fired; survivors get max(sum + B, 0). Panels are split over
// onnxruntime's intra-op thread pool. Per-pair decisions that differ from row to row cost the register tiles below more
// in branches than they save, so at batch > 1 the dense product is what pays: one thread, 768->3072 and 384->1536,
// batch 8 ran at 0.94-1.15x of onnxruntime's MatMul+Add+Relu, batch 32 and 64 at 0.77-0.97x, whatever the skip rate
// (the register tiles: 0.17-0.96x).
#if defined(__AVX512F__)
constexpr int kMr = 12;  // 24 accumulators of 32 registers
#else
constexpr int kMr = 6;   // 12 accumulators of 16 registers
#endif
constexpr int64_t kNr = 2 * kLanes;

struct GemmProblem {
  const Problem* p;
  const Panels* panels;
  int64_t chunk;  // panels per task
};

template <int R>
void gemm_tile(const Problem& p, const float* panel, int64_t r0, int64_t j0) {
  const int64_t valid = std::min<int64_t>(kNr, p.n - j0);
  vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
  unsigned char fired[R][kNr] = {};
  float sums[R][kNr];
  int64_t a = 0;
  for (int64_t c = 0; c <= p.count; ++c) {
    const int64_t b = c < p.count ? p.ks[c] : p.d;
    for (int64_t i = a; i < b; ++i) {
      const vec w0 = in_register(vload(panel + i * kNr)), w1 = in_register(vload(panel + i * kNr + kLanes));
      for (int r = 0; r < R; ++r) {
        const vec xr = vset1(p.x[(r0 + r) * p.d + i]);
        acc[r][0] = vfma(w0, xr, acc[r][0]);
        acc[r][1] = vfma(w1, xr, acc[r][1]);
      }
    }
    a = b;
    for (int r = 0; r < R; ++r) {
      vstore(sums[r], acc[r][0]);
      vstore(sums[r] + kLanes, acc[r][1]);
    }
    if (c == p.count) break;
    const float scale = p.scale[c], factor = p.factor[c];
    const float* bias = p.bias + j0;
    const float* tau = p.tau + j0;
    unsigned char alive = 0;
    for (int r = 0; r < R; ++r)
      for (int64_t q = 0; q < valid; ++q) {  // branch-free: as `fires`, one float32 operation at a time
        const float scaled = sums[r][q] * scale;
        const float score = scaled + bias[q];
        const float bound = tau[q] * factor;
        fired[r][q] |= static_cast<unsigned char>(score < bound);
        alive |= static_cast<unsigned char>(!fired[r][q]);
      }
    if (!alive) break;  // every pair of the tile is zero: the rest of W is not read for it
  }
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (r0 + r) * p.n + j0;
    for (int64_t q = 0; q < valid; ++q) {
      const float value = relu_output(sums[r][q], p.bias[j0 + q]);
      out[q] = fired[r][q] ? 0.0f : value;
    }
  }
}

void gemm_tile_any(int rows, const Problem& p, const float* panel, int64_t r0, int64_t j0) {
  switch (rows) {
    case 1: return gemm_tile<1>(p, panel, r0, j0);
    case 2: return gemm_tile<2>(p, panel, r0, j0);
    case 3: return gemm_tile<3>(p, panel, r0, j0);
    case 4: return gemm_tile<4>(p, panel, r0, j0);
    case 5: return gemm_tile<5>(p, panel, r0, j0);
#if defined(__AVX512F__)
    case 6: return gemm_tile<6>(p, panel, r0, j0);
    case 7: return gemm_tile<7>(p, panel, r0, j0);
    case 8: return gemm_tile<8>(p, panel, r0, j0);
    case 9: return gemm_tile<9>(p, panel, r0, j0);
    case 10: return gemm_tile<10>(p, panel, r0, j0);
    case 11: return gemm_tile<11>(p, panel, r0, j0);
#endif
    default: return gemm_tile<kMr>(p, panel, r0, j0);
  }
}

void run_gemm_chunk(void* data, size_t index) {
  const GemmProblem& g = *static_cast<const GemmProblem*>(data);
  const Problem& p = *g.p;
  const int64_t first = static_cast<int64_t>(index) * g.chunk;
  const int64_t last = std::min(g.panels->panels, first + g.chunk);
  for (int64_t k = first; k < last; ++k) {
    const float* panel = g.panels->values.data() + k * p.d * kNr;
    for (int64_t r0 = 0; r0 < p.rows; r0 += kMr)
      gemm_tile_any(static_cast<int>(std::min<int64_t>(kMr, p.rows - r0)), p, panel, r0, k * kNr);
  }
}

struct ExPruneKernel {
  int64_t m_;
  std::vector<int64_t> checkpoints_;
  Panels panel_;  // probe prefixes, batch 1
  Tails tails_;   // the rest of W's rows, batch 1
  Panels gemm_;   // all of W, batch > 1: packed by the first call of kGemmRows rows or more
  std::once_flag gemm_packed_;
  const float* constant_w_ = nullptr;  // W's data when it is a constant

  ExPruneKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo kernel_info(info);
    m_ = kernel_info.GetAttribute<int64_t>("m");
    checkpoints_ = read_checkpoints(kernel_info, m_, "ExPruneLinearRelu");
    int is_constant = 0;
    Ort::ConstValue weight = kernel_info.GetTensorConstantInput(1, &is_constant);
    if (is_constant) {
      const std::vector<int64_t> shape = weight.GetTensorTypeAndShapeInfo().GetShape();
      if (shape.size() == 2 && checkpoints_.back() < shape[1]) {
        constant_w_ = weight.GetTensorData<float>();
        panel_.pack(constant_w_, shape[0], shape[1], m_, kLanes);
        tails_.pack(constant_w_, shape[0], shape[1], m_);
      }
    }
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
    if (checkpoints_.back() >= d)
      ORT_CXX_API_THROW("ExPruneLinearRelu: checkpoints must stay below d", ORT_INVALID_ARGUMENT);
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];
    const float* x = x_value.GetTensorData<float>();
    const int64_t* perm = context.GetInput(4).GetTensorData<int64_t>();
    std::vector<int64_t> y_shape(x_shape);
    y_shape.back() = n;
    float* y = context.GetOutput(0, y_shape).GetTensorMutableData<float>();
    if (rows == 0 || n == 0) return;

    std::vector<float> gathered(static_cast<size_t>(rows * d));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < d; ++i) gathered[r * d + i] = x[r * d + perm[i]];
    const size_t count = checkpoints_.size();
    std::vector<float> scale, factor;
    checkpoint_factors(d, checkpoints_, scale, factor);
    const float* w = w_value.GetTensorData<float>();
    if (rows >= kGemmRows && w == constant_w_ && constant_w_ != nullptr)
      std::call_once(gemm_packed_, [&] { gemm_.pack(w, n, d, d, kNr); });
    const bool tiled = rows >= kGemmRows && gemm_.ready(w, n, d);
    const bool packed = rows == 1 && panel_.ready(w, n, d) && tails_.ready(w, n, d);
    Problem problem{gathered.data(), w, packed ? panel_.values.data() : nullptr,
                    packed ? tails_.values.data() : nullptr,
                    context.GetInput(2).GetTensorData<float>(),
                    context.GetInput(3).GetTensorData<float>(), y, rows, n, d, checkpoints_.data(), scale.data(),
                    factor.data(), static_cast<int64_t>(count), chunk_size(rows, n, d)};
    if (tiled) {  // panels per task: about as many multiply-adds per task as chunk_size gives
      const int64_t per_task = std::max<int64_t>(1, problem.chunk / kNr);
      GemmProblem gemm{&problem, &gemm_, per_task};
      const size_t tasks = static_cast<size_t>((gemm_.panels + per_task - 1) / per_task);
      if (tasks == 1) {
        run_gemm_chunk(&gemm, 0);
      } else {
        context.ParallelFor(run_gemm_chunk, tasks, 0, &gemm);
      }
      return;
    }
    const size_t tasks = static_cast<size_t>((n + problem.chunk - 1) / problem.chunk);
    if (tasks == 1) {
      run_chunk(&problem, 0);
    } else {
      context.ParallelFor(run_chunk, tasks, 0, &problem);
    }
  }
};

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int64_t graphopt_exprune_calls() { return g_calls.load(); }

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  static ExPruneOp<ExPruneKernel> op("ExPruneLinearRelu");
  static std::mutex guard;
  static std::vector<Ort::CustomOpDomain> domains;
  try {
    Ort::CustomOpDomain domain("graphopt");
    domain.Add(&op);
    domain.Add(exprune_conv_op());
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
