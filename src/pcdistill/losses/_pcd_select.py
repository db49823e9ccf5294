"""PCD's per-row computation on the CPU for large chunks: atoms by thresholds, the per-class work compiled.

The same atoms, sums and closed-form gradient as ``_pcd_rows`` (read its docstring first); two steps differ.

1. *Thresholds.* Classes rank by an integer ``key`` (the priority key's order-preserving integer image),
   descending, ties to the lower class index. An atom ends at a rank position ``p``; call the class there
   ``(w, i)`` (its key, its index). A class lies past the cut exactly when its key is ``< w``, or ``== w``
   and its index is ``>= i``; so its atom is the number of cuts it lies past, computed wherever it is needed
   from the key and a few numbers per row, with no sort, gather or scatter of ``(rows, C)`` arrays. numpy's
   ``partition`` finds every cut's ``w`` in O(C) per row (one kth per call, which takes its SIMD path). ``i``
   matters only where several classes hold the key ``w`` (a tie across the cut): with ``i = 0`` they would
   all lie past it and the atom before comes up short, which its class count shows; ``i`` is then found by
   counting in those rows alone.
2. *Passes.* The exponentials are shifted by the row's maxima (any shift gives the same sums; the atom's
   own maximum is needed only when an atom's largest term would underflow, which the sums show, and then
   one more pass finds the atoms' maxima). A pass computes the classes' atoms, their counts and the first
   sums; further passes the other sums (at most ``ACCUMULATORS`` each); the last the gradient in class
   order. ``torch.compile`` turns each into one vectorised C++ loop over the chunk; per-atom values are
   picked by selects, not gathers, so that loop stays vectorised. The row's maxima need no select, a pass
   before any tie shows compares each key once per cut, and a finite chunk has no dump and no non-finite
   difference to zero: together about a tenth of the rows' time.

The compiled passes cost a call overhead and a first-call compilation, so ``_pcd_cpu`` uses them for large
chunks with few cuts only (:func:`usable`); its tiles do the rest.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ._pcd_rows import atom_cuts, atom_layout, combine_atoms, finish_loss, priority_key, sortable

MAX_CUTS = 10  # interior cuts (K = 5 has 10): more, and the per-class compares outweigh what the passes save
MIN_LOGITS = 2**16  # in a chunk: below, the compiled calls' overhead outweighs their speed
CHUNK_LOGITS = 2**20  # at most in a chunk: fewer calls (each ~0.3 ms) than 2**19, and faster than 2**21
WORK_ARRAYS = 6  # (rows, C)-sized arrays at once: the inputs, the key, its partitioned copy, the atoms, the gradient
COMPILED = True  # False: the same passes in eager torch (tests of the logic without compiling)


def few_cuts(num_classes: int, stage_groups: list[int]) -> bool:
    """Whether rows of ``num_classes`` classes and these stages go to :func:`pcd_rows_select` once large enough
    (and the passes compile)."""
    cuts = sum(g - 1 for g in set(stage_groups))  # as _pcd_rows.atom_cuts counts them
    return COMPILED and cuts <= MAX_CUTS and cuts < num_classes


def usable(rows: int, num_classes: int, stage_groups: list[int]) -> bool:
    """Whether a chunk goes to :func:`pcd_rows_select`."""
    return rows * num_classes >= MIN_LOGITS and few_cuts(num_classes, stage_groups)


def row_state(s: torch.Tensor, t: torch.Tensor, rank_by: str, compiled: bool = False):
    """Live-class counts, the NaN and +inf row flags (all None when every value is finite) and the integer key
    (int32 for float32 rows: the float bits of a key >= 0 are in order already)."""
    rows, num_classes = s.shape
    sum_s, sum_t = s.sum(-1, keepdim=True), t.sum(-1, keepdim=True)
    if math.isfinite((sum_s + sum_t).sum()):  # no inf, no NaN: every class is live (n = None)
        n = None
        if rank_by == "abs_diff":  # as priority_key rounds it
            key = (_compiled(abs_diff) if compiled else abs_diff)(s, t, sum_s / num_classes, sum_t / num_classes)
            return n, None, None, key.view(torch.int32) if key.dtype == torch.float32 else sortable(key)
        key = t if rank_by == "teacher" else -torch.arange(num_classes, dtype=s.dtype).expand_as(s)
        return n, None, None, sortable(key)
    s_inf, t_inf = torch.isneginf(s), torch.isneginf(t)
    live = ~(s_inf & t_inf)
    inf_row = (live & s_inf & ~t_inf).any(-1)  # the student rules out a class the teacher keeps: loss +inf
    nan_row = (torch.isnan(s) | torch.isposinf(s) | torch.isnan(t) | torch.isposinf(t)).any(-1)
    return live.sum(-1), nan_row, inf_row, sortable(priority_key(s, t, live, rank_by))


def abs_diff(s, t, mean_s, mean_t):
    """``|(t - mean t) - (s - mean s)|``, the priority key of finite rows."""
    return ((t - mean_t) - (s - mean_s)).abs()


def atom_of(key: torch.Tensor, w: torch.Tensor, tie: torch.Tensor | None, dead: int | None) -> torch.Tensor:
    """``(rows, C)`` int32: the number of cuts each class lies past (see the module's docstring; ``tie`` None: 0
    everywhere); the dump, ``cuts + 1``, for an absent class (``key == dead``; None: there is none)."""
    index = torch.arange(key.shape[1], dtype=torch.int32, device=key.device)
    atom = torch.zeros_like(key, dtype=torch.int32)
    for j in range(w.shape[1]):
        if tie is None:
            past = key <= w[:, j:j + 1]
        else:
            past = (key < w[:, j:j + 1]) | ((key == w[:, j:j + 1]) & (index >= tie[:, j:j + 1]))
        atom = atom + past.to(torch.int32)
    return atom if dead is None else torch.where(key == dead, w.shape[1] + 1, atom)


def _per_class(table: torch.Tensor, atom: torch.Tensor) -> torch.Tensor:
    """``table`` ``(rows, atoms)`` read at each class's atom: ``(rows, C)`` (0 in the dump). Selects, not a gather,
    and one table at a time, so that the compiled loop stays one vectorised loop."""
    out = torch.zeros((), dtype=table.dtype)
    for k in range(table.shape[-1]):
        out = torch.where(atom == k, table[:, k:k + 1], out)
    return out


def atom_maxima(s, t, key, w, tie, dead: int | None, temperature: float) -> torch.Tensor:
    """``(2, rows, atoms)``: the largest ``s/T`` and ``t/T`` of each atom (0 for none, or ``-inf`` only), the shift
    where the row's maxima would underflow an atom's terms."""
    atom = atom_of(key, w, tie, dead)
    m = torch.stack([torch.stack([torch.where(atom == k, z, float("-inf")).amax(-1) for k in range(w.shape[1] + 1)],
                                 -1) for z in (s / temperature, t / temperature)])
    return torch.where(torch.isneginf(m), 0.0, m)


def row_maxima(s, t, temperature: float) -> torch.Tensor:
    """``(2, rows, 1)``: the largest ``s/T`` and ``t/T`` of each row (0 where not finite)."""
    m = torch.stack([s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)]) / temperature
    return torch.where(torch.isfinite(m), m, 0.0)


def _class_values(s, t, atom, m, temperature: float, finite: bool):
    """Per class: ``e_s = exp(a - m_s)``, ``u = a - m_s`` (0 where not finite), ``e_t = exp(b - m_t)`` and
    ``b - a`` (0 where not finite), with ``a = s/T``, ``b = t/T`` and ``m`` the class's atom maxima (``(2, rows, 1)``:
    the row's, the same for every atom, which spares each class a select per atom)."""
    a, b = s / temperature, t / temperature
    m_s, m_t = (m[0], m[1]) if m.shape[-1] == 1 else (_per_class(m[0], atom), _per_class(m[1], atom))
    u = a - m_s
    diff = b - a
    if not finite:
        u, diff = torch.where(torch.isfinite(u), u, 0.0), torch.where(torch.isfinite(diff), diff, 0.0)
    return torch.exp(a - m_s), u, torch.exp(b - m_t), diff


SUMS = ("e_s", "u", "uu", "e_t", "e_t_diff", "e_t_u", "e_t_e_t", "e_s_e_s", "e_s_e_t")  # combine_atoms's order
ACCUMULATORS = 16  # sums per compiled pass: more, and the loop's accumulators spill (2.6x slower at 28)


def first_sums(s, t, key, w, tie, dead: int | None, m, temperature: float, names: tuple[str, ...], finite: bool):
    """:func:`atom_sums` of the classes' atoms from their keys, and ``(rows, atoms)``: the classes in each atom
    (which tell a tie across a cut, see :func:`pcd_rows_select`); ``(rows, C)`` int32: the atoms, for later passes."""
    atom = atom_of(key, w, tie, dead)
    count = torch.stack([(atom == k).sum(-1) for k in range(w.shape[1] + 1)], -1)
    return atom_sums(s, t, atom, m, temperature, names, w.shape[1] + 1, finite), count, atom


def atom_sums(s, t, atom, m, temperature: float, names: tuple[str, ...], atoms: int, finite: bool) -> torch.Tensor:
    """``(len(names), rows, atoms)``: the sums :func:`_pcd_rows.combine_atoms` reads (``SUMS``), atom by atom."""
    e_s, u, e_t, diff = _class_values(s, t, atom, m, temperature, finite)
    value = {"e_s": lambda: e_s, "u": lambda: u, "uu": lambda: u * u, "e_t": lambda: e_t,
             "e_t_diff": lambda: e_t * diff, "e_t_u": lambda: e_t * u, "e_t_e_t": lambda: e_t * e_t,
             "e_s_e_s": lambda: e_s * e_s, "e_s_e_t": lambda: e_s * e_t}
    return torch.stack([torch.stack([torch.where(atom == k, x, 0.0).sum(-1) for k in range(atoms)], -1)
                        for x in (value[name]() for name in names)])


def class_gradient(s, t, atom, m, coef, temperature: float, prob_cos: bool, finite: bool) -> torch.Tensor:
    """``(rows, C)``: ``c0 e_s + c1 e_t + c2 u + c3`` (``prob_cos``: ``e_s (c0 + c2 e_s + c3 e_t) + c1 e_t``),
    each ``c`` its class's atom's coefficient ``coef`` ``(4, rows, atoms)``; 0 in the dump."""
    e_s, u, e_t, _ = _class_values(s, t, atom, m, temperature, finite)
    c = [_per_class(x, atom) for x in coef]
    g = e_s * (c[0] + c[2] * e_s + c[3] * e_t) + c[1] * e_t if prob_cos else c[0] * e_s + c[1] * e_t + c[2] * u + c[3]
    return torch.where(atom == coef.shape[-1], 0.0, g)


def cut_keys(key: torch.Tensor, cuts: torch.Tensor):
    """``(rows, atoms - 1)``: the key of the class at each interior cut (the tie index: :func:`_tie_index`).

    ``cuts`` ``(rows or 1, atoms)`` as :func:`_pcd_rows.atom_cuts` gives them (the last is the row's live-class
    count ``n``); ranks by ``key`` descending, ties to the lower index. Past ``n``, ``w`` is the dtype's minimum
    (no live class lies past such a cut).
    """
    rows, num_classes = key.shape
    w = torch.full((rows, cuts.shape[1] - 1), torch.iinfo(key.dtype).min, dtype=key.dtype)
    keys = key.numpy()  # partitioned (a copy) ascending: rank p sits at position C - 1 - p
    groups = [(slice(None), cuts[0])] if len(cuts) == 1 else rows_by_cuts(cuts)
    for which, row_cuts in groups:
        interior, n = row_cuts[:-1], row_cuts[-1]
        live = torch.nonzero(interior < n).flatten()
        positions = (num_classes - 1 - interior[live]).tolist()
        part = keys.copy() if isinstance(which, slice) else keys[which]  # fancy indexing copies already
        partition_at(part, positions)
        if positions:
            at = which if isinstance(which, slice) else torch.from_numpy(which)[:, None]
            w[at, live] = torch.from_numpy(part[:, positions])
    return w


def rows_by_cuts(cuts: torch.Tensor):
    """``(row indices, cuts)`` for each distinct row of ``cuts`` (rows with other live-class counts)."""
    unique, which = np.unique(cuts.numpy(), axis=0, return_inverse=True)
    return [(np.flatnonzero(which.reshape(-1) == i), torch.from_numpy(row)) for i, row in enumerate(unique)]


def partition_at(keys: np.ndarray, positions) -> None:
    """Partition the rows of ``keys`` in place so that each of ``positions`` (those inside the row) holds the key
    of that ascending rank, and the positions between two of them the keys of the ranks between."""
    start = 0
    for p in sorted(set(positions)):
        if p < keys.shape[1]:
            keys[:, start:].partition(p - start, axis=-1)
            start = p + 1  # the next partition leaves position p as it is


@functools.cache
def _dead_key(dtype: torch.dtype) -> int:
    """The key of an absent class (:func:`_pcd_rows.priority_key` gives it ``-inf``)."""
    return int(sortable(torch.tensor([float("-inf")], dtype=torch.float32 if dtype == torch.int32 else torch.float64)))


def _tie_index(key: torch.Tensor, cuts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Where several classes share the key ``w`` of a cut, the index of the class at the cut (0 elsewhere)."""
    tie = torch.zeros_like(w, dtype=torch.int32)
    for j in range(w.shape[1]):
        at = key == w[:, j:j + 1]
        tied = torch.nonzero(at.sum(-1) > 1).flatten()
        if len(tied):
            before = cuts[tied, j] - (key[tied] > w[tied, j:j + 1]).sum(-1)  # tied classes ahead of the cut
            tie[tied, j] = (at[tied].cumsum(-1) <= before[:, None]).sum(-1).to(torch.int32)
    return tie


@functools.lru_cache(maxsize=8)
def _shared_layout(n: int, num_classes: int, stage_groups: tuple[int, ...]):
    """Cuts and atoms of rows that all have ``n`` live classes: the same every step of a run."""
    cuts = atom_cuts(torch.tensor([n]), list(stage_groups), num_classes)
    return cuts, atom_layout(cuts, torch.tensor([n]), list(stage_groups))


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _run(fn, *args):
    return _compiled(fn)(*args) if COMPILED else fn(*args)


def pcd_rows_select(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
                    adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos"):
    """``_pcd_rows.pcd_rows``'s loss and gradient, by thresholds and passes (CPU tensors)."""
    rows, num_classes = s.shape
    if rows == 0:
        return s.new_zeros(0), s.new_zeros(0, num_classes) if want_grad else None
    n, nan_row, inf_row, key = row_state(s, t, rank_by, compiled=COMPILED)
    if n is None or bool((n == n[0]).all()):
        cuts, atoms = _shared_layout(num_classes if n is None else int(n[0]), num_classes, tuple(stage_groups))
    else:
        cuts = atom_cuts(n, stage_groups, num_classes)
        atoms = atom_layout(cuts, n, stage_groups)
    w = cut_keys(key, cuts)
    tie = None  # until a tie across a cut shows
    finite = n is None  # no -inf: no absent class, no u or b - a to zero
    dead = None if finite else _dead_key(key.dtype)
    prob_cos = adaptive and weight == "prob_cos"
    names = SUMS[:9 if prob_cos else 7]
    step = max(1, ACCUMULATORS // cuts.shape[1])

    def sums_and_atoms(m):
        first, count, atom = _run(first_sums, s, t, key, w, tie, dead, m, temperature, names[:step], finite)
        rest = [_run(atom_sums, s, t, atom, m, temperature, names[i:i + step], cuts.shape[1], finite)
                for i in range(step, len(names), step)]
        return torch.cat([first] + rest), count, atom

    # shifted by the row's maxima: exact unless an atom's largest term is near underflow, then by the atoms' own
    m = row_maxima(s, t, temperature)
    sums, count, atom = sums_and_atoms(m)
    # without a tie index, every class holding a cut's key lies past it: an atom short of its classes has a tie
    tied = torch.nonzero((count != atoms.count[:, 0]).any(-1)).flatten()
    if len(tied):
        tie = torch.zeros_like(w, dtype=torch.int32)
        tie[tied] = _tie_index(key[tied], cuts[:, :-1].expand(rows, -1)[tied], w[tied])
        sums, count, atom = sums_and_atoms(m)
    tiny = torch.finfo(s.dtype).tiny / torch.finfo(s.dtype).eps
    if bool(((count > 0) & ((sums[0] < tiny) | (sums[3] < tiny))).any()):
        m = _run(atom_maxima, s, t, key, w, tie, dead, temperature)
        sums, _, atom = sums_and_atoms(m)
    loss, coef = combine_atoms(m.expand(-1, -1, cuts.shape[1]), sums, atoms, stage_groups, temperature, adaptive,
                               weight, want_grad)
    loss = (factor * loss).to(s.dtype) if nan_row is None else finish_loss(loss, nan_row, inf_row, factor, s.dtype)
    if not want_grad:
        return loss, None
    grad = _run(class_gradient, s, t, atom, m, coef * (factor / temperature), temperature, prob_cos, finite)
    if nan_row is not None and bool((bad := nan_row | inf_row).any()):
        grad[bad] = float("nan")
    return loss, grad
