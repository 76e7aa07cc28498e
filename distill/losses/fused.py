"""The vocabulary projection fused with the vocabulary losses (:func:`projected_vocab_losses`), and
:class:`ProjectedLogits`, a teacher's logits left uncomputed for it (:mod:`.heads` finds a model's
projection and runs the model up to it).

The vocabulary projection is most of a small model's FLOPs, and its (N, V) output most of its memory
traffic. Here the projection runs inside the loss, a chunk of rows at a time: each chunk's logits,
loss and gradient live in a (chunk, V) block that is reused, and the gradient goes back through the
projection at once, so only (N, H) and (V, H) gradients are kept for backward. The per-block loss
math is that of the materialised losses (:mod:`.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.losses.blocking import cpu_blocking
from distill.losses.cached import CachedTargets, cached_rows, check_targets
from distill.losses.divergences import FORWARD_KL, Divergence, divergence_rows
from distill.losses.ensemble import TeacherEnsemble
from distill.losses.kernels import Workspace, ce_rows_scaled, floored_copy, loss_factors, mse_rows
from distill.losses.pointwise import _connected_zero

# On the CPU the rows per chunk and the vocabulary columns per projection matmul are measured once per
# machine and shape (:mod:`.blocking`). On a GPU a chunk is a few (chunk, V) of memory.
_GPU_CHUNK_BYTES = 256 * 2**20
_GROUP_CHUNKS = 2  # 16-bit compute: gradient rows per (V, H) partial, in chunks
_SLICE_ELEMS = 1 << 20  # elements of the fp32 copy of a 16-bit weight-gradient partial


@dataclass
class ProjectedLogits:
    """Logits ``hidden @ weight.T + bias`` left uncomputed, for :func:`projected_vocab_losses`.

    ``hidden`` (B, L, H) or (N, H), ``weight`` (V, H), ``bias`` (V,) or None; the matmul runs in
    ``compute_dtype`` (None: the hidden's dtype).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def materialize(self) -> Tensor:
        """The logits (B, L, V) or (N, V), in the compute dtype."""
        dt = self.compute_dtype or self.hidden.dtype
        b = None if self.bias is None else self.bias.to(dt)
        return nn.functional.linear(self.hidden.to(dt), self.weight.to(dt), b)


# --------------------------------------------------------------------------- the plan


@dataclass
class _Term:
    """One loss of :func:`projected_vocab_losses`, and its gradient accumulators during one call.

    Rows are ordered so that the labelled ones (ce's) come first: on those, every loss keeps its logit
    gradient (``gd``) and backward combines them before one matmul through the projection; on the
    others, kl and mse take theirs through it as the chunks go (``dx``, ``dw``, ``db``). When the
    others are few (causal LM: the last position of each sequence), they are kept too (``_Plan.k_kept``).
    """

    kind: str  # the kernel: "kl", "mse" or "ce"
    rows: Tensor | None  # (K,) CPU bool over the ordered rows; None = all of them
    factor: float = 1.0  # the gradient kept is d(loss)/d(logits) / factor
    dx: Tensor | None = None  # (K, H) fp32
    dw: Tensor | None = None  # (V, H) fp32
    db: Tensor | None = None  # (V,) fp32, over every row
    gd: Tensor | None = None  # (K_kept, V) in the compute dtype: the gradient on the kept rows
    dw_written: bool = False  # dw holds a first product (it starts uninitialised)


@dataclass
class _Plan:
    """What :class:`_ProjectedVocabLosses` computes besides its three differentiable inputs (hidden,
    weight, bias), as :func:`projected_vocab_losses` decided it.

    The rows computed on are the K rows of the flattened hidden (N, H) that some loss covers, the
    labelled ones first: rows ``0..k_ce-1`` below are those, ``k_ce..K-1`` the others.
    """

    terms: list[_Term]  # one per loss, in the order of the returned sums
    index: Tensor | None  # (K,) on the device: the rows of the flattened hidden, in that order; None = all N
    k_ce: int  # the first k_ce rows carry labels (0 without lm_ce)
    k_kept: int  # the first k_kept rows keep their logit gradients for backward: k_ce, or K (see _kept_rows)
    labels: Tensor | None  # (K,) class ids of the rows, clamped to >= 0; only the first k_ce are read
    teacher: ProjectedLogits | Tensor | CachedTargets | TeacherEnsemble | None  # logits, uncomputed, cached
    compute_dtype: torch.dtype  # of the matmuls and of the kept logit gradients; softmaxes are fp32
    chunk: int  # rows projected at a time
    cols: int | None  # vocabulary columns per projection matmul (None: all at once)
    group: int  # kl/mse gradient rows of unlabelled rows taken through the projection at a time
    scale: float  # folded into both projections: 1/T when only the soft-target loss reads the teacher
    inv_t: float  # 1 / temperature
    row_factor: list[float]  # per term: its loss is this times the sum of its kernel's rows
    need_x: bool  # gradients wanted for hidden, weight and bias (grad mode on and requires_grad)
    need_w: bool
    need_b: bool
    workspace: Workspace  # scratch blocks and kernel choice
    divergence: Divergence = FORWARD_KL  # the soft-target kernel's divergence

    @property
    def need_grad(self) -> bool:
        return self.need_x or self.need_w or self.need_b


def _add_weight_grad(dw: Tensor, g: Tensor, xr: Tensor, workspace: Workspace, first: bool = False) -> None:
    """dw (V, H) fp32 += g.T @ xr (= when ``first``: dw is then uninitialised); a 16-bit product is
    added a slice at a time, so that its fp32 copy stays small."""
    if g.dtype == torch.float32:
        if first:
            torch.mm(g.t(), xr, out=dw)
        else:
            dw.addmm_(g.t(), xr)
        return
    part = torch.mm(g.t(), xr, out=workspace.get("dw16", dw.shape, g.dtype, dw.device))
    if first:
        dw.copy_(part)
    elif dw.device.type != "cpu":  # casts on the fly
        dw += part
    else:
        step = max(1, _SLICE_ELEMS // dw.shape[1])
        for r in range(0, dw.shape[0], step):
            p32 = workspace.get("dw32", (min(step, dw.shape[0] - r), dw.shape[1]), torch.float32, dw.device)
            dw[r:r + step] += p32.copy_(part[r:r + step])


# --------------------------------------------------------------------------- forward


class _ForwardPass:
    """One forward of :class:`_ProjectedVocabLosses`: the operands in the compute dtype, the loop over
    chunks of rows, and per kl/mse term a group block gathering gradient rows of unlabelled rows until
    it is full and taken through the projection (:meth:`flush`)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan):
        self.plan = p = plan
        cdt = p.compute_dtype
        self.n_rows = hidden.numel() // hidden.shape[-1]
        x = hidden.reshape(self.n_rows, hidden.shape[-1])
        self.x = (x if p.index is None else x.index_select(0, p.index)).to(cdt)  # (K, H)
        # (V, H). A 16-bit copy of an fp32 weight is leased, not made afresh: on the CPU a fresh block is a page
        # fault per 4 KB on its first write (SmolLM2's (49,152, 576): 20 against 5 ms). Given back after the
        # backward, or at the end of the forward when no gradient is wanted.
        self.w_leased = weight.dtype != cdt
        self.w = p.workspace.lease(tuple(weight.shape), cdt, weight.device).copy_(weight) if self.w_leased else weight
        self.b = None if bias is None else (bias.float() * p.scale).to(cdt)
        self.K, self.V = self.x.shape[0], self.w.shape[0]
        self.dev = self.x.device
        self.cols = self.V if p.cols is None else p.cols
        self._teacher_operands()
        # The forward-KL kernels (native, eager) read a row's logits before they write its gradient, so
        # in fp32 the unlabelled rows' gradient can overwrite the student's block and go through the
        # projection at once (group = chunk there): no group block. Not through torch.compile's kernel.
        self.kl_in_place = (cdt == torch.float32 and self.t_cached is None and p.divergence.is_forward_kl
                            and p.workspace.compiled_kl is None)
        self.totals = [torch.zeros((), dtype=torch.float32, device=self.dev) for _ in p.terms]
        self.pending: list[list] = [[] for _ in p.terms]  # per kl/mse term: (rows in its group block, positions)
        if p.need_grad:
            self._allocate_grads()

    def _teacher_operands(self) -> None:
        """The teacher's side: its cached top-k rows (t_cached), or per teacher (several for a
        TeacherEnsemble) its logits' rows or its projection's operands (t_ops)."""
        p, teacher = self.plan, self.plan.teacher
        self.t_cached, self.t_ops, self.ensemble = None, [], None
        if isinstance(teacher, CachedTargets):  # its top-k rows, in the order of the rows computed on
            self.t_cached = teacher.flat() if p.index is None else teacher.rows(p.index)
        elif teacher is not None:
            if isinstance(teacher, TeacherEnsemble):
                self.ensemble = teacher
            for member in teacher.members if self.ensemble is not None else [teacher]:
                self.t_ops.append(self._member_operands(member))
        # Teacher logits to make per chunk (none from a cache).
        self.uses_teacher = bool(self.t_ops) and any(tm.kind != "ce" for tm in p.terms)

    def _member_operands(self, teacher) -> tuple:
        """("rows", (N, V) logits) or ("proj", x (K, H), weight, bias) in the compute dtype."""
        p = self.plan
        if isinstance(teacher, ProjectedLogits):
            th = teacher.hidden.reshape(self.n_rows, teacher.hidden.shape[-1])
            t_x = (th if p.index is None else th.index_select(0, p.index)).to(p.compute_dtype)
            # A -inf bias (masked vocabulary) would make 0 * -inf = NaN in the KL sum: floor it.
            t_b = None if teacher.bias is None else floored_copy(teacher.bias, p.scale).to(p.compute_dtype)
            return ("proj", t_x, teacher.weight.to(p.compute_dtype), t_b)
        return ("rows", teacher.reshape(self.n_rows, teacher.shape[-1]))

    def _teacher_block(self, a: int, z: int) -> Tensor:
        """The teacher's logits of rows a..z-1 times the plan's scale (the ensemble's, combined)."""
        p, n = self.plan, z - a
        blocks = []
        for j, op in enumerate(self.t_ops):
            if op[0] == "rows":
                blocks.append(floored_copy(op[1][slice(a, z) if p.index is None else p.index[a:z]], p.scale))
            else:
                blocks.append(self.project(op[1][a:z], op[2], op[3], self.scratch(f"t{j}", n, p.compute_dtype)))
        if self.ensemble is None:
            return blocks[0]
        return self.ensemble.combine_blocks(blocks, p.scale).to(blocks[0].dtype)

    def _allocate_grads(self) -> None:
        p, K, V, H = self.plan, self.K, self.V, self.x.shape[1]
        for term in p.terms:
            term.db = torch.zeros(V, dtype=torch.float32, device=self.dev) if p.need_b else None
            # Kept rows' logit gradients: ce's are its labelled rows only (backward adds them into the
            # first k_ce rows of the others'); zeroed where the loss skips some kept rows.
            kept = p.k_ce if term.kind == "ce" else p.k_kept
            if kept > 0:
                term.gd = p.workspace.lease((kept, V), p.compute_dtype, self.dev)
                if term.kind != "ce" and term.rows is not None:
                    term.gd.zero_()
            if term.kind != "ce" and p.k_kept < K:
                term.dx = torch.zeros(K, H, dtype=torch.float32, device=self.dev) if p.need_x else None
                # written by the first flush (there is one: some rows are not labelled)
                term.dw = p.workspace.vocab_grad((V, H), self.dev) if p.need_w else None
                term.dw_written = False

    def scratch(self, name: str, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.plan.workspace.get(name, (rows, self.V), dtype, self.dev)

    def project(self, xc: Tensor, wc: Tensor, bc: Tensor | None, out: Tensor) -> Tensor:
        """out (n, V) = (xc @ wc.T + bc) * scale, a slice of ``cols`` vocabulary columns at a time."""
        V, cols, scale = self.V, self.cols, self.plan.scale
        for c in range(0, V, cols):
            e = min(c + cols, V)
            o = out if cols >= V else out[:, c:e]
            if bc is None:
                torch.addmm(o, xc, wc[c:e].t(), beta=0, alpha=scale, out=o)
            else:
                torch.addmm(bc[c:e], xc, wc[c:e].t(), alpha=scale, out=o)
        return out

    def run(self) -> list[Tensor]:
        """Every chunk of rows (a chunk may hold the last kept rows and the first others: a matmul of
        few rows runs far below the machine's peak, 80 GFLOP/s at 73 rows against 140 at 384 on one
        AVX2 CPU); the per-term sums of kernel rows."""
        p = self.plan
        for a in range(0, self.K, p.chunk):
            self._chunk(a, min(a + p.chunk, self.K))
        for i in range(len(p.terms)):
            self.flush(i)
        return self.totals

    def _chunk(self, a: int, z: int) -> None:
        """Rows a..z-1: project the student (and the teacher), then each loss on the block."""
        p, n = self.plan, z - a
        o = min(max(p.k_kept - a, 0), n)  # the chunk's first o rows keep their gradients
        parts = [(u, v, kept) for u, v, kept in ((0, o, True), (o, n, False)) if v > u]
        s = self.project(self.x[a:z], self.w, self.b, self.scratch("s", n, p.compute_dtype))  # (n, V)
        t = None
        if self.uses_teacher:
            t = self._teacher_block(a, z)
        # ce and mse first: kl, usually on every row, then reads the blocks last (it overwrites them).
        for i in sorted(range(len(p.terms)), key=lambda i: p.terms[i].kind == "kl"):
            term = p.terms[i]
            if term.kind == "ce":
                m = min(z, p.k_ce) - a  # the labelled rows of the chunk come first
                if m <= 0:
                    continue
                # the labels' loss is on raw logits: s / scale
                row, colsum = ce_rows_scaled(s[:m], p.labels[a:a + m], term.gd[a:a + m] if p.need_grad else None,
                                             p.need_b, mul=1.0 / p.scale, native=p.workspace.native)
                self._add(term, i, row, colsum)
                continue
            for u, v, kept in parts:  # the kept rows, then the others
                done = self._teacher_loss(i, s[u:v], None if t is None else t[u:v], a + u, a + v, kept)
                if done is not None:
                    self._add(term, i, *done)

    def _add(self, term: _Term, i: int, row: Tensor, colsum: Tensor | None) -> None:
        self.totals[i] += row.sum()
        if term.db is not None and colsum is not None:
            term.db += colsum

    def _teacher_loss(self, i: int, s: Tensor, t: Tensor, a: int, z: int,
                      kept: bool) -> tuple[Tensor, Tensor | None] | None:
        """kl or mse (term i) on the rows a..z-1 it covers, if any; their gradient goes to the term's
        kept gradient (kept rows) or to its group block."""
        p, term = self.plan, self.plan.terms[i]
        local = None if term.rows is None else term.rows[a:z]
        sel = None
        if local is not None and not bool(local.all()):
            if not bool(local.any()):
                return None
            sel = local.nonzero().squeeze(1).to(self.dev, non_blocking=True)
        k = z - a if sel is None else int(sel.numel())
        sb = s if sel is None else s.index_select(0, sel)
        tb = t if sel is None or t is None else t.index_select(0, sel)
        g_out = at_once = None
        if p.need_grad and kept:  # kept for backward, at the rows' places
            g_out = term.gd[a:z] if sel is None else self.scratch("gsel", k, p.compute_dtype)
        elif p.need_grad and term.kind == "kl" and self.kl_in_place:  # over the student's logits (kl is last)
            g_out, at_once = sb, slice(a, z) if sel is None else a + sel
        elif p.need_grad:  # into the group block, taken through the projection when full
            g_out = self._group_rows(i, k, slice(a, z) if sel is None else a + sel)
        if term.kind == "kl" and self.t_cached is not None:  # 1/T is folded (no mse from a cache)
            tc = self.t_cached.rows(slice(a, z))
            done = cached_rows(p.divergence, sb, tc if sel is None else tc.rows(sel), g_out, p.workspace, p.need_b)
        elif term.kind == "kl":
            if p.scale != p.inv_t:  # 1/T not folded into the matmuls (mse needs raw logits)
                sb, tb = sb.float().mul_(p.inv_t), tb.float().mul_(p.inv_t)
            done = divergence_rows(p.divergence, sb, tb, g_out, p.workspace, p.need_b)
        else:
            done = mse_rows(sb, tb, g_out, p.need_b)
        if p.need_grad and kept and sel is not None:
            term.gd[a:z].index_copy_(0, sel, g_out)
        if at_once is not None:
            self._through_projection(term, g_out, at_once)
        return done

    def _group_rows(self, i: int, k: int, positions: slice | Tensor) -> Tensor:
        """The next k rows of term i's group block (flushed first if they do not fit), for the
        gradient of the rows at ``positions``."""
        group, parts = self.plan.group, self.pending[i]
        used = sum(part[0] for part in parts)
        if used + k > group:
            self.flush(i)
            used = 0
        parts.append((k, positions))
        return self.scratch(f"group{i}", group, self.plan.compute_dtype)[used:used + k]

    def flush(self, i: int) -> None:
        """Take the gradient rows gathered in term i's group block through the projection."""
        p, term, parts = self.plan, self.plan.terms[i], self.pending[i]
        if not parts:
            return
        m = sum(part[0] for part in parts)
        g = self.scratch(f"group{i}", p.group, p.compute_dtype)[:m]
        if all(isinstance(q[1], slice) for q in parts) and all(
                r[1].start == q[1].stop for q, r in zip(parts, parts[1:])):
            where: slice | Tensor = slice(parts[0][1].start, parts[-1][1].stop)
        else:
            where = torch.cat([q[1] if isinstance(q[1], Tensor) else
                               torch.arange(q[1].start, q[1].stop, device=self.dev) for q in parts])
        self._through_projection(term, g, where)
        parts.clear()

    def _through_projection(self, term: _Term, g: Tensor, where: slice | Tensor) -> None:
        """The gradient rows ``g`` of the rows at ``where`` into the term's dx and dw."""
        p = self.plan
        xr = self.x[where] if isinstance(where, slice) else self.x.index_select(0, where)
        if term.dx is not None:
            if p.compute_dtype == torch.float32 and isinstance(where, slice):
                torch.mm(g, self.w, out=term.dx[where])
            else:
                term.dx[where] = torch.mm(g, self.w).float()
        if term.dw is not None:
            _add_weight_grad(term.dw, g, xr, p.workspace, first=not term.dw_written)
            term.dw_written = True


# --------------------------------------------------------------------------- autograd


class _ProjectedVocabLosses(torch.autograd.Function):
    """The losses of a :class:`_Plan` on ``hidden @ weight.T + bias``; one sum per term."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                plan: _Plan) -> tuple[Tensor, ...]:
        fp = _ForwardPass(hidden, weight, bias, plan)
        totals = fp.run()
        ctx.terms = plan.terms if plan.need_grad else []
        ctx.x, ctx.w = (fp.x, fp.w) if plan.need_grad else (None, None)
        ctx.w_leased = fp.w_leased and plan.need_grad
        if fp.w_leased and not plan.need_grad:
            plan.workspace.release(fp.w)
        ctx.index, ctx.n_rows, ctx.k_rows, ctx.k_kept = plan.index, fp.n_rows, fp.K, plan.k_kept
        ctx.need = (plan.need_x, plan.need_w, plan.need_b)
        ctx.workspace = plan.workspace
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return tuple(tot * rf for tot, rf in zip(totals, plan.row_factor))

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):  # type: ignore[override]
        if ctx.terms is None:
            raise RuntimeError("projected_vocab_losses supports one backward per forward (no retain_graph)")
        terms, ctx.terms = ctx.terms, None  # the accumulators are scaled in place and handed over
        need_x, need_w, need_b = ctx.need
        dx = dw = db = g = None
        kept = [term.gd for term in terms if term.gd is not None]
        for term, go in zip(terms, grad_outs):
            f = go.float() * term.factor
            if term.dx is not None:
                dx = term.dx.mul_(f) if dx is None else dx.addcmul_(term.dx, f)
            if term.dw is not None and term.dw_written:
                dw = term.dw.mul_(f) if dw is None else dw.addcmul_(term.dw, f)
            if term.db is not None:
                db = term.db.mul_(f) if db is None else db.addcmul_(term.db, f)
            if term.gd is not None:  # the kept rows' gradients, combined (ce's may be fewer: the first rows)
                gd = term.gd.mul_(f.to(term.gd.dtype))
                if g is None:
                    g = gd
                else:
                    if gd.shape[0] > g.shape[0]:
                        g, gd = gd, g
                    g[:gd.shape[0]].add_(gd)
            term.dx = term.dw = term.db = term.gd = None
        if g is not None:  # one matmul through the projection for the kept rows (K_kept, V)
            if need_x:
                if dx is None and ctx.k_kept == ctx.k_rows and g.dtype == torch.float32:
                    dx = torch.mm(g, ctx.w)
                elif dx is None:
                    dx = torch.zeros(ctx.k_rows, ctx.x.shape[1], dtype=torch.float32, device=g.device)
                    dx[:ctx.k_kept] = torch.mm(g, ctx.w)
                else:
                    dx[:ctx.k_kept] += torch.mm(g, ctx.w).float()
            if need_w:
                first = dw is None
                if first:  # written by the first product
                    dw = ctx.workspace.vocab_grad((g.shape[1], ctx.x.shape[1]), g.device)
                _add_weight_grad(dw, g, ctx.x[:ctx.k_kept], ctx.workspace, first=first)
            del g
        for block in kept:  # the logit gradients' memory, for the next forward
            ctx.workspace.release(block)
        del kept
        if ctx.w_leased:  # the weight's 16-bit copy, for the next forward
            ctx.workspace.release(ctx.w)
        ctx.w = None
        if dx is not None:
            if ctx.index is not None:
                dx = dx.new_zeros((ctx.n_rows, dx.shape[1])).index_copy_(0, ctx.index, dx)
            dx = dx.to(ctx.hidden_dtype).reshape(ctx.hidden_shape)
        if dw is not None:
            dw = dw.to(ctx.weight_dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None


# --------------------------------------------------------------------------- entry point


def _cpu_rows(mask: Tensor, n: int, what: str) -> Tensor:
    if mask.numel() != n:
        raise ValueError(f"{what} has {mask.numel()} positions but the hidden states have {n} rows.")
    m = mask.reshape(n)
    return (m if m.dtype == torch.bool else m != 0).cpu()  # a host sync if the mask is on a GPU


def _check_args(hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher, temperature: float,
                soft_target: bool, mse: bool, labels: Tensor | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if (soft_target or mse) and teacher is None:
        raise ValueError("soft_target and mse need the teacher's logits.")
    if not (soft_target or mse or labels is not None):
        raise ValueError("no loss asked for: set soft_target, mse or labels.")
    H, V = hidden.shape[-1], weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must be (V, {H}), got {tuple(weight.shape)}.")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be ({V},), got {tuple(bias.shape)}.")
    lead = hidden.shape[:-1]
    if isinstance(teacher, CachedTargets):
        if mse:
            raise ValueError("logits_mse needs the teacher's logits; a cache holds only its top-k log-probabilities.")
        check_targets(teacher, lead, V)
    elif teacher is not None and tuple(teacher.shape) != (*lead, V):
        raise ValueError(f"teacher logits must be {(*lead, V)}, got {tuple(teacher.shape)}.")
    if labels is not None and labels.shape != lead:
        raise ValueError(f"labels must be {tuple(lead)}, got {tuple(labels.shape)}.")


def _ordered_rows(kinds: list[str], row_masks: list[Tensor | None],
                  n: int) -> tuple[Tensor | None, list[Tensor | None], int]:
    """The rows any loss covers, labelled first: (their indices into the N rows on the CPU, None =
    all N in order; each loss's CPU mask over them, None = all; how many carry labels). The other
    rows (padding, unmasked tokens of an MLM-only run) are never projected."""
    if any(m is None for m in row_masks):
        union = None
    else:
        union = row_masks[0].clone()
        for m in row_masks[1:]:
            union |= m
        if bool(union.all()):
            union = None
    index = None if union is None else union.nonzero().squeeze(1)
    k = n if index is None else int(index.numel())
    rows = [None if m is None else (m if union is None else m[union]) for m in row_masks]  # (k,) each
    # The labelled rows first (see _Term), unless every row is labelled.
    k_ce = 0
    if "ce" in kinds and k > 0:
        ce = rows[kinds.index("ce")]
        k_ce = int(ce.sum())
        if k_ce < k:
            perm = torch.cat([ce.nonzero().squeeze(1), (~ce).nonzero().squeeze(1)])  # each group in order
            index = perm if index is None else index[perm]
            rows = [None if m is None else m[perm] for m in rows]
    return index, rows, k_ce


def _kept_rows(k_ce: int, k: int, chunk: int) -> int:
    """How many of the k rows keep their logit gradients for backward (the first ones): the k_ce
    labelled rows, and the others too when they are at most a chunk. Kept gradients cost (rows, V)
    of memory until backward; the others' go through the projection as the chunks go, into (V, H)
    partials of their own, which costs a (V, H) pass or more however few the rows. In a causal-LM
    batch only each sequence's last position is not labelled: with SmolLM2's (49,152, 576) that
    partial cost about 80 ms a micro-batch of 8 x 128 tokens, for 8 rows. Up to a quarter of a chunk:
    more would make the kept blocks (the largest asked for are held from step to step) hold rows that
    the chunks take through the projection at no memory cost (an MLM batch of short sequences, whose
    unlabelled rows are most of them)."""
    if k_ce == 0 or k - k_ce > max(1, chunk // 4):
        return k_ce
    return k


def _blocking(chunk_size: int | None, device: torch.device, cdt: torch.dtype, H: int, V: int
              ) -> tuple[int, int | None]:
    """Rows per chunk (``chunk_size`` when given) and vocabulary columns per matmul (None: all)."""
    if device.type == "cpu":
        b = cpu_blocking(cdt, H, V)
        rows, cols = b.rows, b.cols
    else:
        rows, cols = max(64, _GPU_CHUNK_BYTES // (4 * V)), None
    if chunk_size is not None and chunk_size > 0:
        rows = int(chunk_size)
    return rows, cols


def _make_plan(hidden: Tensor, kinds: list[str], rows: list[Tensor | None], index_cpu: Tensor | None,
               k_ce: int, labels: Tensor | None, *, teacher, temperature: float, scale: float,
               compute_dtype: torch.dtype, chunk: int, cols: int | None, need: tuple[bool, bool, bool],
               workspace: Workspace, divergence: Divergence = FORWARD_KL) -> _Plan:
    """The :class:`_Plan` of one call, from the rows :func:`_ordered_rows` chose."""
    n = hidden.numel() // hidden.shape[-1]
    index = None if index_cpu is None else index_cpu.to(hidden.device, non_blocking=True)
    terms = [_Term(kind, None if (m is None or kind == "ce" or bool(m.all())) else m)
             for kind, m in zip(kinds, rows)]
    row_factor = []
    for term in terms:  # the kernels' gradients and row sums, times these, are the losses'
        rf, term.factor = loss_factors(term.kind, temperature)
        row_factor.append(rf)
    flat = None
    if labels is not None:
        flat = labels.reshape(n)
        flat = flat if index is None else flat.index_select(0, index)
        flat = flat.clamp_min(0)  # ignored rows never reach the kernel; keep gather in range
    return _Plan(
        terms=terms, index=index, k_ce=k_ce, k_kept=_kept_rows(k_ce, n if index is None else int(index.numel()), chunk),
        labels=flat, teacher=teacher, compute_dtype=compute_dtype,
        chunk=chunk, cols=cols, scale=scale, inv_t=1.0 / temperature, row_factor=row_factor,
        # Gradient rows go through the projection a group at a time: every chunk in fp32 (the weight
        # gradient accumulates in place), several in 16 bits (each group adds a (V, H) partial).
        group=chunk if compute_dtype == torch.float32 else chunk * _GROUP_CHUNKS,
        need_x=need[0], need_w=need[1], need_b=need[2], workspace=workspace, divergence=divergence)


def projected_vocab_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    teacher: ProjectedLogits | Tensor | TeacherEnsemble | None = None,
    temperature: float = 1.0,
    soft_target: bool = False,
    mse: bool = False,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    label_mask: Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    workspace: Workspace | None = None,
    divergence: Divergence | None = None,
) -> dict[str, Tensor]:
    """The vocabulary losses of the logits ``hidden @ weight.T + bias``, never materialising them.

    Rows are projected a chunk at a time; each chunk's losses and logit gradient are computed at once
    and the gradient is taken through the projection there, so memory holds (chunk, V) blocks and
    the (N, H), (V, H) gradients: this function makes no (N, V) tensor (a teacher passed as a logits
    tensor is one, made by the caller). Only the rows some loss covers are projected. Each returned
    sum equals the unfused function on the materialised logits:

    * ``"soft_target_ce"`` (``soft_target=True``, needs ``teacher``): :func:`soft_target_ce` over ``mask``,
      with ``divergence`` (forward KL when None).
    * ``"logits_mse"`` (``mse=True``, needs ``teacher``): :func:`logits_mse` over ``mask``.
    * ``"lm_ce"`` (``labels`` given): :func:`lm_ce` (shift the labels first for causal LM: :func:`shift_labels`).

    Args:
        hidden: (B, L, H) or (N, H), the projection's input (see :class:`ProjectionInput`).
        weight: (V, H); bias: (V,) or None. Both receive gradients when they require them.
        teacher: the teacher's logits, as a (B, L, V) tensor or uncomputed :class:`ProjectedLogits`; or
            its cached top-k (:class:`~distill.losses.cached.CachedTargets`, soft_target only), for the
            divergence over those tokens and one tail bucket (:mod:`.cached`); or several teachers'
            as a :class:`~distill.losses.ensemble.TeacherEnsemble`, combined a chunk at a time.
        mask: (B, L) or (N,) rows of soft_target / mse; None = all.
        labels: (B, L) or (N,) class ids, ``ignore_index`` where no loss; label_mask: their
            ``labels != ignore_index`` if at hand (on the CPU it saves a host sync).
        compute_dtype: dtype of the matmuls (bf16 under bf16 autocast); None = the hidden's. The
            softmaxes and sums are fp32 whatever it is.
        chunk_size: rows per chunk; None = a size suited to the device (on the CPU measured once per
            machine and shape, :mod:`.blocking`).
        workspace: scratch blocks kept between calls, and the kernel choice (:class:`Workspace`);
            None = a new one for this call (eager kernels; its blocks are freed afterwards).

    Masks and label masks are read on the CPU (a host sync for masks on a GPU). Counts are those of
    the unfused functions. One backward per call (no ``retain_graph``, no double backward).
    """
    _check_args(hidden, weight, bias, teacher, temperature, soft_target, mse, labels)
    n = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    wanted = []  # (name, kind, CPU row mask or None = every row)
    teacher_rows = None if mask is None else _cpu_rows(mask, n, "mask")
    if soft_target:
        wanted.append(("soft_target_ce", "kl", teacher_rows))
    if mse:
        wanted.append(("logits_mse", "mse", teacher_rows))
    if labels is not None:
        lm = labels != ignore_index if label_mask is None else label_mask
        wanted.append(("lm_ce", "ce", _cpu_rows(lm, n, "label_mask")))
    names, kinds, row_masks = (list(col) for col in zip(*wanted))
    index, rows, k_ce = _ordered_rows(kinds, row_masks, n)
    if (n if index is None else index.numel()) == 0:
        zero = _connected_zero(hidden, weight, bias)
        return {name: zero.clone() for name in names}
    T, cdt, dev, grad_on = float(temperature), compute_dtype or hidden.dtype, hidden.device, torch.is_grad_enabled()
    chunk, cols = _blocking(chunk_size, dev, cdt, weight.shape[1], weight.shape[0])
    plan = _make_plan(
        hidden, kinds, rows, index, k_ce, labels, teacher=teacher, temperature=T,
        # With only the soft-target loss on the teacher's side, 1/T is folded into the matmuls.
        scale=1.0 / T if soft_target and not mse else 1.0,
        compute_dtype=cdt, chunk=chunk, cols=cols,
        need=(grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
              grad_on and bias is not None and bias.requires_grad),
        workspace=workspace if workspace is not None else Workspace(),
        divergence=(divergence or FORWARD_KL).check())
    device_type = dev.type if dev.type in ("cpu", "cuda") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):  # the dtypes here are explicit
        sums = _ProjectedVocabLosses.apply(hidden, weight, bias, plan)
    return dict(zip(names, sums))
