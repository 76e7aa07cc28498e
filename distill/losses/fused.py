"""The vocabulary projection fused with the vocabulary losses (:func:`projected_vocab_losses`)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from distill.losses.kernels import Workspace, ce_rows, floored_copy, kl_rows, loss_factors, mse_rows
from distill.losses.pointwise import _connected_zero


# --------------------------------------------------------------------------- projection fused with the losses
#
# The vocabulary projection is most of a small model's FLOPs, and its (N, V) output most of its memory
# traffic. Here the projection runs inside the loss, a chunk of rows at a time: each chunk's logits,
# loss and gradient live in a (chunk, V) block that is reused, and the gradient goes back through the
# projection at once, so only (N, H) and (V, H) gradients are kept for backward.

# Language models whose logits are exactly ``get_output_embeddings()(last hidden)``: nothing (a scale,
# a soft cap) follows the projection, so it may be left to the fused losses.
_PLAIN_HEAD_MODELS = frozenset({"BertForMaskedLM", "DistilBertForMaskedLM", "RobertaForMaskedLM",
                                "GPT2LMHeadModel", "LlamaForCausalLM"})
_WRAPPERS = frozenset({"DistributedDataParallel", "OptimizedModule"})
# Rows per chunk on the CPU, by compute dtype: enough for the chunk's (chunk, H) x (H, V) matmul to run
# near peak (fp32 needs more rows than bf16), few enough to keep the reused blocks small. On a GPU a
# chunk is a few (chunk, V) of memory.
_CPU_CHUNK_ROWS_FP32 = 384
_CPU_CHUNK_ROWS_16BIT = 128
_GPU_CHUNK_BYTES = 256 * 2**20
_GROUP_CHUNKS = 2  # 16-bit compute: gradient rows per (V, H) partial, in chunks
# Vocabulary columns per matmul of the CPU projection, by compute dtype: one (rows, H) x (H, V) matmul
# with V in the tens of thousands ran at 55% of the fp32 matmul peak here (104 GFLOP/s against 187),
# the same rows against 1024- or 2048-column slices of the weight at 80% (150-168, more with 384-512
# rows than 256); bf16 gained 10% at 4096.
_CPU_VOCAB_COLS_FP32 = 1024
_CPU_VOCAB_COLS_16BIT = 4096
_SLICE_ELEMS = 1 << 20  # elements of the fp32 copy of a 16-bit weight-gradient partial


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while type(model).__name__ in _WRAPPERS:
        model = getattr(model, "module", None) or model._orig_mod
    return model


def output_projection(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary projection when its logits are that ``nn.Linear`` of its last hidden
    states and nothing else (see ``_PLAIN_HEAD_MODELS``); None otherwise."""
    inner = _unwrap(model)
    if type(inner).__name__ not in _PLAIN_HEAD_MODELS:
        return None
    proj = inner.get_output_embeddings()
    return proj if type(proj) is nn.Linear else None


def _identity(x: Tensor) -> Tensor:
    return x


@contextlib.contextmanager
def projection_input(model: nn.Module) -> Iterator[nn.Linear]:
    """Within, ``model(...).logits`` is the input of the vocabulary projection (B, L, H), not the logits.

    Yields the projection (its ``weight`` (V, H) and ``bias`` (V,) or None), for
    :func:`projected_vocab_losses` or :class:`ProjectedLogits`. Raises ValueError for a model that
    :func:`output_projection` does not know.
    """
    proj = output_projection(model)
    if proj is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no plain vocabulary projection to defer")
    proj.forward = _identity  # an instance attribute: nn.Module.__call__ uses it instead of Linear.forward
    try:
        yield proj
    finally:
        del proj.forward


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


class _ThreadWorkspace(threading.local, Workspace):
    """One :class:`Workspace` per thread."""


_WORKSPACE = _ThreadWorkspace()


def clear_workspace() -> None:
    """Free this thread's scratch blocks of :func:`projected_vocab_losses` (they are kept between calls)."""
    _WORKSPACE.clear()


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the soft-target block kernel of :func:`projected_vocab_losses` through torch.compile
    (see :class:`Workspace`)."""
    _WORKSPACE.compiled_kl = Workspace(compiled=True).compiled_kl if enabled else None


@dataclass
class _Term:
    """One loss of :func:`projected_vocab_losses`: ``kind`` is "kl", "mse" or "ce".

    Rows are ordered so that the labelled ones (ce's) come first: on those, every loss keeps its logit
    gradient (``gd``) and backward combines them before one matmul through the projection; on the
    others, kl and mse take theirs through it as the chunks go (``dx``, ``dw``, ``db``).
    """

    kind: str
    rows: Tensor | None  # (K,) CPU bool over the ordered rows; None = all of them
    factor: float = 1.0  # the gradient kept is d(loss)/d(logits) / factor
    dx: Tensor | None = None  # (K, H) fp32
    dw: Tensor | None = None  # (V, H) fp32
    db: Tensor | None = None  # (V,) fp32, over every row
    gd: Tensor | None = None  # (K_ce, V) in the compute dtype: the gradient on the labelled rows
    dw_written: bool = False  # dw holds a first product (it starts uninitialised)


def _ce_grad_rows_first(ce_rows: Tensor) -> Tensor:
    """Positions 0..K-1 reordered: the True ones of ``ce_rows`` (K,) first, each group in order."""
    return torch.cat([ce_rows.nonzero().squeeze(1), (~ce_rows).nonzero().squeeze(1)])


class _ProjectedVocabLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: dict) -> tuple[Tensor, ...]:  # type: ignore[override]
        terms: list[_Term] = plan["terms"]
        index = plan["index"]  # (K,) rows of the flattened hidden, in order; None = all, as they are
        k_ce = plan["k_ce"]  # the first k_ce rows carry labels
        cdt, chunk, group = plan["compute_dtype"], plan["chunk"], plan["group"]
        scale, inv_t = plan["scale"], plan["inv_t"]
        need_x, need_w, need_b = plan["need"]
        need_grad = need_x or need_w or need_b
        n_rows = hidden.numel() // hidden.shape[-1]
        x = hidden.reshape(n_rows, hidden.shape[-1])
        x = (x if index is None else x.index_select(0, index)).to(cdt)  # (K, H)
        w = weight.to(cdt)  # (V, H)
        b = None if bias is None else (bias.float() * scale).to(cdt)
        K, H, V = x.shape[0], x.shape[1], w.shape[0]
        dev = x.device
        teacher = plan["teacher"]
        t_rows = t_x = t_w = t_b = None
        if isinstance(teacher, ProjectedLogits):
            th = teacher.hidden.reshape(n_rows, teacher.hidden.shape[-1])
            t_x = (th if index is None else th.index_select(0, index)).to(cdt)
            t_w = teacher.weight.to(cdt)
            # A -inf bias (masked vocabulary) would make 0 * -inf = NaN in the KL sum: floor it.
            t_b = None if teacher.bias is None else floored_copy(teacher.bias, scale).to(cdt)
        elif teacher is not None:
            t_rows = teacher.reshape(n_rows, teacher.shape[-1])
        uses_teacher = teacher is not None and any(tm.kind != "ce" for tm in terms)

        def scratch(name: str, rows: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return _WORKSPACE.get(name, (rows, V), dtype, dev)

        def add_weight_grad(dw: Tensor, g: Tensor, xr: Tensor, first: bool = False) -> None:
            """dw (V, H) fp32 += g.T @ xr (= when ``first``: dw is then uninitialised); a 16-bit
            product is added a slice at a time."""
            if g.dtype == torch.float32:
                if first:
                    torch.mm(g.t(), xr, out=dw)
                else:
                    dw.addmm_(g.t(), xr)
                return
            part = torch.mm(g.t(), xr, out=_WORKSPACE.get("dw16", dw.shape, g.dtype, dev))
            if first:
                dw.copy_(part)
            elif dev.type != "cpu":  # casts on the fly
                dw += part
            else:
                step = max(1, _SLICE_ELEMS // dw.shape[1])
                for r in range(0, dw.shape[0], step):  # an fp32 copy of a slice at a time, not of all
                    p32 = _WORKSPACE.get("dw32", (min(step, dw.shape[0] - r), dw.shape[1]), torch.float32, dev)
                    dw[r:r + step] += p32.copy_(part[r:r + step])

        cols = V
        if dev.type == "cpu":
            cols = _CPU_VOCAB_COLS_FP32 if cdt == torch.float32 else _CPU_VOCAB_COLS_16BIT

        def project(xc: Tensor, wc: Tensor, bc: Tensor | None, out: Tensor) -> Tensor:
            """out (n, V) = (xc @ wc.T + bc) * scale, a slice of ``cols`` vocabulary columns at a time."""
            for c in range(0, V, cols):
                e = min(c + cols, V)
                o = out if cols >= V else out[:, c:e]
                if bc is None:
                    torch.addmm(o, xc, wc[c:e].t(), beta=0, alpha=scale, out=o)
                else:
                    torch.addmm(bc[c:e], xc, wc[c:e].t(), alpha=scale, out=o)
            return out

        totals = [torch.zeros((), dtype=torch.float32, device=dev) for _ in terms]
        pending: list[list] = [[] for _ in terms]  # per kl/mse term: (rows in the group block, positions)
        if need_grad:
            for term in terms:
                term.db = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
                if k_ce > 0:  # zeroed when the loss skips some labelled rows
                    alloc = torch.empty if term.kind == "ce" or term.rows is None else torch.zeros
                    term.gd = alloc(k_ce, V, dtype=cdt, device=dev)
                if term.kind != "ce" and k_ce < K:
                    term.dx = torch.zeros(K, H, dtype=torch.float32, device=dev) if need_x else None
                    # written by the first flush (there is one: some rows are not labelled)
                    term.dw = torch.empty(V, H, dtype=torch.float32, device=dev) if need_w else None
                    term.dw_written = False

        def flush(i: int) -> None:
            """Take the gradient rows gathered in term i's group block through the projection."""
            term, parts = terms[i], pending[i]
            if not parts:
                return
            m = sum(p[0] for p in parts)
            g = scratch(f"group{i}", group, cdt)[:m]
            if all(isinstance(p[1], slice) for p in parts) and all(
                    p[1].start == q[1].stop for q, p in zip(parts, parts[1:])):
                where: slice | Tensor = slice(parts[0][1].start, parts[-1][1].stop)
                xr = x[where]
            else:
                where = torch.cat([p[1] if isinstance(p[1], Tensor) else
                                   torch.arange(p[1].start, p[1].stop, device=dev) for p in parts])
                xr = x.index_select(0, where)
            if term.dx is not None:
                if cdt == torch.float32 and isinstance(where, slice):
                    torch.mm(g, w, out=term.dx[where])
                else:
                    term.dx[where] = torch.mm(g, w).float()
            if term.dw is not None:
                add_weight_grad(term.dw, g, xr, first=not term.dw_written)
                term.dw_written = True
            parts.clear()

        # ce and mse first: kl, usually on every row, then reads the blocks last.
        order = sorted(range(len(terms)), key=lambda i: terms[i].kind == "kl")
        segments = [(lo, hi) for lo, hi in ((0, k_ce), (k_ce, K)) if hi > lo]
        for lo, hi in segments:
            labelled = lo == 0 and k_ce > 0
            for a in range(lo, hi, chunk):
                z = min(a + chunk, hi)
                n = z - a
                s = project(x[a:z], w, b, scratch("s", n, cdt))  # (n, V), scaled by 1 / T when folded
                t = None
                if uses_teacher:
                    if t_rows is not None:
                        ix = slice(a, z) if index is None else index[a:z]
                        t = floored_copy(t_rows[ix], scale)  # see t_b above
                    else:
                        t = project(t_x[a:z], t_w, t_b, scratch("t", n, cdt))
                for i in order:
                    term = terms[i]
                    if term.kind == "ce":
                        if not labelled:
                            continue
                        sb = s if scale == 1.0 else s * (1.0 / scale)  # the labels' loss is on raw logits
                        g_out = term.gd[a:z] if need_grad else None
                        row, colsum = ce_rows(sb, plan["labels"][a:z], g_out, need_b)
                    else:
                        local = None if term.rows is None else term.rows[a:z]
                        sel = None
                        if local is not None and not bool(local.all()):
                            if not bool(local.any()):
                                continue
                            sel = local.nonzero().squeeze(1).to(dev, non_blocking=True)
                        k = n if sel is None else int(sel.numel())
                        sb = s if sel is None else s.index_select(0, sel)
                        tb = t if sel is None else t.index_select(0, sel)
                        g_out = None
                        if need_grad and labelled:  # kept for backward, at the rows' places
                            g_out = term.gd[a:z] if sel is None else scratch("gsel", k, cdt)
                        elif need_grad:  # into the group block, taken through the projection when full
                            used = sum(p[0] for p in pending[i])
                            if used + k > group:
                                flush(i)
                                used = 0
                            g_out = scratch(f"group{i}", group, cdt)[used:used + k]
                            pending[i].append((k, slice(a, z) if sel is None else a + sel))
                        if term.kind == "kl":
                            if scale != inv_t:  # 1/T not folded into the matmuls (mse needs raw logits)
                                sb, tb = sb.float().mul_(inv_t), tb.float().mul_(inv_t)
                            row, colsum = kl_rows(sb, tb, g_out, _WORKSPACE, need_b)
                        else:
                            row, colsum = mse_rows(sb, tb, g_out, need_b)
                        if need_grad and labelled and sel is not None:
                            term.gd[a:z].index_copy_(0, sel, g_out)
                    totals[i] += row.sum()
                    if term.db is not None and colsum is not None:
                        term.db += colsum
        for i in range(len(terms)):
            flush(i)
        ctx.terms = terms if need_grad else []
        ctx.add_weight_grad = add_weight_grad
        ctx.x, ctx.w, ctx.cdt = (x, w, cdt) if need_grad else (None, None, cdt)
        ctx.index, ctx.n_rows, ctx.k_rows, ctx.k_ce = index, n_rows, K, k_ce
        ctx.need = (need_x, need_w, need_b)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return tuple(tot * plan["row_factor"][i] for i, tot in enumerate(totals))

    @staticmethod
    def backward(ctx, *grad_outs: Tensor):  # type: ignore[override]
        if ctx.terms is None:
            raise RuntimeError("projected_vocab_losses supports one backward per forward (no retain_graph)")
        terms, ctx.terms = ctx.terms, None  # the accumulators are scaled in place and handed over
        need_x, need_w, need_b = ctx.need
        dx = dw = db = g = None
        for term, go in zip(terms, grad_outs):
            f = go.float() * term.factor
            if term.dx is not None:
                dx = term.dx.mul_(f) if dx is None else dx.addcmul_(term.dx, f)
            if term.dw is not None and term.dw_written:
                dw = term.dw.mul_(f) if dw is None else dw.addcmul_(term.dw, f)
            if term.db is not None:
                db = term.db.mul_(f) if db is None else db.addcmul_(term.db, f)
            if term.gd is not None:  # the labelled rows' gradients, combined
                fg = f.to(term.gd.dtype)
                g = term.gd.mul_(fg) if g is None else g.add_(term.gd.mul_(fg))
            term.dx = term.dw = term.db = term.gd = None
        if g is not None:  # one matmul through the projection for the labelled rows (K_ce, V)
            if need_x:
                if dx is None:
                    dx = torch.zeros(ctx.k_rows, ctx.x.shape[1], dtype=torch.float32, device=g.device)
                dx[:ctx.k_ce] += torch.mm(g, ctx.w).float()
            if need_w:
                if dw is None:
                    dw = torch.zeros(g.shape[1], ctx.x.shape[1], dtype=torch.float32, device=g.device)
                ctx.add_weight_grad(dw, g, ctx.x[:ctx.k_ce])
            del g
        if dx is not None:
            if ctx.index is not None:
                dx = dx.new_zeros((ctx.n_rows, dx.shape[1])).index_copy_(0, ctx.index, dx)
            dx = dx.to(ctx.hidden_dtype).reshape(ctx.hidden_shape)
        if dw is not None:
            dw = dw.to(ctx.weight_dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None


def _cpu_rows(mask: Tensor, n: int, what: str) -> Tensor:
    if mask.numel() != n:
        raise ValueError(f"{what} has {mask.numel()} positions but the hidden states have {n} rows.")
    m = mask.reshape(n)
    return (m if m.dtype == torch.bool else m != 0).cpu()  # a host sync if the mask is on a GPU


def projected_vocab_losses(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    teacher: ProjectedLogits | Tensor | None = None,
    temperature: float = 1.0,
    soft_target: bool = False,
    mse: bool = False,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    label_mask: Tensor | None = None,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The vocabulary losses of the logits ``hidden @ weight.T + bias``, never holding those logits.

    Rows are projected a chunk at a time; each chunk's losses and logit gradient are computed at once
    and the gradient is taken through the projection there, so memory holds one (chunk, V) block and
    the (N, H), (V, H) gradients, never an (N, V) tensor. Only the rows some loss covers are projected.
    Each returned sum equals the unfused function on the materialised logits:

    * ``"soft_target_ce"`` (``soft_target=True``, needs ``teacher``): :func:`soft_target_ce` over ``mask``.
    * ``"logits_mse"`` (``mse=True``, needs ``teacher``): :func:`logits_mse` over ``mask``.
    * ``"lm_ce"`` (``labels`` given): :func:`lm_ce` (shift the labels first for causal LM: :func:`shift_labels`).

    Args:
        hidden: (B, L, H) or (N, H), the projection's input (see :func:`projection_input`).
        weight: (V, H); bias: (V,) or None. Both receive gradients when they require them.
        teacher: the teacher's logits, as a (B, L, V) tensor or uncomputed :class:`ProjectedLogits`.
        mask: (B, L) or (N,) rows of soft_target / mse; None = all.
        labels: (B, L) or (N,) class ids, ``ignore_index`` where no loss; label_mask: their
            ``labels != ignore_index`` if at hand (on the CPU it saves a host sync).
        compute_dtype: dtype of the matmuls (bf16 under bf16 autocast); None = the hidden's. The
            softmaxes and sums are fp32 whatever it is.
        chunk_size: rows per chunk; None = a size suited to the device.

    Masks and label masks are read on the CPU (a host sync for masks on a GPU). Counts are those of
    the unfused functions. One backward per call (no ``retain_graph``, no double backward).
    """
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
    n = hidden.numel() // H if H else 0
    lead = hidden.shape[:-1]
    if teacher is not None and tuple(teacher.shape) != (*lead, V):
        raise ValueError(f"teacher logits must be {(*lead, V)}, got {tuple(teacher.shape)}.")

    wanted = []  # (name, kind, CPU row mask or None = every row)
    teacher_rows = None if mask is None else _cpu_rows(mask, n, "mask")
    if soft_target:
        wanted.append(("soft_target_ce", "kl", teacher_rows))
    if mse:
        wanted.append(("logits_mse", "mse", teacher_rows))
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"labels must be {tuple(lead)}, got {tuple(labels.shape)}.")
        lm = labels != ignore_index if label_mask is None else label_mask
        wanted.append(("lm_ce", "ce", _cpu_rows(lm, n, "label_mask")))
    names = [w[0] for w in wanted]
    kinds = [w[1] for w in wanted]
    row_masks = [w[2] for w in wanted]

    # The rows any loss covers; the others (padding, unmasked tokens of an MLM-only run) are never projected.
    if any(m is None for m in row_masks):
        union = None
    else:
        union = row_masks[0].clone()
        for m in row_masks[1:]:
            union |= m
        if bool(union.all()):
            union = None
    index_cpu = None if union is None else union.nonzero().squeeze(1)
    k = n if index_cpu is None else int(index_cpu.numel())
    if k == 0:
        zero = _connected_zero(hidden, weight, bias)
        return {name: zero.clone() for name in names}
    rows_u = [None if m is None else (m if union is None else m[union]) for m in row_masks]  # (k,) each
    # The labelled rows first (see _Term), unless every row is labelled.
    k_ce = 0
    if "ce" in kinds:
        ce_rows = rows_u[kinds.index("ce")]
        k_ce = int(ce_rows.sum())
        if k_ce < k:
            perm = _ce_grad_rows_first(ce_rows)
            index_cpu = perm if index_cpu is None else index_cpu[perm]
            rows_u = [None if m is None else m[perm] for m in rows_u]
    dev = hidden.device
    index = None if index_cpu is None else index_cpu.to(dev, non_blocking=True)
    terms = [_Term(kind, None if (m is None or kind == "ce" or bool(m.all())) else m)
             for kind, m in zip(kinds, rows_u)]

    T = float(temperature)
    # With only the soft-target loss on the teacher's side, 1/T is folded into the matmuls.
    scale = 1.0 / T if soft_target and not mse else 1.0
    row_factor = []
    for term in terms:  # the kernels' gradients and row sums, times these, are the losses'
        rf, term.factor = loss_factors(term.kind, T)
        row_factor.append(rf)
    if labels is not None:
        flat = labels.reshape(n)
        flat = flat if index is None else flat.index_select(0, index)
        flat = flat.clamp_min(0)  # ignored rows never reach the kernel; keep gather in range
    else:
        flat = None
    cdt = compute_dtype or hidden.dtype
    if chunk_size is None or chunk_size <= 0:
        if dev.type == "cpu":
            chunk_size = _CPU_CHUNK_ROWS_FP32 if cdt == torch.float32 else _CPU_CHUNK_ROWS_16BIT
        else:
            chunk_size = max(64, _GPU_CHUNK_BYTES // (4 * V))
    # Gradient rows are taken through the projection a group at a time: every chunk in fp32 (the
    # weight gradient accumulates in place), several in 16 bits (each group adds a (V, H) partial).
    group = chunk_size if cdt == torch.float32 else chunk_size * _GROUP_CHUNKS
    need_x = hidden.requires_grad
    need_w = weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    grad_on = torch.is_grad_enabled()
    plan = {"terms": terms, "index": index, "compute_dtype": cdt, "chunk": int(chunk_size), "scale": scale,
            "need": (grad_on and need_x, grad_on and need_w, grad_on and need_b), "teacher": teacher,
            "labels": flat, "row_factor": row_factor, "inv_t": 1.0 / T, "group": group, "k_ce": k_ce}
    device_type = dev.type if dev.type in ("cpu", "cuda") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):  # the dtypes here are explicit
        sums = _ProjectedVocabLosses.apply(hidden, weight, bias, plan)
    return dict(zip(names, sums))
