"""The fast computation behind :func:`pcdistill.losses.pcd_loss` (variant "paper").

* Classes are put in priority order. The groups of every stage are contiguous chunks of that order,
  so the union of all stage boundaries cuts the order into *atoms*: every group of every stage is a
  contiguous run of atoms. Atoms are cut further into equal-size *blocks* (the last block of an atom
  is padded), so that one ``(N, blocks, block_size)`` view holds every row. The layout depends only
  on ``C`` and the stages, never on the row.
* Only membership matters (groups are sets), so the full order is never built. On the CPU a
  value-only numpy sort gives the boundary values (numpy's vectorised sort is ~7x faster than
  ``torch.sort`` here), comparisons give each class's atom with exact tie-breaking, and one packed
  cumulative sum gives each class's slot. Elsewhere, and under ``torch.compile``, a stable
  ``torch.argsort`` does the same job.
* A handful of whole-tensor ops compute seven sums per block. Each stage combines block sums into
  group statistics on ``(N, blocks)`` tensors, so extra stages cost little and nothing of size
  ``stages x N x C`` is ever alive.
* The gradient is derived in closed form and computed in the forward pass; only it is saved.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import threading
from typing import NamedTuple

import numpy as np
import torch

COS_EPS = 1e-8
ORDERING = "auto"  # "auto" | "numpy" | "torch": which slot backend pcd_loss uses; tests force each


def group_sizes(num_classes: int, groups: int) -> list[int]:
    """Chunk sizes of ``torch.tensor_split(range(C), groups)``: the first ``C mod groups`` are one longer."""
    base, extra = divmod(num_classes, groups)
    return [base + 1] * extra + [base] * (groups - extra)


class Layout(NamedTuple):
    """Where each rank position of the priority order lives, for one ``C`` and one set of stages.

    atom_sizes: classes per atom in priority order; bounds: interior atom boundaries (rank positions).
    block: block size; atom_first_slot: first slot of each atom (a multiple of ``block``);
    block_count: real classes per block (the rest of the block is padding); slots = blocks * block.
    chunks: the stages in batches; per batch ``(groups, group_id, block_id)`` for every (stage, block)
    pair, group ids unique within the batch. A batch has at most ``max(slots, blocks)`` pairs.
    """

    atom_sizes: tuple[int, ...]
    bounds: tuple[int, ...]
    block: int
    atom_first_slot: tuple[int, ...]
    block_count: tuple[int, ...]
    chunks: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]

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
        offset, group_id, block_id = 0, [], []
        for g in stage_groups[first:first + per_batch]:
            stage_cuts = list(itertools.accumulate(group_sizes(num_classes, g)[:-1]))
            group_id += [offset + bisect.bisect_right(stage_cuts, r) for r in block_rank]
            block_id += range(len(block_count))
            offset += g
        chunks.append((offset, tuple(group_id), tuple(block_id)))
    return Layout(atom_sizes, bounds, block, tuple(atom_first_slot), tuple(block_count), tuple(chunks))


class _DeviceTables(NamedTuple):
    chunks: list
    counts: torch.Tensor  # (blocks,) real classes per block, float
    pad_slots: torch.Tensor  # (pads,) flat indices of the padding slots (possibly empty)


@functools.lru_cache(maxsize=64)
def _tables(layout: Layout, device: torch.device, dtype: torch.dtype) -> _DeviceTables:
    counts = torch.tensor(layout.block_count, device=device, dtype=dtype)
    chunks = []
    for groups, g, b in layout.chunks:
        b_idx = torch.tensor(b, device=device)
        chunks.append((groups, torch.tensor(g, device=device), b_idx, counts.index_select(0, b_idx).double()))
    padding = torch.arange(layout.block) >= torch.tensor(layout.block_count).unsqueeze(-1)
    return _DeviceTables(chunks, counts, padding.flatten().nonzero().squeeze(-1).to(device))


# ----------------------------------------------------------------------------------------------
# Priority order -> the slot of every class
# ----------------------------------------------------------------------------------------------
def priority_key(s: torch.Tensor, t: torch.Tensor, rank_by: str) -> torch.Tensor | None:
    """Values whose descending order (ties: lower class index first) is the distillation priority."""
    if rank_by == "abs_diff":
        return ((t - t.mean(dim=-1, keepdim=True)) - (s - s.mean(dim=-1, keepdim=True))).abs()
    if rank_by == "teacher":
        return t
    return None


_workspace = threading.local()  # per-thread numpy buffers: fresh multi-MB arrays page-fault on every call


def _buffer(name: str, shape, dtype) -> np.ndarray:
    buf = getattr(_workspace, name, None)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = np.empty(shape, dtype)
        setattr(_workspace, name, buf)
    return buf


def _priority_numpy(s: np.ndarray, t: np.ndarray, rank_by: str) -> np.ndarray:
    """:func:`priority_key` on numpy rows, into a reused buffer."""
    if rank_by == "teacher":
        return t
    key = _buffer("key", s.shape, s.dtype)
    centred_s = _buffer("centred_s", s.shape, s.dtype)
    np.subtract(t, t.mean(axis=-1, keepdims=True), out=key)
    np.subtract(s, s.mean(axis=-1, keepdims=True), out=centred_s)
    np.subtract(key, centred_s, out=key)
    return np.abs(key, out=key)


def _atom_ids_numpy(key: np.ndarray, bounds: tuple[int, ...]) -> np.ndarray:
    """Atom of every class: the number of boundaries ``b`` with ``rank(class) >= b``.

    ``rank`` is the position in descending ``key`` order, ties broken by lower class index. For a
    boundary ``b`` let ``v`` be the value at descending position ``b``: classes above ``v`` come
    before it, classes below after it. Tied classes straddle it only when position ``b - 1`` also
    holds ``v``; then the first ``b - #(key > v)`` of them by class index come before.
    """
    c = key.shape[-1]
    ascending = _buffer("ascending", key.shape, key.dtype)
    np.copyto(ascending, key)
    ascending.sort(axis=-1)
    atom = _buffer("atom", key.shape, np.uint8 if len(bounds) < 255 else np.int64)
    atom.fill(0)
    after = _buffer("after", key.shape, np.bool_)
    for b in bounds:
        v = ascending[:, c - 1 - b, None]
        np.less_equal(key, v, out=after)
        straddle = np.nonzero(ascending[:, c - b] == v[:, 0])[0]
        if straddle.size:
            k, vv = key[straddle], v[straddle]
            ties = k == vv
            from_ties = b - (k > vv).sum(axis=-1, keepdims=True)
            after[straddle] = (k < vv) | (ties & (np.cumsum(ties, axis=-1) > from_ties))
        np.add(atom, after, out=atom)
    return atom


def _slots_numpy(key: np.ndarray, layout: Layout, out: np.ndarray) -> None:
    """Write each class's slot into ``out`` (int64, the key's shape).

    The slot is ``first_slot(atom) + (number of earlier classes in the same atom)``. Every atom gets a
    bit field ("lane") of an int64; a cumulative sum of ``1 << lane(atom)``, seeded with the atoms'
    first slots, counts all atoms at once. With more atoms than lanes, a stable argsort does it.
    """
    n, c = key.shape
    atom = _atom_ids_numpy(key, layout.bounds)
    first = np.asarray(layout.atom_first_slot, dtype=np.int64)
    bits = layout.slots.bit_length()
    n_atoms = len(layout.atom_sizes)
    if n_atoms * bits > 63:
        order = np.argsort(atom, axis=-1, kind="stable")
        np.put_along_axis(out, order, np.broadcast_to(_slot_of_rank(layout), (n, c)), axis=-1)
        return
    shift = _buffer("shift", key.shape, np.uint8)
    np.multiply(atom, bits, out=shift, casting="unsafe")
    np.left_shift(np.int64(1), shift, out=out)
    out[:, 0] += int(np.sum(first << (bits * np.arange(n_atoms))))
    np.cumsum(out, axis=-1, out=out)
    np.right_shift(out, shift, out=out, casting="unsafe")
    np.bitwise_and(out, (1 << bits) - 1, out=out)
    out -= 1


@functools.lru_cache(maxsize=64)
def _slot_of_rank(layout: Layout) -> np.ndarray:
    """Slot of each rank position (the layout of rows that already are in priority order)."""
    return np.concatenate([first + np.arange(n) for first, n in zip(layout.atom_first_slot, layout.atom_sizes)])


def class_slots(s: torch.Tensor, t: torch.Tensor, rank_by: str, layout: Layout,
                backend: str = "auto") -> torch.Tensor | None:
    """``slot[i, c]``: where class ``c`` of row ``i`` goes in the ``(blocks * block)`` layout.

    The classes are ranked by :func:`priority_key` (descending, ties by lower class index);
    ``rank_by="none"`` keeps class-index order and returns one ``(C,)`` row for all. Returns None when
    the rows already are the layout (a single atom). ``backend``: ``"numpy"`` (CPU only), ``"torch"``
    (stable argsort), or ``"auto"`` (numpy on the CPU outside ``torch.compile``).
    """
    if not layout.bounds:
        return None
    if rank_by == "none":
        return torch.from_numpy(_slot_of_rank(layout)).to(s.device)
    if backend == "auto":
        use_numpy = s.device.type == "cpu" and ORDERING != "torch" and not torch.compiler.is_compiling()
        backend = "numpy" if use_numpy else "torch"
    if backend == "numpy":
        s_np, t_np = s.detach().contiguous().numpy(), t.detach().contiguous().numpy()
        out = torch.empty(s.shape, dtype=torch.long)  # torch-owned memory: see _buffer's comment
        _slots_numpy(_priority_numpy(s_np, t_np, rank_by), layout, out.numpy())
        return out
    order = torch.argsort(priority_key(s.detach(), t, rank_by), dim=-1, descending=True, stable=True)
    slot_of_rank = torch.from_numpy(_slot_of_rank(layout)).to(s.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, slot_of_rank)


# ----------------------------------------------------------------------------------------------
# The loss on the block layout, with its closed-form gradient
# ----------------------------------------------------------------------------------------------
def pcd_blocks(st: torch.Tensor, layout: Layout, factor: float, temperature: float, adaptive: bool,
               need_grad: bool):
    """Row losses of the paper variant, and d(sum of rows)/d(s) (or None), from student and teacher
    logits stacked as ``st`` of shape ``(2, N, blocks, block)`` (student first; padding holds ``-inf``).

    With ``x = logits / T``, ``m`` the block maximum, ``x' = x - m`` and ``e = exp(x')``, each block ``b``
    has the sums ``z = sum e`` (student and teacher), ``sum e_t xt'``, ``sum e_t xs'``, ``sum e_t^2``,
    ``sum xs'``, ``sum xs'^2``. Block ``b`` of group ``G`` has student mass share
    ``alpha_b = exp(lse_s,b - lse_s,G)`` and teacher share ``beta_b``; per group
    ``KL/T^2 = sum_b beta_b (KL_b + log beta_b - log alpha_b)`` (``KL_b``: within the block),
    ``<q_t, log q_s> = sum_b beta_b (Qc_b + mu_b - lse_s,G)``, ``|q_t|^2 = sum_b beta_b^2 R_b`` and
    ``|log q_s|^2 = sum_b M2_b + n_b (mu_b - lse_s,G)^2``, where ``Qc, R`` are the block-softmax averages
    of ``xs - mu`` and ``p_t``, and ``mu, M2`` the mean and centred sum of squares of ``xs``.
    The gradient per class is ``p_s c1 + p_t c2 + (xs - mu) c3 + c4`` with per-block ``c`` summed over stages.
    """
    tables = _tables(layout, st.device, st.dtype)
    n_rows = st.shape[1]
    inv_t = 1.0 / temperature
    peak = st.amax(dim=-1, keepdim=True)  # (2, N, blocks, 1)
    # slots: 0 e_s, 1 e_t, 2 xs', 3 xt', 4 e_t^2, 5 e_t xs', 6 e_t xt', 7 xs'^2
    work = st.new_empty((8,) + st.shape[1:])
    torch.sub(st, peak, out=work[2:4]).mul_(inv_t)
    torch.exp(work[2:4], out=work[0:2])
    if tables.pad_slots.numel():  # exp gave 0 on padding; the x' terms must be 0 there too
        work[2:4].view(2, n_rows, layout.slots).index_fill_(-1, tables.pad_slots, 0.0)
    torch.mul(work[1:2], work[1:4], out=work[4:7])
    torch.mul(work[2], work[2], out=work[7])
    sums = work.sum(dim=-1).to(torch.float64)  # (8, N, blocks); the combination runs in float64
    z_s, z_t, s1, _, sum_et_sq, sum_et_xs, sum_et_xt, s2 = sums.unbind(0)
    e_s, e_t, xs_shift = work[0], work[1], work[2]
    peak_s, peak_t = (peak.squeeze(-1).to(torch.float64) * inv_t).unbind(0)

    counts = tables.counts.to(torch.float64)
    log_z_s, log_z_t = torch.log(z_s), torch.log(z_t)
    mean_shift = s1 / counts  # mean of xs' over the block
    mu = peak_s + mean_shift
    per_block = torch.stack([
        peak_s + log_z_s,  # lse_s
        peak_t + log_z_t,  # lse_t
        (sum_et_xt - sum_et_xs) / z_t - log_z_t + log_z_s,  # KL within the block; 0 for one class
        sum_et_xs / z_t - mean_shift,  # Qc
        sum_et_sq / (z_t * z_t),  # R
        s2 - s1 * mean_shift,  # M2
        mu,
    ])
    row = st.new_zeros(n_rows, dtype=torch.float64)
    coef = st.new_zeros((4, n_rows, layout.blocks), dtype=torch.float64) if need_grad else None
    for groups, g_idx, b_idx, pair_counts in tables.chunks:
        def gsum(v, groups=groups, g_idx=g_idx):  # sum pairs into groups over the last dimension
            return v.new_zeros(v.shape[:-1] + (groups,)).index_add_(-1, g_idx, v)

        lse_s, lse_t, kl_b, qc_b, r_b, m2_b, mu_b = per_block.index_select(-1, b_idx)
        lse = torch.stack([lse_s, lse_t])
        index = g_idx.expand_as(lse)
        peak = lse.new_full(lse.shape[:-1] + (groups,), float("-inf")).scatter_reduce_(-1, index, lse, "amax")
        peak_pair = peak.gather(-1, index)  # shifting by each group's own peak keeps one-block groups exact
        lse_g = torch.log(gsum(torch.exp(lse - peak_pair))) + peak
        log_share = lse - lse_g.index_select(-1, g_idx)
        log_alpha, log_beta = log_share
        alpha, beta = torch.exp(log_share)
        d = mu_b - (lse_s - log_alpha)  # block mean of xs minus the group's log-sum-exp
        if adaptive:
            # KL / T^2 by the chain rule (within-block KLs plus the KL between block shares),
            # <q_t, log q_s>, |q_t|^2, |log q_s|^2 and sum of log q_s, per group
            kl, dot, norm_q2, norm_l2, sum_l = gsum(torch.stack([
                beta * (kl_b + log_beta - log_alpha), beta * (qc_b + d), beta * beta * r_b,
                m2_b + pair_counts * d * d, pair_counts * d]))
            norm_q = torch.sqrt(norm_q2).clamp_min(COS_EPS)
            norm_l_raw = torch.sqrt(norm_l2)
            norm_l = norm_l_raw.clamp_min(COS_EPS)
            inv = 1 / (norm_q * norm_l)
            weight = 1 - dot * inv
        else:
            kl = gsum(beta * (kl_b + log_beta - log_alpha))
            weight = torch.ones_like(kl)
        row += (weight * kl).sum(dim=-1)
        if not need_grad:
            continue
        if adaptive:
            gamma = torch.where(norm_l_raw > COS_EPS, dot * inv / (norm_l * norm_l), 0.0)  # d(1/|l|) term
            total_v = inv - gamma * sum_l  # sum over the group of d cos / d log q_s
            c_s, c_t, c3 = torch.stack([weight + kl * total_v, weight + kl * inv, kl * gamma]).index_select(-1, g_idx)
            pieces = torch.stack([alpha * c_s, -beta * c_t, c3, c3 * d])
        else:
            w = weight.index_select(-1, g_idx)
            pieces = torch.stack([alpha * w, -beta * w])
        coef[:len(pieces)].index_add_(-1, b_idx, pieces)
    row *= factor * temperature**2  # each group's KL carries T^2
    if not need_grad:
        return row.to(st.dtype), None
    # d/dxs = p_s c1 + p_t c2 + (xs - mu) c3 + c4, with p = e / z and xs - mu = xs' - mean_shift
    scale = factor * temperature  # T^2 from the loss, 1/T from x = s / T
    c = torch.stack([coef[0] / z_s, coef[1] / z_t, coef[2], coef[3] - coef[2] * mean_shift]) * scale
    c = c.to(st.dtype).unsqueeze(-1)
    grad = torch.mul(e_s, c[0]).addcmul_(e_t, c[1])
    if adaptive:
        grad.addcmul_(xs_shift, c[2]).add_(c[3])
    return row.to(st.dtype), grad


class PCDRows(torch.autograd.Function):
    """Row losses from logits ``s, t`` of shape ``(N, C)`` and each class's slot: ``(N, C)``, ``(C,)``, or
    None when the rows already are the layout.

    Saves only the ``(N, C)`` gradient computed in the forward pass.
    """

    @staticmethod
    def forward(ctx, s, t, slot, layout, factor, temperature, adaptive):
        n_rows = s.shape[0]
        if slot is None:
            st = torch.stack([s, t]).view(2, n_rows, layout.blocks, layout.block)
        else:
            slot = slot.expand(n_rows, -1)
            st = s.new_empty((2, n_rows, layout.slots))
            st[0].scatter_(1, slot, s)
            st[1].scatter_(1, slot, t)
            st.index_fill_(-1, _tables(layout, s.device, s.dtype).pad_slots, float("-inf"))
            st = st.view(2, n_rows, layout.blocks, layout.block)
        row, grad = pcd_blocks(st, layout, factor, temperature, adaptive, need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            grad = grad.view(n_rows, layout.slots)
            ctx.save_for_backward(grad if slot is None else grad.gather(1, slot))
        return row

    @staticmethod
    def backward(ctx, grad_row):
        (grad,) = ctx.saved_tensors
        return grad * grad_row.unsqueeze(-1), None, None, None, None, None, None
