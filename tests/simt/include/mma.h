// The nvcuda::wmma subset the kernels use, for the SIMT emulator. A fragment is spread over the 32 lanes
// of a warp as on a GPU: slot e of lane l (x[e]) holds element placement[e * 32 + l] of the tile, in
// row-major order of the logical matrix. CUDA leaves that placement unspecified (it differs between
// architectures and fragment types), so the emulator scrambles it: a seeded permutation per fragment type
// (use, m, n, k, element type, layout), the same for every fragment of that type, so elementwise work
// between fragments of one type stays valid while code that reads or writes x[i] by position, or mixes
// fragments of different types elementwise, computes garbage. Seed 0 (simt_set_fragment_seed) keeps the
// identity placement: lane l holds elements l, l + 32, ...
// mma_sync is a warp collective: the last lane to arrive gathers all lanes' fragments, computes
// D = A * B + C in fp32 (TF32 inputs truncated to 10 mantissa bits, as tensor cores read them), and
// scatters D back. Loads and stores check every element they touch, that the pointer is 256-bit (32-byte)
// aligned and that ldm is a multiple of 16 bytes, as the CUDA programming guide requires.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdio>
#include <type_traits>

#include "simt_device.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct TileShape;
template <int M, int N, int K>
struct TileShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct TileShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct TileShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

// Codes that tell fragment types apart, for their element placement.
template <typename T>
struct Code;
template <>
struct Code<matrix_a> : std::integral_constant<int, 1> {};
template <>
struct Code<matrix_b> : std::integral_constant<int, 2> {};
template <>
struct Code<accumulator> : std::integral_constant<int, 3> {};
template <>
struct Code<void> : std::integral_constant<int, 0> {};
template <>
struct Code<row_major> : std::integral_constant<int, 1> {};
template <>
struct Code<col_major> : std::integral_constant<int, 2> {};
template <>
struct Code<float> : std::integral_constant<int, 1> {};
template <>
struct Code<__half> : std::integral_constant<int, 2> {};
template <>
struct Code<__nv_bfloat16> : std::integral_constant<int, 3> {};
template <>
struct Code<precision::tf32> : std::integral_constant<int, 4> {};
template <>
struct Code<double> : std::integral_constant<int, 5> {};

SIMT_UNCHECKED inline float to_float(float x) { return x; }
SIMT_UNCHECKED inline float to_float(__half x) { return __half2float(x); }
SIMT_UNCHECKED inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

SIMT_UNCHECKED inline float truncate_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::TileShape<Use, M, N, K>::rows;
  static constexpr int cols = detail::TileShape<Use, M, N, K>::cols;
  static constexpr bool is_tf32 = std::is_same<T, precision::tf32>::value;
  static constexpr int num_elements = rows * cols / 32;
  static constexpr uint64_t placement_key =
      ((((static_cast<uint64_t>(detail::Code<Use>::value) * 256 + M) * 256 + N) * 256 + K) * 16 +
       detail::Code<T>::value) * 4 + detail::Code<Layout>::value;
  element_type x[num_elements];

  // placement()[e * 32 + lane]: the tile element (row-major index) that x[e] of `lane` holds.
  SIMT_UNCHECKED static const int* placement() { return simt::fragment_placement(placement_key, rows * cols); }
};

// Round to nearest, ties away from zero, keeping 10 mantissa bits (cvt.rna.tf32.f32).
SIMT_UNCHECKED inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) {
    return x;
  }
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
SIMT_UNCHECKED void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag,
                                  typename fragment<Use, M, N, K, T, Layout>::element_type value) {
  for (int e = 0; e < frag.num_elements; ++e) {
    frag.x[e] = value;
  }
}

namespace detail {

// The CUDA programming guide: "mptr must be a 256-bit aligned pointer", "ldm must be a multiple of 16
// bytes" (8 __half or __nv_bfloat16 elements, 4 float ones). Both are the same on every lane of the warp,
// so lane 0 alone reports.
template <typename Element>
SIMT_UNCHECKED void check_alignment(const char* function, const Element* ptr, unsigned ldm) {
  if (simt::lane_id() != 0) {
    return;
  }
  char text[200];
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    std::snprintf(text, sizeof(text), "wmma::%s: pointer %p is not 256-bit (32-byte) aligned", function,
                  static_cast<const void*>(ptr));
    simt::report_misuse(text);
  }
  if (ldm * sizeof(Element) % 16 != 0) {
    std::snprintf(text, sizeof(text), "wmma::%s: ldm %u is not a multiple of 16 bytes (%zu elements of %zu bytes)",
                  function, ldm, 16 / sizeof(Element), sizeof(Element));
    simt::report_misuse(text);
  }
}

template <typename Frag, typename Element>
SIMT_UNCHECKED void load(Frag& frag, const Element* ptr, unsigned ldm, bool row_major) {
  check_alignment("load_matrix_sync", ptr, ldm);
  const int lane = simt::lane_id();
  const int* placement = Frag::placement();
  for (int e = 0; e < frag.num_elements; ++e) {
    const int index = placement[e * 32 + lane];
    const int r = index / Frag::cols;
    const int c = index % Frag::cols;
    const Element* source = ptr + (row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r);
    simt::check_access(source, sizeof(Element), false);
    Element value;
    std::memcpy(&value, source, sizeof(Element));
    frag.x[e] = value;
  }
}

template <typename Frag>
struct MmaSlot {
  Frag* d;
  const void* a;
  const void* b;
  const Frag* c;
};

template <typename FragA, typename FragB, typename FragC>
SIMT_UNCHECKED void mma_combine(void* const* lanes, int live_lanes) {
  constexpr int m = FragA::rows, k = FragA::cols, n = FragB::cols;
  if (live_lanes != 32) {
    simt::report_misuse("mma_sync needs all 32 lanes of the warp");
    return;
  }
  float a[m * k], b[k * n], c[m * n];
  const int* place_a = FragA::placement();
  const int* place_b = FragB::placement();
  const int* place_c = FragC::placement();
  for (int lane = 0; lane < 32; ++lane) {
    const auto* slot = static_cast<const MmaSlot<FragC>*>(lanes[lane]);
    const auto* fa = static_cast<const FragA*>(slot->a);
    const auto* fb = static_cast<const FragB*>(slot->b);
    for (int e = 0; e < FragA::num_elements; ++e) {
      const float value = to_float(fa->x[e]);
      a[place_a[e * 32 + lane]] = FragA::is_tf32 ? truncate_to_tf32(value) : value;
    }
    for (int e = 0; e < FragB::num_elements; ++e) {
      const float value = to_float(fb->x[e]);
      b[place_b[e * 32 + lane]] = FragB::is_tf32 ? truncate_to_tf32(value) : value;
    }
    for (int e = 0; e < FragC::num_elements; ++e) {
      c[place_c[e * 32 + lane]] = slot->c->x[e];
    }
  }
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      float sum = c[i * n + j];
      for (int kk = 0; kk < k; ++kk) {
        sum += a[i * k + kk] * b[kk * n + j];
      }
      c[i * n + j] = sum;
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* slot = static_cast<const MmaSlot<FragC>*>(lanes[lane]);
    for (int e = 0; e < FragC::num_elements; ++e) {
      slot->d->x[e] = c[place_c[e * 32 + lane]];
    }
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
SIMT_UNCHECKED void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag,
                                     const typename fragment<Use, M, N, K, T, Layout>::element_type* ptr,
                                     unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators are loaded with a layout_t");
  detail::load(frag, ptr, ldm, std::is_same<Layout, row_major>::value);
}

template <int M, int N, int K, typename T>
SIMT_UNCHECKED void load_matrix_sync(fragment<accumulator, M, N, K, T>& frag, const T* ptr, unsigned ldm,
                                     layout_t layout) {
  detail::load(frag, ptr, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T>
SIMT_UNCHECKED void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& frag, unsigned ldm,
                                      layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  detail::check_alignment("store_matrix_sync", ptr, ldm);
  const int lane = simt::lane_id();
  const int* placement = Frag::placement();
  for (int e = 0; e < Frag::num_elements; ++e) {
    const int index = placement[e * 32 + lane];
    const int r = index / Frag::cols;
    const int c = index % Frag::cols;
    T* target = ptr + (layout == mem_row_major ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r);
    simt::check_access(target, sizeof(T), true);
    std::memcpy(target, &frag.x[e], sizeof(T));
  }
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
SIMT_UNCHECKED void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                             const fragment<matrix_b, M, N, K, TB, LB>& b,
                             const fragment<accumulator, M, N, K, TC>& c) {
  using FragC = fragment<accumulator, M, N, K, TC>;
  detail::MmaSlot<FragC> slot{&d, &a, &b, &c};
  simt::warp_collective(0xffffffffu, &slot,
                        &detail::mma_combine<fragment<matrix_a, M, N, K, TA, LA>, fragment<matrix_b, M, N, K, TB, LB>,
                                             FragC>);
}

}  // namespace wmma
}  // namespace nvcuda
