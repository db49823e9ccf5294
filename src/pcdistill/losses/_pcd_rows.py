"""PCD's per-row computation in plain torch: one sort, one pass of sums, a closed-form gradient.

For a chunk of rows (see docs/method.md, "How it is computed"):

1. Priority key per class, one stable descending sort per row, each class's rank position ``pos``.
2. Every stage's group boundaries are rank positions (``tensor_split`` of the row's live classes), so
   the union of all boundaries cuts a row into *atoms*; each atom lies inside one group of every
   stage. ``atom = searchsorted(boundaries, pos)``; absent classes go to a dump atom.
3. One ``scatter_add`` gives seven sums per atom (exponentials shifted by the atom's maximum);
   every group statistic of every stage (log-sum-exp, KL, the cosine's dot product and norms) is
   combined from them on small ``(rows, atoms)`` arrays in float64.
4. The gradient of ``w_G KL_G`` w.r.t. a class is ``e_s P + e_t Q + u R + S`` with per-atom
   coefficients summed over the stages, so it is one more pass, whatever the number of stages.
"""
from __future__ import annotations

import torch

COS_EPS = 1e-8
WORK_ARRAYS = 30  # (rows, C)-sized temporaries alive at once, in units of the compute dtype


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


def _group_lse(m: torch.Tensor, z: torch.Tensor, group: torch.Tensor, groups: int):
    """Per-group log-sum-exp from per-atom maxima ``m`` and shifted sums ``z``; 0 where a group is empty."""
    live = z > 0
    big = torch.full(m.shape[:-1] + (groups,), float("-inf"), dtype=m.dtype, device=m.device)
    top = big.scatter_reduce(1, group, torch.where(live, m, float("-inf")), "amax")
    top = torch.where(torch.isneginf(top), 0.0, top)
    total = torch.zeros_like(top).scatter_add(1, group, torch.where(live, z * torch.exp(m - top.gather(1, group)), 0.0))
    lse = top + torch.log(torch.where(total > 0, total, 1.0))
    return lse


def _scatter(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    return values.new_zeros(values.shape[:-1] + (groups,)).scatter_add(-1, group, values)


def atom_cuts(n: torch.Tensor, stage_groups: list[int]) -> torch.Tensor:
    """``(rows, atoms)``: every stage's interior boundaries sorted, then ``n``; atom k spans ``[cuts[k-1], cuts[k])``.

    A repeated group count cuts at the same places, so only the distinct ones are used.
    """
    bounds = [stage_bounds(n, g) for g in sorted(set(stage_groups))]
    return torch.cat(bounds + [n.unsqueeze(-1)], -1).sort(-1).values


def combine_atoms(m_s: torch.Tensor, m_t: torch.Tensor, sums: torch.Tensor, cuts: torch.Tensor, n: torch.Tensor,
                  stage_groups: list[int], temperature: float, adaptive: bool, want_grad: bool):
    """Every stage's ``sum_G w_G KL_G`` from per-atom maxima ``(rows, atoms)`` and the seven shifted sums
    ``(rows, 7, atoms)`` (e_s, u, u^2, e_t, e_t (b - a), e_t u, e_t^2), in float64.

    ``cuts`` (the atoms' ends) may describe any atoms that refine every stage's groups. Returns the loss
    ``(rows,)`` (float64, before ``factor``) and the gradient coefficients ``(4, rows, atoms + 1)`` on
    e_s, e_t, u and a constant, in ``m_s``'s dtype, with a zero last column for the dump atom.
    """
    rows, atoms = cuts.shape
    starts = torch.cat([torch.zeros_like(n).unsqueeze(-1), cuts[:, :-1]], -1)
    count = (cuts - starts).clamp_min(0).to(torch.float64)
    z_s, sum_u, sum_uu, z_t, sum_tdiff, sum_tu, sum_tt = sums.to(torch.float64).unbind(1)
    dtype, m_s, m_t = m_s.dtype, m_s.to(torch.float64), m_t.to(torch.float64)
    loss = torch.zeros(rows, dtype=torch.float64, device=m_s.device)
    coef = torch.zeros(4, rows, atoms, dtype=torch.float64, device=m_s.device)  # on e_s, e_t, u, and a constant
    t2 = temperature**2
    for g in stage_groups:
        group = torch.searchsorted(stage_bounds(n, g), starts.contiguous(), right=True)  # each atom's group
        lse_s = _group_lse(m_s, z_s, group, g)
        lse_t = _group_lse(m_t, z_t, group, g)
        delta = m_s - lse_s.gather(1, group)  # log q_s = u + delta within an atom
        w_s = torch.where(z_s > 0, torch.exp(delta), 0.0)
        w_t = torch.where(z_t > 0, torch.exp(m_t - lse_t.gather(1, group)), 0.0)
        mass_t = _scatter(w_t * z_t, group, g)  # sum of q_t over the group: 1, or 0 without teacher mass
        has_t = mass_t > 0
        single = _scatter(count, group, g) < 2  # a group of one class has KL exactly 0
        kl = t2 * torch.where(has_t & ~single, _scatter(w_t * sum_tdiff, group, g) + lse_s - lse_t, 0.0)
        if adaptive:
            dot = _scatter(w_t * (sum_tu + delta * z_t), group, g)
            norm_t = _scatter(w_t * w_t * sum_tt, group, g).sqrt()
            sum_lq = _scatter(sum_u + count * delta, group, g)
            norm_s = _scatter(sum_uu + 2 * delta * sum_u + count * delta * delta, group, g).clamp_min(0).sqrt()
            nt, ns = norm_t.clamp_min(COS_EPS), norm_s.clamp_min(COS_EPS)
            cos = dot / (nt * ns)
            weight = 1 - cos
            ns_grad = torch.where(norm_s > COS_EPS, cos / (ns * norm_s.clamp_min(COS_EPS)), 0.0)
            c_qs = weight * t2 * mass_t + kl * (mass_t / (nt * ns) - ns_grad * sum_lq)
            c_qt = -weight * t2 - kl / (nt * ns)
            c_lq = kl * ns_grad
        else:
            weight = torch.ones_like(kl)
            c_qs, c_qt, c_lq = t2 * mass_t, torch.full_like(kl, -t2), torch.zeros_like(kl)
        loss = loss + (weight * kl).sum(-1)
        if want_grad:
            c_lq_atom = c_lq.gather(1, group)
            coef += torch.stack([c_qs.gather(1, group) * w_s, c_qt.gather(1, group) * w_t, c_lq_atom,
                                 c_lq_atom * delta])
    if not want_grad:
        return loss, None
    return loss, torch.cat([coef, coef.new_zeros(4, rows, 1)], -1).to(dtype)


def finish_loss(loss: torch.Tensor, nan_row: torch.Tensor, inf_row: torch.Tensor, factor: float, dtype: torch.dtype):
    """``factor * loss``; NaN for rows with NaN or ``+inf``; ``+inf`` where the student rules out a teacher class."""
    return torch.where(nan_row, float("nan"), torch.where(inf_row, float("inf"), factor * loss)).to(dtype)


def pcd_rows(s: torch.Tensor, t: torch.Tensor, stage_groups: list[int], factor: float, temperature: float,
             adaptive: bool, rank_by: str, want_grad: bool):
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
    if sum(g - 1 for g in set(stage_groups)) < num_classes:
        cuts = atom_cuts(n, stage_groups)
        # the atom of rank position p is the number of cuts <= p; positions >= n land in the dump atom
        marks = torch.zeros(rows, num_classes + 1, dtype=torch.int64, device=s.device)
        atom_by_rank = marks.scatter_add_(1, cuts, torch.ones_like(cuts)).cumsum(1)[:, :num_classes]
    else:  # more boundaries than classes (K near C): every rank position is its own atom
        cuts = (torch.arange(1, num_classes + 1, device=s.device).expand(rows, num_classes)).clamp_max(n[:, None])
        atom_by_rank = torch.where(cuts > torch.arange(num_classes, device=s.device), cuts - 1, num_classes)
    atoms = cuts.shape[-1]
    atom = torch.empty_like(order).scatter_(1, order, atom_by_rank)

    # 3. per-atom sums, shifted by the atom's maxima (absent classes sit in the dump atom, never read)
    a = torch.where(s_inf, 0.0, s / temperature)
    b = torch.where(t_ok, t / temperature, float("-inf"))
    neg = torch.full((rows, atoms + 1), float("-inf"), dtype=s.dtype, device=s.device)
    m_s = neg.scatter_reduce(1, atom, a, "amax")
    m_t = neg.scatter_reduce(1, atom, b, "amax")
    m_s = torch.where(torch.isneginf(m_s), 0.0, m_s)  # an empty atom
    m_t = torch.where(torch.isneginf(m_t), 0.0, m_t)  # an atom without teacher mass
    parts = torch.empty(7, rows, num_classes, dtype=s.dtype, device=s.device)
    u = torch.sub(a, m_s.gather(1, atom), out=parts[1])
    e_s = torch.exp(u, out=parts[0])
    torch.mul(u, u, out=parts[2])
    e_t = torch.exp(b - m_t.gather(1, atom), out=parts[3])  # 0 where the teacher is -inf
    torch.mul(e_t, torch.where(t_ok, b - a, 0.0), out=parts[4])
    torch.mul(e_t, u, out=parts[5])
    torch.mul(e_t, e_t, out=parts[6])
    sums = parts.new_zeros(7, rows, atoms + 1).scatter_add_(2, atom.expand_as(parts), parts)
    loss, coef = combine_atoms(m_s[:, :atoms], m_t[:, :atoms], sums.transpose(0, 1)[..., :atoms], cuts, n,
                               stage_groups, temperature, adaptive, want_grad)
    loss = finish_loss(loss, nan_row, inf_row, factor, s.dtype)

    if not want_grad:
        return loss, None

    # 4. the gradient, one pass over the classes
    p, q, r, c = coef.gather(2, atom.expand(4, rows, num_classes)).unbind(0)  # the dump atom's are 0
    grad = (e_s * p + e_t * q + u * r + c) * (factor / temperature)
    return loss, torch.where((inf_row | nan_row).unsqueeze(-1), float("nan"), grad)
