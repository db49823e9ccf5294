"""PCD's per-row computation in plain torch: one sort, one pass of sums, a closed-form gradient.

For a chunk of rows (see docs/method.md, "How it is computed"):

1. Priority key per class, one stable descending sort per row, each class's rank position ``pos``.
2. Every stage's group boundaries are rank positions (``tensor_split`` of the row's live classes), so
   the union of all boundaries cuts a row into *atoms*; each atom lies inside one group of every
   stage. Absent classes go to a dump atom.
3. One ``scatter_add`` gives seven sums per atom (nine for ``weight="prob_cos"``; exponentials shifted by
   the atom's maximum); every group statistic of every stage (log-sum-exp, KL, the cosine's dot product
   and norms) is combined from them on small ``(rows, stages * atoms)`` arrays in float64
   (:func:`combine_atoms`, shared with the Triton path; the CPU kernel, ``_pcd_native.cpp``, does it in loops).
4. The gradient of ``w_G KL_G`` w.r.t. a class is a combination of four per-class arrays with per-atom
   coefficients summed over the stages (``e_s P + e_t Q + u R + S``), so it is one more pass, whatever
   the number of stages.

This path has no data-dependent shapes: ``torch.compile`` traces it, and on CUDA nothing syncs.
"""
from __future__ import annotations

import dataclasses

import torch

COS_EPS = 1e-8
WORK_ARRAYS = 30  # (rows, C)-sized temporaries alive at once, in units of the compute dtype
WEIGHTS = ("log_prob_cos", "prob_cos")  # w_G = 1 - cos(q_t, log q_s)  or  1 - cos(q_t, q_s)


def priority_key(s: torch.Tensor, t: torch.Tensor, live: torch.Tensor, rank_by: str) -> torch.Tensor:
    """Descending sort key: live classes by METHOD.md's rule, absent classes last (``-inf``)."""
    s_inf, t_inf = torch.isneginf(s), torch.isneginf(t)
    if rank_by == "abs_diff":
        both = ~s_inf & ~t_inf

        def centred(z):
            n = both.sum(-1, keepdim=True).clamp_min(1)
            return z - torch.where(both, z, 0.0).sum(-1, keepdim=True) / n

        key = torch.where(both, (centred(t) - centred(s)).abs(), float("inf"))  # one side -inf: ranks first
    elif rank_by == "teacher":
        key = torch.where(t_inf, torch.finfo(t.dtype).min, t)
    else:
        key = -torch.arange(s.shape[-1], device=s.device, dtype=s.dtype).expand_as(s)
    return torch.where(live, key, float("-inf"))


def sortable(key: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the float ``key`` (sign-magnitude bits to two's complement): integer sorts
    are 1.5-2.5x faster than float sorts on the CPU, and the order, ties included, is the same."""
    key = torch.where(key == 0, 0.0, key)  # -0.0 ties with 0.0, as in a float comparison
    bits = key.view(torch.int32 if key.dtype == torch.float32 else torch.int64)
    return torch.where(bits < 0, bits ^ torch.iinfo(bits.dtype).max, bits)


def stage_bounds(n: torch.Tensor, groups: int) -> torch.Tensor:
    """Interior boundaries ``(rows, groups - 1)`` of ``tensor_split(range(n), groups)``: ``i*base + min(i, n mod g)``."""
    i = torch.arange(1, groups, device=n.device)
    return i * (n // groups).unsqueeze(-1) + torch.minimum(i, (n % groups).unsqueeze(-1))


def atom_cuts(n: torch.Tensor, stage_groups: list[int], num_classes: int) -> torch.Tensor:
    """``(rows, atoms)``: every stage's interior boundaries sorted, then ``n``; atom k spans ``[cuts[k-1], cuts[k])``.

    A repeated group count cuts at the same places, so only the distinct ones are used. Where the stages
    have more boundaries than there are classes (K near C), every rank position is its own atom instead.
    """
    if sum(g - 1 for g in set(stage_groups)) >= num_classes:
        return torch.minimum(torch.arange(1, num_classes + 1, device=n.device), n.unsqueeze(-1))
    bounds = [stage_bounds(n, g) for g in sorted(set(stage_groups))]
    return torch.cat(bounds + [n.unsqueeze(-1)], -1).sort(-1).values


@dataclasses.dataclass(frozen=True)
class Atoms:
    """How rank positions divide into atoms, and atoms into every stage's groups (per row, or one shared row)."""

    cuts: torch.Tensor  # (rows, atoms): the end of each atom
    count: torch.Tensor  # (rows, 1, atoms) float64: classes in each atom
    group: torch.Tensor  # (rows, stages * atoms): the group of each atom in each stage, numbered across stages
    groups: int  # groups of all stages
    several: torch.Tensor  # (rows, groups): the group has two classes or more (one class: KL exactly 0)


def atom_layout(cuts: torch.Tensor, n: torch.Tensor, stage_groups: list[int]) -> Atoms:
    """:class:`Atoms` ending at ``cuts`` (e.g. :func:`atom_cuts`) in rows with ``n`` live classes.

    ``tensor_split`` of ``n`` classes into ``g`` groups: the first ``r = n mod g`` hold ``q + 1 = n // g + 1``.
    An empty atom at ``n`` lands in its stage's last group, where it adds nothing.
    """
    starts = torch.cat([torch.zeros_like(cuts[:, :1]), cuts[:, :-1]], 1)
    g = torch.tensor(stage_groups, device=n.device).unsqueeze(-1)  # (stages, 1)
    q, r = n[:, None, None] // g, n[:, None, None] % g
    long_end = r * (q + 1)
    p = starts.unsqueeze(1)
    group = torch.where(p < long_end, p // (q + 1), r + (p - long_end) // q.clamp_min(1))
    group = (torch.minimum(group, g - 1) + g.cumsum(0) - g).flatten(1)
    count = (cuts - starts).to(torch.float64)
    size = count.new_zeros(len(cuts), sum(stage_groups)).scatter_add_(1, group, count.repeat(1, len(stage_groups)))
    return Atoms(cuts, count.unsqueeze(1), group, sum(stage_groups), size > 1)


def sum_count(adaptive: bool, weight: str) -> int:
    """Per-atom sums :func:`combine_atoms` reads: e_s, u, u^2, e_t, e_t (b - a), e_t u, e_t^2 [, e_s^2, e_s e_t]."""
    return 9 if adaptive and weight == "prob_cos" else 7


COMBINE_CELLS = 2**21  # rows x stages x atoms combined at once (about 150 bytes each): K near C goes in blocks


def combine_atoms(m: torch.Tensor, sums: torch.Tensor, atoms: Atoms, stage_groups: list[int], temperature: float,
                  adaptive: bool, weight: str, want_grad: bool):
    """Every stage's ``sum_G w_G KL_G`` from per-atom maxima ``(2, rows, atoms)`` (student, teacher) and shifted sums
    ``(sum_count, rows, atoms)`` (e_s, u, u^2, e_t, e_t (b - a), e_t u, e_t^2, then e_s^2, e_s e_t for
    ``prob_cos``; ``e = exp(z/T - atom max)``, ``u = s/T - atom max``), in float64, many stages at once.

    ``atoms`` may describe any atoms that refine every stage's groups. Returns the loss ``(rows,)`` (float64,
    before ``factor``) and the gradient coefficients ``(4, rows, atoms)`` in ``m``'s dtype on the per-class
    arrays ``(e_s, e_t, u, 1)``, or ``(e_s, e_t, e_s^2, e_s e_t)`` for ``prob_cos``.
    """
    rows, n_atoms = m.shape[1:]
    step = max(1, COMBINE_CELLS // max(rows * n_atoms, 1))
    if step >= len(stage_groups):
        return _combine(m, sums, atoms, stage_groups, temperature, adaptive, weight, want_grad)
    loss, coef, first = 0.0, 0.0, 0
    for i in range(0, len(stage_groups), step):
        block = stage_groups[i:i + step]
        group = atoms.group[:, i * n_atoms:(i + len(block)) * n_atoms] - first  # the block's groups from 0
        several = atoms.several[:, first:first + sum(block)]
        part = _combine(m, sums, Atoms(atoms.cuts, atoms.count, group, sum(block), several), block, temperature,
                        adaptive, weight, want_grad)
        loss, coef, first = loss + part[0], (coef + part[1]) if want_grad else None, first + sum(block)
    return loss, coef


def _combine(m, sums, atoms: Atoms, stage_groups: list[int], temperature: float, adaptive: bool, weight: str,
             want_grad: bool):
    (rows, n_atoms), stages, groups = m.shape[1:], len(stage_groups), atoms.groups
    dtype, f64, neg = m.dtype, torch.float64, float("-inf")
    index = atoms.group.expand(rows, -1)

    def per_group(x):  # (k, rows, stages or 1, atoms) summed over each group's atoms: (k, rows, groups)
        flat = x.expand(-1, rows, stages, n_atoms).reshape(x.shape[0], rows, -1)
        return flat.new_zeros(x.shape[0], rows, groups).scatter_add_(2, index.expand(x.shape[0], -1, -1), flat)

    def per_atom(x):  # (k, rows, groups): each atom's group value in each stage, (k, rows, stages, atoms)
        return x.gather(2, index.expand(x.shape[0], -1, -1)).view(x.shape[0], rows, stages, n_atoms)

    # per-atom values as (.., rows, 1, atoms), against (.., rows, stages, atoms) where they depend on the group
    sums = sums.to(f64).unsqueeze(2)
    m = m.to(f64).unsqueeze(2)
    z = sums[0:4:3]  # the sums of e_s and e_t
    live = z > 0
    # log-sum-exp of each group, student and teacher together (0 for an empty group)
    top = m.new_full((2, rows, groups), neg).scatter_reduce_(
        2, index.expand(2, -1, -1), m.masked_fill(~live, neg).expand(2, rows, stages, n_atoms).reshape(2, rows, -1),
        "amax")
    top.masked_fill_(top == neg, 0.0)
    # an empty atom's m is 0, whose exp(m - top) overflows in a group far below 0: where(), never inf * 0
    total = per_group(torch.where(live, z * torch.exp(m - per_atom(top)), 0.0))
    lse = top + torch.log(total.masked_fill_(total == 0, 1.0))
    log_w = m - per_atom(lse)  # within an atom log q = (u or b - m_t) + log_w: q_s = w_s e_s, q_t = w_t e_t
    w_s, w_t = torch.where(live, torch.exp(log_w), 0.0)
    delta = log_w[0]
    z_s, sum_u, sum_uu, z_t, sum_tdiff, sum_tu, sum_tt = sums[:7]
    count = atoms.count
    t2 = temperature**2
    terms = [w_t * z_t, w_t * sum_tdiff]
    if adaptive and weight == "log_prob_cos":  # cos(q_t, log q_s), log q_s = u + delta
        terms += [w_t * (sum_tu + delta * z_t), w_t * w_t * sum_tt, sum_u + count * delta,
                  sum_uu + delta * (2 * sum_u + count * delta)]
    elif adaptive:  # cos(q_t, q_s)
        terms += [w_t * w_s * sums[8], w_t * w_t * sum_tt, w_s * w_s * sums[7]]
    g = per_group(torch.stack(terms))
    mass_t = g[0]  # sum of q_t over the group: 1, or 0 without teacher mass
    lse_s, lse_t = lse
    kl = t2 * (g[1] + lse_s - lse_t) * ((mass_t > 0) & atoms.several)  # a group of one class has KL exactly 0
    # d KL / d(s_c/T) = T^2 (q_s,c mass_t - q_t,c); the weight's derivative adds terms in the third and fourth arrays
    if not adaptive:
        loss = kl.sum(-1)
        coef = [t2 * mass_t, torch.full_like(kl, -t2)]
    else:
        dot, norm_t = g[2], g[3].sqrt()
        norm_s = (g[5] if weight == "log_prob_cos" else g[4]).clamp_min(0).sqrt()
        nt, ns = norm_t.clamp_min(COS_EPS), norm_s.clamp_min(COS_EPS)
        cos = dot / (nt * ns)
        w = 1 - cos
        loss = (w * kl).sum(-1)
        ns_grad = cos / (ns * ns) * (norm_s > COS_EPS)
        if weight == "log_prob_cos":
            coef = [w * t2 * mass_t + kl * (mass_t / (nt * ns) - ns_grad * g[4]), -w * t2 - kl / (nt * ns),
                    kl * ns_grad]  # the last on log q_s = u + delta: u and the constant
        else:
            coef = [w * t2 * mass_t + kl * (cos - ns_grad * norm_s * norm_s), -w * t2, kl * ns_grad,
                    -kl / (nt * ns)]  # the last two on q_s^2 and q_s q_t
    if not want_grad:
        return loss, None
    c = per_atom(torch.stack(coef))
    planes = [c[0] * w_s, c[1] * w_t]
    if not adaptive:
        planes += [torch.zeros_like(w_s)] * 2
    elif weight == "log_prob_cos":
        planes += [c[2], c[2] * delta]
    else:
        planes += [c[2] * w_s * w_s, c[3] * w_s * w_t]
    return loss, torch.stack(planes).sum(2).to(dtype)


def gradient_arrays(e_s: torch.Tensor, e_t: torch.Tensor, u: torch.Tensor, adaptive: bool, weight: str):
    """The four per-class arrays :func:`combine_atoms`'s coefficients multiply (``None`` for the constant 1)."""
    if adaptive and weight == "prob_cos":
        return e_s, e_t, e_s * e_s, e_s * e_t
    return e_s, e_t, u, None


def finish_loss(loss: torch.Tensor, nan_row: torch.Tensor, inf_row: torch.Tensor, factor: float, dtype: torch.dtype):
    """``factor * loss``; NaN for rows with NaN or ``+inf``; ``+inf`` where the student rules out a teacher class."""
    return torch.where(nan_row, float("nan"), torch.where(inf_row, float("inf"), factor * loss)).to(dtype)


def pcd_rows(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
             adaptive: bool, rank_by: str, want_grad: bool, weight: str = "log_prob_cos"):
    """Per-row PCD loss ``factor * sum_stages sum_G w_G KL_G`` and its gradient w.r.t. ``s``."""
    rows, num_classes = s.shape
    s_inf, t_inf = torch.isneginf(s), torch.isneginf(t)
    live = ~(s_inf & t_inf)
    t_ok = live & ~t_inf
    n = live.sum(-1)
    inf_row = (live & s_inf & ~t_inf).any(-1)  # the student rules out a class the teacher keeps: loss +inf
    nan_row = (torch.isnan(s) | torch.isposinf(s) | torch.isnan(t) | torch.isposinf(t)).any(-1)

    # 1-2. one sort per row; boundaries of every stage; each class's atom, marked in rank order
    order = torch.sort(sortable(priority_key(s, t, live, rank_by)), dim=-1, descending=True, stable=True).indices
    cuts = atom_cuts(n, stage_groups, num_classes)
    # the atom of rank position p is the number of cuts <= p; positions >= n land in the dump atom
    marks = torch.zeros(rows, num_classes + 1, dtype=torch.int64, device=s.device)
    atom_by_rank = marks.scatter_add_(1, cuts, torch.ones_like(cuts)).cumsum(1)[:, :num_classes]
    atoms = cuts.shape[-1]
    layout = atom_layout(cuts, n, stage_groups)
    atom = torch.empty_like(order).scatter_(1, order, atom_by_rank)

    # 3. per-atom sums, shifted by the atom's maxima (absent classes sit in the dump atom, never read)
    a = torch.where(s_inf, 0.0, s / temperature)
    b = torch.where(t_ok, t / temperature, float("-inf"))
    neg = torch.full((rows, atoms + 1), float("-inf"), dtype=s.dtype, device=s.device)
    m_s = neg.scatter_reduce(1, atom, a, "amax")
    m_t = neg.scatter_reduce(1, atom, b, "amax")
    m_s = torch.where(torch.isneginf(m_s), 0.0, m_s)  # an empty atom
    m_t = torch.where(torch.isneginf(m_t), 0.0, m_t)  # an atom without teacher mass
    parts = torch.empty(sum_count(adaptive, weight), rows, num_classes, dtype=s.dtype, device=s.device)
    u = torch.sub(a, m_s.gather(1, atom), out=parts[1])
    e_s = torch.exp(u, out=parts[0])
    torch.mul(u, u, out=parts[2])
    e_t = torch.exp(b - m_t.gather(1, atom), out=parts[3])  # 0 where the teacher is -inf
    torch.mul(e_t, torch.where(t_ok, b - a, 0.0), out=parts[4])
    torch.mul(e_t, u, out=parts[5])
    torch.mul(e_t, e_t, out=parts[6])
    if len(parts) == 9:
        torch.mul(e_s, e_s, out=parts[7])
        torch.mul(e_s, e_t, out=parts[8])
    sums = parts.new_zeros(len(parts), rows, atoms + 1).scatter_add_(2, atom.expand_as(parts), parts)
    loss, coef = combine_atoms(torch.stack([m_s, m_t])[..., :atoms], sums[..., :atoms], layout, stage_groups,
                               temperature, adaptive, weight, want_grad)
    loss = finish_loss(loss, nan_row, inf_row, factor, s.dtype)

    if not want_grad:
        return loss, None

    # 4. the gradient, one pass over the classes (the dump atom's coefficients are 0)
    coef = torch.cat([coef, coef.new_zeros(4, rows, 1)], -1).gather(2, atom.expand(4, rows, num_classes))
    x1, x2, x3, x4 = gradient_arrays(e_s, e_t, u, adaptive, weight)
    grad = x1 * coef[0] + x2 * coef[1] + x3 * coef[2] + (coef[3] if x4 is None else x4 * coef[3])
    return loss, torch.where((inf_row | nan_row).unsqueeze(-1), float("nan"), grad * (factor / temperature))
