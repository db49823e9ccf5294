"""PCD's per-row computation in Triton: the results of ``_pcd_rows.pcd_rows`` without a sort.

One program per row walks the row's classes in blocks of ``BLOCK`` (any C, bounded registers); classes
past C load as ``-inf`` in both inputs, i.e. absent. The forward kernel makes these passes, each reading
``s`` and ``t`` once and computing the priority key on the fly:

1. counts: live classes ``n``, the centring means of ``rank_by="abs_diff"``, the NaN / +inf row flags;
2. selection: every stage boundary is a rank position ``b`` (``stage_bounds``), so the set of classes
   ranked before it is "keys above the ``b``-th largest key, plus the lowest-indexed ties". A radix select
   on the keys' order-preserving integer images finds the ``b``-th largest key of every boundary at once
   (one pass per ``DIGIT`` bits, counting the keys at or above each of the ``2**DIGIT`` candidates), then
   one pass counts the keys strictly above each threshold, leaving ``slots`` for the ties;
3. maxima: a class's atom is the number of boundaries at or below its rank (it is before boundary ``b``
   iff its key is above the threshold, or equal with fewer than ``slots`` equal keys at lower indices);
   per-atom maxima of ``a = s/T`` and ``b = t/T``;
4. sums: the seven shifted sums per atom.

``combine_atoms`` (torch, float64, on ``(rows, atoms)`` arrays) turns them into the loss and per-atom
gradient coefficients; the gradient kernel finds each class's atom again and writes
``e_s P + e_t Q + u R + S`` once. Atoms come from the distinct group counts of ``stage_groups``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._pcd_rows import atom_cuts, atom_layout, combine_atoms, finish_loss

RANK_CODES = {"abs_diff": 0, "teacher": 1, "none": 2}
DIGIT = 4  # bits of the threshold found per selection pass
MAX_TILE = 8192  # elements of the (boundaries, 2**DIGIT, BLOCK) and (atoms, BLOCK) tiles


@triton.jit
def _load(s_ptr, t_ptr, row, cols, C):
    inside = cols < C
    s = tl.load(s_ptr + row * C + cols, mask=inside, other=float("-inf"))
    t = tl.load(t_ptr + row * C + cols, mask=inside, other=float("-inf"))
    return s, t


@triton.jit
def _lowest(IS64: tl.constexpr):
    """``torch.finfo(dtype).min``, built from its bits (a float literal would be float32)."""
    if IS64:
        return tl.full([1], -4503599627370497, tl.int64).to(tl.float64, bitcast=True)  # 0xFFEFFFFFFFFFFFFF
    else:
        return tl.full([1], -8388609, tl.int32).to(tl.float32, bitcast=True)  # 0xFF7FFFFF


@triton.jit
def _ordered_key(s, t, cols, mean_s, mean_t, RANK: tl.constexpr, IS64: tl.constexpr):
    """``priority_key`` as unsigned integers of the same order (negative floats' bits flipped, else the sign's)."""
    s_inf, t_inf = s == float("-inf"), t == float("-inf")
    live = ~(s_inf & t_inf)
    if RANK == 0:
        both = ~s_inf & ~t_inf
        key = tl.where(both, tl.abs((t - mean_t) - (s - mean_s)), float("inf"))  # one side -inf: ranks first
    elif RANK == 1:
        key = tl.where(t_inf, _lowest(IS64), t)
    else:
        key = -cols.to(s.dtype)
    key = tl.where(live, key, float("-inf"))
    key = tl.where(key == 0, 0.0, key)  # -0.0 ties with +0.0, as in a sort
    if IS64:
        bits = key.to(tl.int64, bitcast=True)
        return (bits ^ tl.where(bits < 0, -1, -0x7FFFFFFFFFFFFFFF - 1)).to(tl.uint64, bitcast=True)
    else:
        bits = key.to(tl.int32, bitcast=True)
        return (bits ^ tl.where(bits < 0, -1, -0x7FFFFFFF - 1)).to(tl.uint32, bitcast=True)


@triton.jit
def _atoms(key, live, tau, slots, seen, DUMP: tl.constexpr):
    """Each class's atom and the updated count of keys equal to each threshold seen at lower indices."""
    equal = (key[None, :] == tau[:, None]).to(tl.int32)
    before = tl.cumsum(equal, axis=1) - equal + seen[:, None]
    ahead = (key[None, :] > tau[:, None]) | ((equal != 0) & (before < slots[:, None]))
    atom = tl.sum(tl.where(ahead, 0, 1), axis=0)  # boundaries at or below the class's rank
    return tl.where(live, atom, DUMP), seen + tl.sum(equal, axis=1)


@triton.jit
def _div(x, y, IS64: tl.constexpr):
    """Correctly rounded ``x / y``, as torch divides (float32 ``/`` may be approximate on GPUs)."""
    if IS64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _scaled(s, t, temperature, IS64: tl.constexpr):
    """``a = s/T`` (0 where s is -inf), ``b = t/T`` (-inf where t is), and the masks."""
    s_inf, t_inf = s == float("-inf"), t == float("-inf")
    live = ~(s_inf & t_inf)
    t_ok = live & ~t_inf
    a = tl.where(s_inf, 0.0, _div(s, temperature, IS64))
    b = tl.where(t_ok, _div(t, temperature, IS64), float("-inf"))
    return a, b, live, t_ok


@triton.jit
def _block(s_ptr, t_ptr, row, cols, C, temperature, mean_s, mean_t, tau, slots, seen, RANK: tl.constexpr,
           IS64: tl.constexpr, ATOMS: tl.constexpr):
    """One block of a row after the selection: scaled logits, masks, each class's atom, the tie count."""
    s, t = _load(s_ptr, t_ptr, row, cols, C)
    a, b, live, t_ok = _scaled(s, t, temperature, IS64)
    atom, seen = _atoms(_ordered_key(s, t, cols, mean_s, mean_t, RANK, IS64), live, tau, slots, seen, ATOMS)
    return a, b, live, t_ok, atom, seen


@triton.jit
def _atom_max(hit, x):
    return tl.max(tl.where(hit, x[None, :], float("-inf")), axis=1)


@triton.jit
def _atom_sum(hit, x):
    return tl.sum(tl.where(hit, x[None, :], 0.0), axis=1)


@triton.jit
def _pick(hit, per_atom):
    """Each class's entry of a per-atom vector (``hit`` is the one-hot atom matrix)."""
    return tl.sum(tl.where(hit, per_atom[:, None], 0.0), axis=0)


@triton.jit
def _forward_kernel(s_ptr, t_ptr, C, params_ptr, table_ptr, n_ptr, flags_ptr, means_ptr, tau_ptr, slots_ptr,
                    max_ptr, sums_ptr, RANK: tl.constexpr, IS64: tl.constexpr, KEY: tl.constexpr,
                    NBP: tl.constexpr, ATOMS: tl.constexpr, AP: tl.constexpr, BLOCK: tl.constexpr,
                    BITS: tl.constexpr, DIGIT: tl.constexpr, RADIX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dtype = s_ptr.dtype.element_ty
    temperature = tl.load(params_ptr)
    lanes = tl.arange(0, BLOCK)

    # 1. counts and flags
    n = tl.zeros([BLOCK], tl.int32)
    n_both = tl.zeros([BLOCK], tl.int32)
    sum_s = tl.zeros([BLOCK], dtype)
    sum_t = tl.zeros([BLOCK], dtype)
    nan = tl.zeros([BLOCK], tl.int32)
    inf = tl.zeros([BLOCK], tl.int32)
    for start in range(0, C, BLOCK):
        s, t = _load(s_ptr, t_ptr, row, start + lanes, C)
        s_inf, t_inf = s == float("-inf"), t == float("-inf")
        both = ~s_inf & ~t_inf
        n += (~(s_inf & t_inf)).to(tl.int32)
        n_both += both.to(tl.int32)
        sum_s += tl.where(both, s, 0.0)
        sum_t += tl.where(both, t, 0.0)
        nan |= ((s != s) | (t != t) | (s == float("inf")) | (t == float("inf"))).to(tl.int32)
        inf |= (s_inf & ~t_inf).to(tl.int32)
    n_live = tl.sum(n, axis=0)
    count = tl.maximum(tl.sum(n_both, axis=0), 1).to(dtype)
    mean_s = _div(tl.sum(sum_s, axis=0), count, IS64)
    mean_t = _div(tl.sum(sum_t, axis=0), count, IS64)
    tl.store(n_ptr + row, n_live)
    tl.store(flags_ptr + row, tl.max(nan, axis=0) + 2 * tl.max(inf, axis=0))
    tl.store(means_ptr + 2 * row, mean_s)
    tl.store(means_ptr + 2 * row + 1, mean_t)

    # 2. selection: per boundary, the largest threshold with at least `bound` keys at or above it
    slot = tl.arange(0, NBP)
    groups = tl.load(table_ptr + slot)
    index = tl.load(table_ptr + NBP + slot)
    bound = index * (n_live // groups) + tl.minimum(index, n_live % groups)  # stage_bounds
    digits = tl.arange(0, RADIX).to(KEY)
    tau = tl.zeros([NBP], KEY)  # the threshold's leading digits, found one digit per pass
    for step in range(BITS // DIGIT):
        shift = BITS - DIGIT * (step + 1)
        trial = tau[:, None] + (digits[None, :] << shift)  # (boundaries, RADIX), increasing along a row
        reach = tl.zeros([NBP, RADIX], tl.int32)
        for start in range(0, C, BLOCK):
            cols = start + lanes
            s, t = _load(s_ptr, t_ptr, row, cols, C)
            key = _ordered_key(s, t, cols, mean_s, mean_t, RANK, IS64)
            reach += tl.sum((key[None, None, :] >= trial[:, :, None]).to(tl.int32), axis=2)
        best = tl.sum((reach >= bound[:, None]).to(tl.int32), axis=1) - 1  # digit 0 always reaches
        tau += best.to(KEY) << shift
    above = tl.zeros([NBP], tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + lanes
        s, t = _load(s_ptr, t_ptr, row, cols, C)
        key = _ordered_key(s, t, cols, mean_s, mean_t, RANK, IS64)
        above += tl.sum((key[None, :] > tau[:, None]).to(tl.int32), axis=1)
    slots = bound - above  # ties at the threshold that still rank before the boundary
    tl.store(tau_ptr + row * NBP + slot, tau.to(tau_ptr.dtype.element_ty, bitcast=True))
    tl.store(slots_ptr + row * NBP + slot, slots)

    # 3. per-atom maxima
    atom_ids = tl.arange(0, AP)
    m_s = tl.full([AP], float("-inf"), dtype)
    m_t = tl.full([AP], float("-inf"), dtype)
    seen = tl.zeros([NBP], tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + lanes
        a, b, live, t_ok, atom, seen = _block(s_ptr, t_ptr, row, cols, C, temperature, mean_s, mean_t, tau, slots,
                                              seen, RANK, IS64, ATOMS)
        hit = atom[None, :] == atom_ids[:, None]
        m_s = tl.maximum(m_s, _atom_max(hit, tl.where(live, a, float("-inf"))))
        m_t = tl.maximum(m_t, _atom_max(hit, b))
    m_s = tl.where(m_s == float("-inf"), 0.0, m_s)
    m_t = tl.where(m_t == float("-inf"), 0.0, m_t)
    tl.store(max_ptr + row * 2 * AP + atom_ids, m_s)
    tl.store(max_ptr + row * 2 * AP + AP + atom_ids, m_t)

    # 4. the seven shifted sums per atom
    z_s = tl.zeros([AP], dtype)
    sum_u = tl.zeros([AP], dtype)
    sum_uu = tl.zeros([AP], dtype)
    z_t = tl.zeros([AP], dtype)
    sum_tdiff = tl.zeros([AP], dtype)
    sum_tu = tl.zeros([AP], dtype)
    sum_tt = tl.zeros([AP], dtype)
    seen = tl.zeros([NBP], tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + lanes
        a, b, live, t_ok, atom, seen = _block(s_ptr, t_ptr, row, cols, C, temperature, mean_s, mean_t, tau, slots,
                                              seen, RANK, IS64, ATOMS)
        hit = atom[None, :] == atom_ids[:, None]
        u = tl.where(live, a - _pick(hit, m_s), 0.0)
        e_s = tl.where(live, tl.exp(u), 0.0)
        e_t = tl.where(t_ok, tl.exp(b - _pick(hit, m_t)), 0.0)
        diff = tl.where(t_ok, b - a, 0.0)
        z_s += _atom_sum(hit, e_s)
        sum_u += _atom_sum(hit, u)
        sum_uu += _atom_sum(hit, u * u)
        z_t += _atom_sum(hit, e_t)
        sum_tdiff += _atom_sum(hit, e_t * diff)
        sum_tu += _atom_sum(hit, e_t * u)
        sum_tt += _atom_sum(hit, e_t * e_t)
    out = sums_ptr + row * 7 * AP + atom_ids
    tl.store(out, z_s)
    tl.store(out + AP, sum_u)
    tl.store(out + 2 * AP, sum_uu)
    tl.store(out + 3 * AP, z_t)
    tl.store(out + 4 * AP, sum_tdiff)
    tl.store(out + 5 * AP, sum_tu)
    tl.store(out + 6 * AP, sum_tt)


@triton.jit
def _grad_kernel(s_ptr, t_ptr, grad_ptr, C, R, params_ptr, flags_ptr, means_ptr, tau_ptr, slots_ptr, max_ptr,
                 coef_ptr, RANK: tl.constexpr, IS64: tl.constexpr, KEY: tl.constexpr, NBP: tl.constexpr,
                 ATOMS: tl.constexpr, AP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(params_ptr)
    scale = tl.load(params_ptr + 1)  # factor / T
    bad = tl.load(flags_ptr + row) != 0
    mean_s = tl.load(means_ptr + 2 * row)
    mean_t = tl.load(means_ptr + 2 * row + 1)
    slot = tl.arange(0, NBP)
    tau = tl.load(tau_ptr + row * NBP + slot).to(KEY, bitcast=True)
    slots = tl.load(slots_ptr + row * NBP + slot)
    seen = tl.zeros([NBP], tl.int32)
    lanes = tl.arange(0, BLOCK)
    coef = coef_ptr + row * (ATOMS + 1)
    stride = R * (ATOMS + 1)  # between the four coefficient planes
    for start in range(0, C, BLOCK):
        cols = start + lanes
        a, b, live, t_ok, atom, seen = _block(s_ptr, t_ptr, row, cols, C, temperature, mean_s, mean_t, tau, slots,
                                              seen, RANK, IS64, ATOMS)
        u = tl.where(live, a - tl.load(max_ptr + row * 2 * AP + atom), 0.0)
        e_s = tl.where(live, tl.exp(u), 0.0)
        e_t = tl.where(t_ok, tl.exp(b - tl.load(max_ptr + row * 2 * AP + AP + atom)), 0.0)
        grad = (e_s * tl.load(coef + atom) + e_t * tl.load(coef + stride + atom)
                + u * tl.load(coef + 2 * stride + atom) + tl.where(live, tl.load(coef + 3 * stride + atom), 0.0))
        tl.store(grad_ptr + row * C + cols, tl.where(bad, float("nan"), grad * scale), mask=cols < C)


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(x, 1))


@functools.lru_cache(maxsize=64)
def _boundary_table(groups: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(2, NBP)`` int32: group count and index of every stage boundary; cached, as copying it to a GPU waits."""
    pairs = [(g, i) for g in groups for i in range(1, g)]  # boundary i of a stage with g groups
    pairs += [(1, 1)] * (_pow2(len(pairs)) - len(pairs))  # boundary n: every live class is before it, no atom changes
    return torch.tensor(pairs, dtype=torch.int32, device=device).T.contiguous()


def pcd_rows_triton(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                    adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos", *,
                    block: int | None = None):
    """``pcd_rows`` with the per-row passes in Triton (``block``: classes per step, a power of two).

    The kernel sums what the default weight needs; ``weight="prob_cos"`` is refused (``pcd.py`` runs the torch rows).
    """
    if adaptive and weight != "log_prob_cos":
        raise ValueError(f"the Triton PCD kernel computes weight='log_prob_cos' only; got weight={weight!r}")
    rows, num_classes = s.shape
    s, t = s.contiguous(), t.contiguous()
    dev, dtype = s.device, s.dtype
    is64 = dtype == torch.float64
    groups = sorted(set(stage_groups))  # a repeated stage cuts the row at the same places
    table = _boundary_table(tuple(groups), dev)
    nbp = table.shape[1]
    atoms = sum(groups) - len(groups) + 1
    ap = _pow2(atoms + 1)  # the atoms and the dump atom of absent classes
    if block is None:
        block = min(_pow2(num_classes), max(16, MAX_TILE // max(nbp * 2**DIGIT, ap)))
    params = torch.full((2,), temperature, dtype=dtype, device=dev)  # in tensors: float arguments would be fp32
    params[1].fill_(factor / temperature)
    n = torch.empty(rows, dtype=torch.int32, device=dev)
    flags = torch.empty(rows, dtype=torch.int32, device=dev)
    means = torch.empty(rows, 2, dtype=dtype, device=dev)
    tau = torch.empty(rows, nbp, dtype=torch.int64 if is64 else torch.int32, device=dev)
    slots = torch.empty(rows, nbp, dtype=torch.int32, device=dev)
    maxima = torch.empty(rows, 2, ap, dtype=dtype, device=dev)
    sums = torch.empty(rows, 7, ap, dtype=dtype, device=dev)
    meta = dict(RANK=RANK_CODES[rank_by], IS64=is64, KEY=tl.uint64 if is64 else tl.uint32, NBP=nbp, ATOMS=atoms,
                AP=ap, BLOCK=block)
    if rows:
        _forward_kernel[(rows,)](s, t, num_classes, params, table, n, flags, means, tau, slots, maxima, sums,
                                 BITS=64 if is64 else 32, DIGIT=DIGIT, RADIX=2**DIGIT, **meta)

    n = n.long()
    layout = atom_layout(atom_cuts(n, groups, num_classes), n, stage_groups)
    loss, coef = combine_atoms(maxima[:, :, :atoms].transpose(0, 1), sums[:, :, :atoms].transpose(0, 1), layout,
                               stage_groups, temperature, adaptive, weight, want_grad)
    loss = finish_loss(loss, (flags & 1) != 0, (flags & 2) != 0, factor, dtype)
    if not want_grad:
        return loss, None
    coef = torch.cat([coef, coef.new_zeros(4, rows, 1)], -1)  # the dump atom of absent classes
    grad = torch.empty_like(s)
    if rows:
        _grad_kernel[(rows,)](s, t, grad, num_classes, rows, params, flags, means, tau, slots, maxima,
                              coef, **meta)
    return loss, grad
