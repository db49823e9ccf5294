// PCD's rows on the CPU, one row at a time, sums in float64: the algorithm of _pcd_rows.py (read its docstring),
// written as loops. _pcd_native.py compiles this file and explains when it runs.
//
// Per row: (1) the row's flags (NaN, +inf, live classes); (2) the live classes ranked by a selection at every
// atom boundary at once (select_at), so each atom's classes lie together; (3) per atom its maxima and seven
// or nine shifted sums; (4) per stage and group the group's statistics from its atoms' sums, adding the loss
// and four gradient coefficients per atom; (5) the gradient, one pass over the classes.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr double COS_EPS = 1e-8;
constexpr int RANK_ABS_DIFF = 0, RANK_TEACHER = 1;  // else class index order
constexpr double NEG_INF = -std::numeric_limits<double>::infinity();

struct Options {
  const int64_t* groups;  // group count of each stage
  int64_t stages;
  double factor, temperature;
  bool adaptive, prob_cos, want_grad;
  int rank_by;
};

// A class's rank key: its priority key's order-preserving bits, inverted (descending), above its index, so
// that all keys differ and their ascending order is the stable descending sort's (ties to the lower index)
template <typename T>
using Key = std::conditional_t<sizeof(T) == 4, uint64_t, unsigned __int128>;

template <typename T>
Key<T> rank_key(T key, int64_t index) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits sign = Bits(1) << (8 * sizeof(T) - 1);
  key = key == 0 ? T(0) : key;  // -0.0 ties with 0.0
  Bits bits;
  std::memcpy(&bits, &key, sizeof bits);
  bits = (bits & sign) ? ~bits : (bits | sign);  // ascending as the floats are
  return (Key<T>(Bits(~bits)) << (8 * sizeof(T))) | Key<T>(index);
}

template <typename T>
inline int64_t class_of(Key<T> key) { return int64_t(key & ((Key<T>(1) << (8 * sizeof(T))) - 1)); }

enum Sum { Z_S, U, UU, Z_T, T_DIFF, T_U, T_T, S_S, S_T, SUMS };

template <typename T>
struct Work {  // one thread's arrays, reused row after row
  std::vector<Key<T>> ranked;  // live classes in rank order (after rank_classes: each atom's together)
  std::vector<int64_t> cuts;
  std::vector<T> a, b, e_s, e_t;  // per class in rank order, in the logits' precision (as the torch rows)
  std::vector<double> m_s, m_t, sums, coef;  // per atom
};

// tensor_split(range(n), g): the start of group j
inline int64_t group_start(int64_t n, int64_t g, int64_t j) { return j * (n / g) + std::min(j, n % g); }

// Rearranges a[lo, hi) so that at each cut c in [cut, cut_end), every key before c is less than every key
// from c on (a quickselect for several positions at once). The partition has no branch on the data: on
// random keys a compare branch mispredicts half the time, which made std::nth_element 5x slower here.
template <typename K>
void select_at(K* a, int64_t lo, int64_t hi, const int64_t* cut, const int64_t* cut_end, int depth) {
  while (true) {
    while (cut < cut_end && *cut <= lo) ++cut;  // cuts at the range's ends hold already
    while (cut < cut_end && cut_end[-1] >= hi) --cut_end;
    if (cut == cut_end) return;
    if (hi - lo <= 16 || depth-- == 0) return std::sort(a + lo, a + hi);
    int64_t mid = lo + (hi - lo) / 2;  // the median of three is the pivot, moved to the end
    K x = a[lo], y = a[mid], z = a[hi - 1];
    int64_t m = x < y ? (y < z ? mid : (x < z ? hi - 1 : lo)) : (x < z ? lo : (y < z ? hi - 1 : mid));
    std::swap(a[m], a[hi - 1]);
    K pivot = a[hi - 1];
    int64_t j = lo;  // a[lo, j) < pivot <= a[j, i)
    for (int64_t i = lo; i < hi - 1; ++i) {
      K v = a[i];
      a[i] = a[j], a[j] = v, j += v < pivot;
    }
    std::swap(a[j], a[hi - 1]);  // keys differ: a[lo, j) < a[j] < a(j, hi)
    const int64_t* right = std::lower_bound(cut, cut_end, j);
    select_at(a, lo, j, cut, right, depth);
    lo = j + 1, cut = right;
  }
}

// (2) live classes in rank order, each atom's classes together (any order inside an atom)
template <typename T>
int64_t rank_classes(const T* s, const T* t, int64_t C, const Options& o, Work<T>& w) {
  // the key in the logits' precision, as the torch rows compute it: equal keys (ties) are the same ones
  T mean_s = 0, mean_t = 0;
  if (o.rank_by == RANK_ABS_DIFF) {  // centring means over the classes finite in both
    double sum_s = 0, sum_t = 0;
    int64_t both = 0;
    for (int64_t c = 0; c < C; ++c)
      if (std::isfinite(s[c]) && std::isfinite(t[c])) sum_s += s[c], sum_t += t[c], ++both;
    mean_s = T(sum_s) / T(std::max<int64_t>(both, 1)), mean_t = T(sum_t) / T(std::max<int64_t>(both, 1));
  }
  w.ranked.resize(C);
  int64_t n = 0;
  for (int64_t c = 0; c < C; ++c) {  // every class written, the live ones kept: no branch on the data
    bool s_inf = std::isinf(s[c]), t_inf = std::isinf(t[c]);
    T key = 0;  // rank_by "none": class index order
    if (o.rank_by == RANK_ABS_DIFF)  // one side -inf: ranks first
      key = (s_inf || t_inf) ? T(INFINITY) : std::fabs(T(t[c] - mean_t) - T(s[c] - mean_s));
    else if (o.rank_by == RANK_TEACHER)
      key = t_inf ? std::numeric_limits<T>::lowest() : t[c];
    w.ranked[n] = rank_key(key, c);
    n += !(s_inf && t_inf);  // both -inf: absent
  }
  w.cuts.clear();  // every stage's interior boundaries, then n: atom k ends at cuts[k]
  for (int64_t i = 0; i < o.stages; ++i)
    for (int64_t j = 1; j < o.groups[i]; ++j) w.cuts.push_back(group_start(n, o.groups[i], j));
  w.cuts.push_back(n);
  std::sort(w.cuts.begin(), w.cuts.end());
  w.cuts.erase(std::unique(w.cuts.begin(), w.cuts.end()), w.cuts.end());
  if (o.rank_by == RANK_ABS_DIFF || o.rank_by == RANK_TEACHER)  // "none": already in rank order
    select_at(w.ranked.data(), 0, n, w.cuts.data(), w.cuts.data() + w.cuts.size(), 2 * std::bit_width(uint64_t(n)) + 4);
  return n;
}

// exp(x) for x <= 0 in float32 as a polynomial the compiler vectorises (expf is a call per element): x = n ln2
// + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial (relative error about 1e-7, as expf's), times 2^n
// written into the exponent bits; below -87.3 (the smallest normal float) and at -inf, 0.
inline float exp_neg(float x) {
  float xc = std::max(x, -87.3f);
  int32_t n = int32_t(xc * 1.44269504f - 0.5f);  // round(x / ln2): x <= 0, truncation goes up
  float r = (xc - float(n) * 0.693359375f) + float(n) * 2.12194440e-4f;  // ln2 in two parts: r exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f, p = p * r + 8.3334519073e-3f, p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f, p = p * r + 5.0000001201e-1f;
  float y = (p * r * r + r) + 1.0f;
  return x >= -87.3f ? y * std::bit_cast<float>((n + 127) << 23) : 0.0f;
}
inline double exp_neg(double x) { return std::exp(x); }

// e_s = exp(a - m_s), e_t = exp(b - m_t): no sums and no aliasing, so that the loop vectorises
template <typename T>
void shifted_exps(const T* __restrict a, const T* __restrict b, T m_s, T m_t, int64_t len, T* __restrict e_s,
                  T* __restrict e_t) {
  for (int64_t p = 0; p < len; ++p) e_s[p] = exp_neg(a[p] - m_s), e_t[p] = exp_neg(b[p] - m_t);
}

// (3) per class a = s/T, b = t/T and e = exp(z/T - atom max) in the logits' precision (for float32 half the
// memory traffic, and exp_neg); per atom its maxima and the sums in float64, where u = a - m_s and b - a are exact
template <typename T>
void atom_sums(const T* s, const T* t, int64_t n, const Options& o, Work<T>& w) {
  int64_t atoms = w.cuts.size();
  w.a.resize(n), w.b.resize(n), w.e_s.resize(n), w.e_t.resize(n);
  w.m_s.assign(atoms, 0.0), w.m_t.assign(atoms, 0.0), w.sums.assign(atoms * SUMS, 0.0);
  const T inv_t = T(1 / o.temperature), neg_inf = -std::numeric_limits<T>::infinity();
  int64_t lo = 0;
  for (int64_t k = 0; k < atoms; lo = w.cuts[k++]) {
    T top_s = neg_inf, top_t = neg_inf;
    for (int64_t p = lo; p < w.cuts[k]; ++p) {
      int64_t c = class_of<T>(w.ranked[p]);
      w.a[p] = s[c] * inv_t, w.b[p] = t[c] * inv_t;  // -inf stays -inf
      top_s = std::max(top_s, w.a[p]), top_t = std::max(top_t, w.b[p]);
    }
    T m_s = std::isinf(top_s) ? T(0) : top_s, m_t = std::isinf(top_t) ? T(0) : top_t;  // 0: no (teacher) mass
    w.m_s[k] = m_s, w.m_t[k] = m_t;
    shifted_exps(&w.a[lo], &w.b[lo], m_s, m_t, w.cuts[k] - lo, &w.e_s[lo], &w.e_t[lo]);
    double sum[SUMS] = {};
    for (int64_t p = lo; p < w.cuts[k]; ++p) {
      double u = double(w.a[p]) - m_s;  // exact: a and m_s are both in the logits' precision
      T e_s = w.e_s[p], e_t = w.e_t[p];
      double diff = e_t > 0 ? double(w.b[p]) - w.a[p] : 0.0;  // b - a is -inf where the teacher is
      sum[Z_S] += e_s, sum[U] += u, sum[UU] += u * u, sum[Z_T] += e_t, sum[T_DIFF] += e_t * diff;
      sum[T_U] += double(e_t) * u, sum[T_T] += double(e_t) * e_t;
      if (o.prob_cos) sum[S_S] += double(e_s) * e_s, sum[S_T] += double(e_s) * e_t;
    }
    std::copy(sum, sum + SUMS, &w.sums[k * SUMS]);
  }
}

// (4) one group, atoms [first, last): adds to the loss and to the atoms' gradient coefficients
template <typename T>
double group_loss(int64_t first, int64_t last, const Options& o, Work<T>& w) {
  double top_s = NEG_INF, top_t = NEG_INF;  // log-sum-exp over the atoms with mass
  for (int64_t k = first; k < last; ++k) {
    if (w.sums[k * SUMS + Z_S] > 0) top_s = std::max(top_s, w.m_s[k]);
    if (w.sums[k * SUMS + Z_T] > 0) top_t = std::max(top_t, w.m_t[k]);
  }
  top_s = std::isinf(top_s) ? 0.0 : top_s, top_t = std::isinf(top_t) ? 0.0 : top_t;
  double total_s = 0, total_t = 0;  // an atom without mass has m = 0, whose exp(m - top) may be inf: never inf * 0
  for (int64_t k = first; k < last; ++k) {
    if (w.sums[k * SUMS + Z_S] > 0) total_s += w.sums[k * SUMS + Z_S] * std::exp(w.m_s[k] - top_s);
    if (w.sums[k * SUMS + Z_T] > 0) total_t += w.sums[k * SUMS + Z_T] * std::exp(w.m_t[k] - top_t);
  }
  double lse_s = top_s + std::log(total_s > 0 ? total_s : 1.0), lse_t = top_t + std::log(total_t > 0 ? total_t : 1.0);
  // within atom k: q_s = scale_s(k) e_s, q_t = scale_t(k) e_t, log q_s = u + delta
  auto scale_s = [&](int64_t k) { return w.sums[k * SUMS + Z_S] > 0 ? std::exp(w.m_s[k] - lse_s) : 0.0; };
  auto scale_t = [&](int64_t k) { return w.sums[k * SUMS + Z_T] > 0 ? std::exp(w.m_t[k] - lse_t) : 0.0; };
  double mass_t = 0, t_diff = 0, dot = 0, tt = 0, ss = 0, sum_log = 0, size = 0;
  for (int64_t k = first; k < last; ++k) {
    const double* sum = &w.sums[k * SUMS];
    double ws = scale_s(k), wt = scale_t(k);
    double delta = w.m_s[k] - lse_s, count = double(w.cuts[k] - (k ? w.cuts[k - 1] : 0));
    mass_t += wt * sum[Z_T], t_diff += wt * sum[T_DIFF], tt += wt * wt * sum[T_T], size += count;
    if (o.prob_cos) {
      dot += wt * ws * sum[S_T], ss += ws * ws * sum[S_S];
    } else {
      dot += wt * (sum[T_U] + delta * sum[Z_T]);
      ss += sum[UU] + delta * (2 * sum[U] + count * delta), sum_log += sum[U] + count * delta;
    }
  }
  double t2 = o.temperature * o.temperature;
  double kl = (mass_t > 0 && size > 1) ? t2 * (t_diff + lse_s - lse_t) : 0.0;  // one class: KL exactly 0
  // d KL / d a_c = T^2 (q_s,c mass_t - q_t,c); the weight's derivative adds the cosine's terms
  double weight = 1, c_s = t2 * mass_t, c_t = -t2, c_u = 0, c_ss = 0, c_st = 0;
  if (o.adaptive) {
    double norm_t = std::sqrt(tt), norm_s = std::sqrt(std::max(ss, 0.0));
    double nt = std::max(norm_t, COS_EPS), ns = std::max(norm_s, COS_EPS), cos = dot / (nt * ns);
    double ns_grad = norm_s > COS_EPS ? cos / (ns * ns) : 0.0;
    weight = 1 - cos;
    c_s = weight * t2 * mass_t, c_t = -weight * t2;
    if (o.prob_cos) {
      c_s += kl * (cos - ns_grad * norm_s * norm_s), c_ss = kl * ns_grad, c_st = -kl / (nt * ns);
    } else {
      c_s += kl * (mass_t / (nt * ns) - ns_grad * sum_log), c_t -= kl / (nt * ns), c_u = kl * ns_grad;
    }
  }
  if (o.want_grad)
    for (int64_t k = first; k < last; ++k) {
      double* coef = &w.coef[k * 4];
      double ws = scale_s(k), wt = scale_t(k);
      coef[0] += c_s * ws, coef[1] += c_t * wt;
      if (o.prob_cos)
        coef[2] += c_ss * ws * ws, coef[3] += c_st * ws * wt;
      else
        coef[2] += c_u, coef[3] += c_u * (w.m_s[k] - lse_s);
    }
  return weight * kl;
}

template <typename T>
void one_row(const T* s, const T* t, int64_t C, const Options& o, Work<T>& w, T* loss, T* grad) {
  bool nan_row = false, inf_row = false;  // (1), without branches: the loop vectorises
  for (int64_t c = 0; c < C; ++c) {
    nan_row |= !(s[c] < T(INFINITY)) | !(t[c] < T(INFINITY));  // NaN or +inf
    inf_row |= (s[c] == -T(INFINITY)) & (t[c] != -T(INFINITY));  // the student rules out a class the teacher keeps
  }
  if (nan_row || inf_row) {
    *loss = nan_row ? NAN : INFINITY;
    if (o.want_grad) std::fill(grad, grad + C, T(NAN));
    return;
  }
  int64_t n = rank_classes(s, t, C, o, w);
  atom_sums(s, t, n, o, w);
  int64_t atoms = w.cuts.size();
  w.coef.assign(atoms * 4, 0.0);
  double total = 0;
  for (int64_t i = 0; i < o.stages; ++i) {  // each group is the atoms between two of its stage's boundaries
    int64_t g = o.groups[i], k = 0;
    for (int64_t j = 0; j < g; ++j) {
      int64_t first = k, end = group_start(n, g, j + 1);
      while (k < atoms && w.cuts[k] <= end) ++k;
      total += group_loss(first, k, o, w);
    }
  }
  *loss = T(o.factor * total);
  if (!o.want_grad) return;
  if (n < C) std::fill(grad, grad + C, T(0));  // (5); absent classes keep 0
  double scale = o.factor / o.temperature;
  int64_t p = 0;
  for (int64_t k = 0; k < atoms; ++k)
    for (const double* coef = &w.coef[k * 4]; p < w.cuts[k]; ++p) {
      double e_s = w.e_s[p], e_t = w.e_t[p], u = double(w.a[p]) - w.m_s[k];
      double x = o.prob_cos ? e_s * (coef[0] + coef[2] * e_s + coef[3] * e_t) + coef[1] * e_t
                            : coef[0] * e_s + coef[1] * e_t + coef[2] * u + coef[3];
      grad[class_of<T>(w.ranked[p])] = T(x * scale);
    }
}

template <typename T>
void rows(const T* s, const T* t, int64_t R, int64_t C, const Options& o, T* loss, T* grad, int64_t threads) {
  // OpenMP: loaded after torch, the library's libgomp.so.1 is torch's own, so these are torch's threads (fresh
  // std::threads had to share the cores with torch's, still spinning after its last parallel loop)
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min(threads, R)))
  {
    thread_local Work<T> w;  // kept from call to call: its arrays grow once, not every chunk
    // rows handed out in small batches as threads come free: a core taken by another process (a VM's
    // neighbour) slows the call by its share, not by half
#pragma omp for schedule(dynamic, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(C, 1)))
    for (int64_t r = 0; r < R; ++r)
      one_row(s + r * C, t + r * C, C, o, w, loss + r, o.want_grad ? grad + r * C : nullptr);
  }
}

}  // namespace

extern "C" {
#define PCD_ROWS(NAME, T)                                                                                        \
  void NAME(const T* s, const T* t, int64_t R, int64_t C, const int64_t* groups, int64_t stages, double factor,  \
            double temperature, int adaptive, int prob_cos, int rank_by, int want_grad, T* loss, T* grad,        \
            int64_t threads) {                                                                                   \
    Options o{groups, stages, factor, temperature, bool(adaptive), bool(adaptive && prob_cos), bool(want_grad),  \
              rank_by};                                                                                          \
    rows<T>(s, t, R, C, o, loss, grad, threads);                                                                 \
  }
PCD_ROWS(pcd_rows_f32, float)
PCD_ROWS(pcd_rows_f64, double)
}
