"""The fast computation behind :func:`pcdistill.losses.pcd_loss` (variant "paper").

* Classes are put in priority order. The groups of every stage are contiguous chunks of that order,
  so the union of all stage boundaries cuts the order into *atoms*: every group of every stage is a
  contiguous run of atoms. Atoms are cut further into equal-size *blocks* (the last block of an atom
  is padded), so that one ``(N, blocks, block_size)`` view holds every row. The layout depends only
  on ``C`` and the stages, never on the row.
* Only membership matters (groups are sets), so the full order is never built. On the CPU, numpy
  finds each boundary's value by nested partitions (cheaper than a full sort; numpy's vectorised
  partition and sort are ~7x faster than ``torch.sort`` here), comparisons give each class's atom
  with exact tie-breaking, and one packed cumulative sum gives each class's slot. Elsewhere, and
  under ``torch.compile``, a stable ``torch.argsort`` does the same job.
* One reduction over seven ``(N, C)``-sized rows gives every block sum the loss needs. Each stage
  combines block sums into group statistics on ``(blocks, N)`` arrays (numpy on the CPU, where its
  small ops cost ~1-3 us against torch's ~5-10 us), so extra stages cost little and nothing of size
  ``stages x N x C`` is ever alive.
* The gradient is derived in closed form and computed in the forward pass; only it is saved. On the
  CPU the ``(N, C)``-sized work rows live in per-thread buffers reused across calls.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import math
import threading
from typing import NamedTuple

import numpy as np
import torch

COS_EPS = 1e-8
ORDERING = "auto"  # "auto" | "numpy" | "torch": backend of the host-side work (ordering, group sums); tests force each


def group_sizes(num_classes: int, groups: int) -> list[int]:
    """Chunk sizes of ``torch.tensor_split(range(C), groups)``: the first ``C mod groups`` are one longer."""
    base, extra = divmod(num_classes, groups)
    return [base + 1] * extra + [base] * (groups - extra)


class Layout(NamedTuple):
    """Where each rank position of the priority order lives, for one ``C`` and one set of stages.

    atom_sizes: classes per atom in priority order; bounds: interior atom boundaries (rank positions).
    block: block size; atom_first_slot: first slot of each atom (a multiple of ``block``);
    block_count: real classes per block (the rest of the block is padding); slots = blocks * block.
    chunks: the stages in batches; per batch ``(stages, group_id)``, where the batch's (stage, block)
    pairs run stage by stage over every block and ``group_id`` (non-decreasing, unique within the
    batch) is each pair's group. A batch has at most ``max(slots, blocks)`` pairs.
    """

    atom_sizes: tuple[int, ...]
    bounds: tuple[int, ...]
    block: int
    atom_first_slot: tuple[int, ...]
    block_count: tuple[int, ...]
    chunks: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def blocks(self) -> int:
        return len(self.block_count)

    @property
    def slots(self) -> int:
        return self.blocks * self.block


def _block_size(atom_sizes: tuple[int, ...], stages: int) -> int:
    """The block size that minimises padded slots plus a charge per (stage, block) pair.

    Padding is capped at C slots (block size 1 has none), so memory stays O(N * C) for any stages.
    """
    num_classes = sum(atom_sizes)
    candidates = {1} | {-(-n // k) for n in atom_sizes for k in range(1, 65) if k <= n}

    def slots(m: int) -> int:
        return m * sum(-(-n // m) for n in atom_sizes)

    def cost(m: int) -> float:
        return slots(m) + 4 * stages * slots(m) // m

    return min((m for m in sorted(candidates, reverse=True) if slots(m) <= 2 * num_classes), key=cost)


@functools.lru_cache(maxsize=256)
def layout_for(num_classes: int, stage_groups: tuple[int, ...]) -> Layout:
    cuts = set()
    for g in stage_groups:
        cuts.update(itertools.accumulate(group_sizes(num_classes, g)[:-1]))
    bounds = tuple(sorted(cuts))
    starts = (0,) + bounds
    atom_sizes = tuple(b - a for a, b in zip(starts, bounds + (num_classes,)))
    block = _block_size(atom_sizes, len(stage_groups))
    atom_first_slot, block_count, block_rank = [], [], []  # block_rank: rank position of a block's first class
    for start, n in zip(starts, atom_sizes):
        atom_first_slot.append(len(block_count) * block)
        for first in range(0, n, block):
            block_count.append(min(block, n - first))
            block_rank.append(start + first)
    per_batch = max(1, max(num_classes, len(block_count)) // len(block_count))
    chunks = []
    for first in range(0, len(stage_groups), per_batch):
        offset, group_id = 0, []
        for g in stage_groups[first:first + per_batch]:
            stage_cuts = list(itertools.accumulate(group_sizes(num_classes, g)[:-1]))
            group_id += [offset + bisect.bisect_right(stage_cuts, r) for r in block_rank]
            offset += g
        chunks.append((len(stage_groups[first:first + per_batch]), tuple(group_id)))
    return Layout(atom_sizes, bounds, block, tuple(atom_first_slot), tuple(block_count), tuple(chunks))


class _Chunk(NamedTuple):
    """One batch of stages. Pairs run stage by stage over every block; ``group_of_pair`` (an index
    array of the backend) gives each pair's group, ``group_pairs`` and ``group_blocks`` each group's
    ``(start, stop)`` range of pairs and of blocks (python ints)."""

    stages: int
    groups: int
    group_of_pair: np.ndarray | torch.Tensor
    group_pairs: tuple[tuple[int, int], ...]
    group_blocks: tuple[tuple[int, int], ...]


class _Tables(NamedTuple):
    chunks: list[_Chunk]
    counts: np.ndarray | torch.Tensor  # (blocks, 1) real classes per block, float64
    pad_slots: torch.Tensor  # (pads,) flat indices of the padding slots (possibly empty), on the device


@functools.lru_cache(maxsize=64)
def _tables(layout: Layout, device: torch.device, host: str) -> _Tables:
    """Constant index arrays of a layout: numpy arrays for ``host="numpy"``, device tensors for ``"torch"``."""
    if host == "numpy":
        index, counts = np.asarray, np.asarray(layout.block_count, dtype=np.float64)[:, None]
    else:
        index = functools.partial(torch.tensor, device=device)
        counts = torch.tensor(layout.block_count, dtype=torch.float64, device=device)[:, None]
    chunks = []
    for stages, group_id in layout.chunks:
        starts = [p for p in range(len(group_id)) if p == 0 or group_id[p] != group_id[p - 1]]
        pairs = tuple(zip(starts, starts[1:] + [len(group_id)]))
        blocks = tuple((start % layout.blocks, (stop - 1) % layout.blocks + 1) for start, stop in pairs)
        chunks.append(_Chunk(stages, len(pairs), index(group_id), pairs, blocks))
    padding = torch.arange(layout.block) >= torch.tensor(layout.block_count).unsqueeze(-1)
    return _Tables(chunks, counts, padding.flatten().nonzero().squeeze(-1).to(device))


def _host(device: torch.device) -> str:
    """Where the host-side work runs: ``"numpy"`` on the CPU outside ``torch.compile``, else ``"torch"``."""
    if device.type == "cpu" and ORDERING != "torch" and not torch.compiler.is_compiling():
        return "numpy"
    return "torch"


# ----------------------------------------------------------------------------------------------
# Priority order -> the slot of every class
# ----------------------------------------------------------------------------------------------
def priority_key(s: torch.Tensor, t: torch.Tensor, rank_by: str,
                 out: torch.Tensor | None = None, spare: torch.Tensor | None = None) -> torch.Tensor | None:
    """Values whose descending order (ties: lower class index first) is the distillation priority.
    ``out`` and ``spare`` (optional, the shape of ``s``) receive the key and an intermediate."""
    if rank_by == "abs_diff":
        key = torch.sub(t, t.mean(dim=-1, keepdim=True), out=out)
        return key.sub_(torch.sub(s, s.mean(dim=-1, keepdim=True), out=spare)).abs_()
    if rank_by == "teacher":
        return t
    return None


_workspace = threading.local()  # per-thread reused buffers: fresh multi-MB arrays page-fault on every call


def _buffer(name: str, shape, dtype) -> np.ndarray:
    buf = getattr(_workspace, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        setattr(_workspace, name, buf)
    return buf


def _scratch(name: str, shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reused per-thread CPU tensor on ``like``'s device, of its dtype unless given (a fresh one off the
    CPU or under ``torch.compile``), for data that never leaves the call."""
    dtype = dtype or like.dtype
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return like.new_empty(shape, dtype=dtype)
    buf = getattr(_workspace, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = like.new_empty(shape, dtype=dtype)
        setattr(_workspace, name, buf)
    return buf


def _boundary_values(key: np.ndarray, positions: list[int], nonnegative: bool) -> np.ndarray:
    """Per row, the key at each of the (distinct) ``positions`` of its ascending order: (N, positions).

    Nested partitions (the middle position splits the row, each side holds its own positions) cost
    about ``C log2(positions)`` against a sort's ``C log2(C)``; a segment with many positions is sorted.
    ``nonnegative`` keys are partitioned as integers (same order for floats >= 0, and numpy is faster).
    """
    work = _buffer("select", key.shape, key.dtype)
    np.copyto(work, key)
    ordered = work.view(np.dtype(f"int{8 * key.itemsize}")) if nonnegative else work

    def select(start: int, stop: int, inside: list[int]) -> None:
        if len(inside) > 6:
            ordered[:, start:stop].sort(axis=-1)
        elif inside:
            mid = len(inside) // 2
            ordered[:, start:stop].partition(inside[mid] - start, axis=-1)
            select(start, inside[mid], inside[:mid])
            select(inside[mid] + 1, stop, inside[mid + 1:])

    select(0, key.shape[-1], sorted(positions))
    return work[:, positions]


def _lanes_numpy(key: np.ndarray, bounds: tuple[int, ...], nonnegative: bool) -> np.ndarray:
    """Per class, the number of atom boundaries ``b`` it comes before (``rank(class) < b``); the class's
    atom is ``len(bounds)`` minus that.

    ``rank`` is the position in descending ``key`` order, ties broken by lower class index. For a
    boundary ``b`` let ``v`` be the value at descending position ``b``: classes above ``v`` come before
    it, the others after it, unless tied classes straddle it: then ``#(key > v) < b`` and the first
    ``b - #(key > v)`` tied classes by class index come before too. A row has such a boundary only if
    its lanes sum to less than ``sum(bounds)``, so only those rows are looked at again.
    """
    c = key.shape[-1]
    values = _boundary_values(key, [c - 1 - b for b in bounds], nonnegative)
    lane = _buffer("lane", key.shape, np.uint8 if len(bounds) < 255 else np.int64)
    np.greater(key, values[:, :1], out=lane)
    above = _buffer("above", key.shape, np.bool_)
    for i in range(1, len(bounds)):
        np.greater(key, values[:, i, None], out=above)
        np.add(lane, above, out=lane)
    rows = np.nonzero(lane.sum(axis=-1) < sum(bounds))[0]
    if rows.size:
        k = key[rows]
        lane[rows] = 0
        for b, v in zip(bounds, values[rows].T):
            ties, over = k == v[:, None], k > v[:, None]
            from_ties = b - over.sum(axis=-1, keepdims=True)
            lane[rows] += over | (ties & (np.cumsum(ties, axis=-1) <= from_ties))
    return lane


def _slots_numpy(key: np.ndarray, layout: Layout, nonnegative: bool, out: np.ndarray) -> None:
    """Write each class's slot into ``out`` (int64, the key's shape).

    The slot is ``first_slot(atom) + (number of earlier classes in the same atom)``. Every atom gets a
    bit field ("lane") of an int64; a cumulative sum of ``1 << lane``, seeded with the atoms'
    ``first slot - 1``, counts all atoms at once. Atom ``a`` takes lane ``atoms - 1 - a``: only atom 0
    (first slot 0) has a seed of -1, and in the top lane its borrow cannot reach another lane.
    With more atoms than lanes, a stable argsort does it.
    """
    lane = _lanes_numpy(key, layout.bounds, nonnegative)
    bits = layout.slots.bit_length()
    n_atoms = len(layout.atom_sizes)
    if n_atoms * bits > 63:  # the class of each rank, by atom then class index; torch scatters 10x faster
        order = torch.from_numpy(np.argsort(n_atoms - 1 - lane, axis=-1, kind="stable"))
        torch.from_numpy(out).scatter_(-1, order, torch.from_numpy(_slot_of_rank(layout)).expand_as(order))
        return
    shift = _buffer("shift", key.shape, np.uint8)
    np.multiply(lane, bits, out=shift)
    np.left_shift(np.int64(1), shift, out=out)
    out[:, 0] += sum((first - 1) << (bits * (n_atoms - 1 - a)) for a, first in enumerate(layout.atom_first_slot))
    np.cumsum(out, axis=-1, out=out)
    np.right_shift(out, shift, out=out, casting="unsafe")
    np.bitwise_and(out, (1 << bits) - 1, out=out)


@functools.lru_cache(maxsize=64)
def _slot_of_rank(layout: Layout) -> np.ndarray:
    """Slot of each rank position (the layout of rows that already are in priority order)."""
    return np.concatenate([first + np.arange(n) for first, n in zip(layout.atom_first_slot, layout.atom_sizes)])


def class_slots(s: torch.Tensor, t: torch.Tensor, rank_by: str, layout: Layout,
                backend: str = "auto", reuse: bool = False) -> torch.Tensor | None:
    """``slot[i, c]``: where class ``c`` of row ``i`` goes in the ``(blocks * block)`` layout (an index tensor).

    The classes are ranked by :func:`priority_key` (descending, ties by lower class index);
    ``rank_by="none"`` keeps class-index order and returns one ``(C,)`` row for all. Returns None when
    the rows already are the layout (a single atom). ``backend``: ``"numpy"`` (CPU only), ``"torch"``
    (stable argsort), or ``"auto"`` (numpy on the CPU outside ``torch.compile``). With ``reuse`` the
    numpy backend returns a per-thread buffer that its next call overwrites.
    """
    if not layout.bounds:
        return None
    if rank_by == "none":
        return torch.from_numpy(_slot_of_rank(layout)).to(s.device)
    if backend == "auto":
        backend = _host(s.device)
    if backend == "numpy":  # torch-owned memory (see _buffer's comment); torch is ~2x numpy on the key
        key = priority_key(s.detach(), t.detach(), rank_by, out=_scratch("key", s.shape, s),
                           spare=_scratch("centred_s", s.shape, s))
        out = _scratch("slot", s.shape, s, torch.long) if reuse else torch.empty(s.shape, dtype=torch.long)
        _slots_numpy(key.contiguous().numpy(), layout, rank_by == "abs_diff", out.numpy())
        return out
    key = priority_key(s.detach(), t.detach(), rank_by)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    slot_of_rank = torch.from_numpy(_slot_of_rank(layout)).to(s.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, slot_of_rank)


# ----------------------------------------------------------------------------------------------
# The loss on the block layout, with its closed-form gradient
# ----------------------------------------------------------------------------------------------
# Rows of the block sums (work rows 1-7: xs', e_t, e_s, e_t xt', e_t xs', e_t^2, xs'^2) in the order
# combine_blocks takes them: z_s = sum e_s, z_t = sum e_t, s1 = sum xs', sum e_t^2, sum e_t xs', sum e_t xt', s2;
# the work rows hold x' / ln 2, so the sums are scaled back by these units
_SUM_ORDER = [2, 1, 0, 5, 4, 3, 6]
_LN2 = math.log(2.0)
_SUM_UNITS = [1.0, 1.0, _LN2, 1.0, _LN2, _LN2, _LN2**2]


def _group_max(v, chunk: _Chunk):
    """Per group, the maximum over its blocks of ``v`` (k, blocks, N): (k, groups, N)."""
    if isinstance(v, np.ndarray):  # numpy's reduceat is slow here; a reduction per group is not
        out = np.empty((v.shape[0], chunk.groups, v.shape[-1]))
        for g, (start, stop) in enumerate(chunk.group_blocks):
            np.maximum.reduce(v[:, start:stop], axis=1, out=out[:, g])
        return out
    pairs = v.unsqueeze(1).expand(-1, chunk.stages, -1, -1).reshape(v.shape[0], len(chunk.group_of_pair), v.shape[-1])
    index = chunk.group_of_pair[:, None].expand_as(pairs)
    return v.new_full((v.shape[0], chunk.groups, v.shape[-1]), float("-inf")).scatter_reduce_(1, index, pairs, "amax")


def _group_sum(v, chunk: _Chunk):
    """Per group, the sum over its pairs of ``v`` (k, stages, blocks, N): (k, groups, N)."""
    v = v.reshape(v.shape[0], v.shape[1] * v.shape[2], v.shape[-1])
    if isinstance(v, np.ndarray):
        out = np.empty((v.shape[0], chunk.groups, v.shape[-1]))
        for g, (start, stop) in enumerate(chunk.group_pairs):
            np.add.reduce(v[:, start:stop], axis=1, out=out[:, g])
        return out
    return v.new_zeros((v.shape[0], chunk.groups, v.shape[-1])).index_add_(1, chunk.group_of_pair, v)


def combine_blocks(xp, sums, peak, tables: _Tables, adaptive: bool, need_grad: bool):
    """Row losses ``sum_G w_G KL_G / T^2`` over the layout's stages, and the gradient coefficients.

    ``xp`` is ``numpy`` or ``torch`` (the arrays' library). ``sums`` (7, blocks, N) holds the block sums
    in the order of :data:`_SUM_ORDER` and ``peak`` (2, blocks, N) the block maxima of ``x = logits / T``, float64;
    rows are last so that every operation runs along contiguous rows. With ``lse`` the log-sum-exp of
    ``x`` over a block or a group, block ``b`` of group ``G`` has teacher share ``beta_b = exp(lse_t,b -
    lse_t,G)``, and, with in-block averages under ``p_t`` (the block's teacher softmax):

    * ``KL_G / T^2 = sum_b beta_b E_b[xt - xs] - (lse_t,G - lse_s,G)``
    * ``<q_t, log q_s> = sum_b beta_b E_b[xs] - lse_s,G`` and ``|q_t|^2 = sum_b beta_b^2 sum_b p_t^2``
    * ``|log q_s|^2 = sum_b M2_b + n_b d_b^2`` and ``sum log q_s = sum_b n_b d_b`` with ``d_b = mu_b - lse_s,G``,
      ``mu, M2`` the mean and centred sum of squares of ``xs`` over the block.

    Group sums are shifted by the group's largest block ``lse``, so no group underflows and one-block
    groups stay exact. The gradient of the summed rows per class is ``p_s c1 + p_t c2 + (xs - mu) c3 + c4``
    with per-block ``c`` summed over the groups holding the block; it is returned as (4, blocks, N)
    coefficients of the rows ``(e_t, e_s, xs', 1)`` (before the factor ``dL/dx``), or None.
    """
    z_s, z_t, s1, sum_et_sq, sum_et_xs, sum_et_xt, s2 = sums
    lse = peak + xp.log(sums[:2])
    mean_shift = s1 / tables.counts  # mean of xs' over the block
    mu = peak[0] + mean_shift
    avg = xp.stack([sum_et_xt - sum_et_xs, sum_et_xs, sum_et_sq / z_t]) / z_t  # E_b[xt - xs], E_b[xs], sum p_t^2
    avg[0] += peak[1] - peak[0]
    avg[1] += peak[0]
    m2 = s2 - s1 * mean_shift
    row = grad_p = grad_l = grad_ld = 0.0
    blocks = len(tables.counts)
    for chunk in tables.chunks:
        def spread(v, chunk=chunk):  # (k, groups, N) -> (k, stages, blocks, N)
            return v[:, chunk.group_of_pair].reshape(v.shape[0], chunk.stages, blocks, v.shape[-1])

        top = _group_max(lse, chunk)
        mass = xp.exp(lse[:, None] - spread(top))  # each block's student and teacher mass over its group's top
        total = _group_sum(mass, chunk)
        lse_g = top + xp.log(total)
        inv_z_t = 1 / total[1]
        d = mu - spread(lse_g[:1])[0]  # block mean of xs minus the group's log-sum-exp
        weighted = mass[1] * (avg if adaptive else avg[:1])[:, None]
        if adaptive:
            weighted[2] *= mass[1]
            kl, dot, norm_q2, norm_l2, sum_l = _group_sum(xp.stack([
                weighted[0], weighted[1], weighted[2], m2 + tables.counts * d * d, tables.counts * d]), chunk)
            kl = kl * inv_z_t - (lse_g[1] - lse_g[0])
            dot = dot * inv_z_t - lse_g[0]
            norm_q = (xp.sqrt(norm_q2) * inv_z_t).clip(min=COS_EPS)
            norm_l_raw = xp.sqrt(norm_l2)
            norm_l = norm_l_raw.clip(min=COS_EPS)
            inv = 1 / (norm_q * norm_l)
            weight = 1 - dot * inv
            row = row + (weight * kl).sum(0)
        else:
            kl = _group_sum(weighted, chunk)[0] * inv_z_t - (lse_g[1] - lse_g[0])
            row = row + kl.sum(0)
        if not need_grad:
            continue
        if adaptive:
            gamma = xp.where(norm_l_raw > COS_EPS, dot * inv / (norm_l * norm_l), 0.0)  # d(1/|l|) term
            total_v = inv - gamma * sum_l  # sum over the group of d cos / d log q_s
            c = spread(xp.stack([(weight + kl * total_v) / total[0], (weight + kl * inv) * inv_z_t, kl * gamma]))
            grad_l = grad_l + c[2].sum(0)
            grad_ld = grad_ld + (c[2] * d).sum(0)
        else:
            c = spread(xp.stack([1 / total[0], inv_z_t]))
        grad_p = grad_p + (mass * c[:2]).sum(1)  # alpha_b c_s and beta_b c_t, summed over the stages
    if not need_grad:
        return row, None
    zero = xp.zeros_like(z_s)
    c3, c4 = grad_l + zero, grad_ld + zero
    # p_s c1 + p_t c2 + (xs' - mean_shift) c3 + c4 as coefficients of the work rows e_t, e_s, xs', 1
    return row, xp.stack([-grad_p[1] / z_t, grad_p[0] / z_s, c3, c4 - c3 * mean_shift])


def pcd_blocks(ts: torch.Tensor, layout: Layout, factor: float, temperature: float, adaptive: bool,
               need_grad: bool):
    """Row losses of the paper variant, and d(sum of rows)/d(s) on the layout (or None), from teacher and
    student logits stacked as ``ts`` of shape ``(2, N, blocks, block)`` (teacher first; padding holds ``-inf``).

    With ``x = logits / T``, ``m`` the block maximum, ``x' = x - m`` and ``e = exp(x')``, one reduction
    over the rows ``xs', e_t, e_s, e_t xt', e_t xs', e_t^2, xs'^2`` gives the block sums
    :func:`combine_blocks` needs; the gradient is its coefficients times ``e_t, e_s, xs', 1``. The rows
    hold ``x' / ln 2`` and ``e = 2^(x' / ln 2)``: ``exp2`` is about twice as fast as ``exp`` on the CPU.
    """
    host = _host(ts.device)
    tables = _tables(layout, ts.device, host)
    n_rows, blocks = ts.shape[1], layout.blocks
    inv_t = 1.0 / temperature
    peak = ts.amax(dim=-1, keepdim=True)  # (2, N, blocks, 1)
    work = _scratch("work", (8,) + ts.shape[1:], ts)  # xt', xs', e_t, e_s, e_t xt', e_t xs', e_t^2, xs'^2
    x = torch.sub(ts, peak, out=work[0:2]).mul_(inv_t / _LN2)
    torch.exp2(x, out=work[2:4])
    if tables.pad_slots.numel():  # exp gave 0 on padding; the x' terms must be 0 there too
        x.view(2, n_rows, layout.slots).index_fill_(-1, tables.pad_slots, 0.0)
    torch.mul(work[2], work[0:3], out=work[4:7])
    torch.mul(work[1], work[1], out=work[7])
    sums = work[1:].sum(dim=-1)  # (7, N, blocks)
    if host == "numpy":
        sums = np.ascontiguousarray(sums.numpy()[_SUM_ORDER].transpose(0, 2, 1), dtype=np.float64)
        sums *= np.asarray(_SUM_UNITS)[:, None, None]
        peak_x = np.ascontiguousarray(peak.squeeze(-1).numpy()[::-1].transpose(0, 2, 1), dtype=np.float64) * inv_t
        row, coef = combine_blocks(np, sums, peak_x, tables, adaptive, need_grad)
        row, coef = torch.from_numpy(row), None if coef is None else torch.from_numpy(coef)
    else:
        sums = sums[_SUM_ORDER].transpose(1, 2).to(torch.float64) * sums.new_tensor(_SUM_UNITS)[:, None, None]
        peak_x = peak.squeeze(-1).flip(0).transpose(1, 2).to(torch.float64) * inv_t
        row, coef = combine_blocks(torch, sums, peak_x, tables, adaptive, need_grad)
    row = (row * (factor * temperature**2)).to(ts.dtype)  # each group's KL carries T^2
    if coef is None:
        return row, None
    coef = coef * (factor * temperature)  # T^2 from the loss, 1/T from x = s / T
    coef[2] *= _LN2  # the xs' row holds x' / ln 2
    coef = coef.transpose(1, 2).unsqueeze(-1).to(ts.dtype)  # (4, N, blocks, 1): on e_t, e_s, xs', 1
    grad = torch.mul(work[2], coef[0], out=work[0]).addcmul_(work[3], coef[1])  # xt' is spent: reuse its row
    if adaptive:
        grad.addcmul_(work[1], coef[2]).add_(coef[3])
    return row, grad.view(n_rows, layout.slots)


class PCDRows(torch.autograd.Function):
    """Row losses from logits ``s, t`` of shape ``(N, C)`` and each class's slot: ``(N, C)``, ``(C,)``, or
    None when the rows already are the layout.

    Saves only the ``(N, C)`` gradient computed in the forward pass.
    """

    @staticmethod
    def forward(ctx, s, t, slot, layout, factor, temperature, adaptive):
        n_rows = s.shape[0]
        if slot is None:
            ts = torch.stack([t, s]).view(2, n_rows, layout.blocks, layout.block)
        else:
            slot = slot.expand(n_rows, -1)
            ts = _scratch("ts", (2, n_rows, layout.slots), s)
            ts[0].scatter_(1, slot, t)
            ts[1].scatter_(1, slot, s)
            ts.index_fill_(-1, _tables(layout, s.device, _host(s.device)).pad_slots, float("-inf"))
            ts = ts.view(2, n_rows, layout.blocks, layout.block)
        row, grad = pcd_blocks(ts, layout, factor, temperature, adaptive, need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad.clone() if slot is None else grad.gather(1, slot))  # off the work rows
        return row

    @staticmethod
    def backward(ctx, grad_row):
        (grad,) = ctx.saved_tensors
        return grad * grad_row.unsqueeze(-1), None, None, None, None, None, None
