"""Block kernels: the math of the vocabulary losses on a block of rows, value and logit gradient.

One implementation per loss, shared by the losses on materialised logits (:mod:`.pointwise`) and the
projection fused with them (:mod:`.fused`). Each kernel takes student rows ``s`` (n, V) and the
matching targets, and returns the per-row loss (n,) in float32. When ``g_out`` (n, V) is given it
writes there, in ``g_out``'s dtype, the loss's analytic gradient in the logits *up to a constant
factor* that the caller applies once (:func:`loss_factors`), and with ``colsum`` it also returns that
gradient's column sums (V,) in float32 (the fused path's bias gradient), else None.

Also here: :class:`Workspace`, the scratch memory (and optional compiled kernel) the kernels use,
owned by whoever calls them.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

# Rows of the soft-target kernel's fp32 working blocks on the CPU: small enough to stay in cache.
KERNEL_ROWS = 32
# Finite stand-in for -inf logits (e.g. vocabulary padding a model never predicts): with -inf, the
# KL sum's p * logit would be 0 * -inf = NaN. A quarter of the float32 range leaves room for the
# kernels' subtractions; the probability of such a logit is exactly 0 either way.
LOGIT_FLOOR = torch.finfo(torch.float32).min / 4


class Workspace:
    """Scratch blocks the vocabulary kernels reuse from call to call, and their kernel choice.

    On the CPU, glibc gives large freed blocks back to the operating system, so a fresh (chunk, V)
    block costs a page fault per 4 KB on every use; kept here, it costs nothing after the first step.
    A GPU's caching allocator already reuses memory, so there :meth:`get` returns a fresh tensor.
    Blocks kept from a forward to its backward (the fused losses' logit gradients) are lent by
    :meth:`lease` and given back by :meth:`release`, so that two forwards before their backwards never
    share one.

    ``native`` (default True): on the CPU the forward-KL kernel, the cached soft targets' softmax and
    the labels' cross-entropy run as native code (:mod:`distill.losses.native`: two or three passes
    over each row, built for this CPU at first use),
    where it can be built; elsewhere, and with ``native=False`` or ``DISTILL_NATIVE=0``, as eager
    PyTorch, which makes a pass over the block per operation. The two agree to float32 rounding
    (``tests/test_native_kernel.py``).

    ``compiled=True`` runs the soft-target kernel through ``torch.compile`` when a gradient is wanted
    instead (eager PyTorch makes a pass over the block per operation; compiled, it is fused into a
    few). The first call compiles (seconds; PyTorch caches the result on disk); if compiling fails
    the eager kernel is used from then on, with a warning.

    Owned by the caller: the Distiller keeps one for its run. A :func:`projected_vocab_losses` call
    given none makes its own (eager kernels), freed after its backward; the materialised losses make
    one per call, freed when it returns. Not for use by two threads at once.
    """

    def __init__(self, compiled: bool = False, native: bool = True):
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self.free: list[Tensor] = []  # blocks lent by lease() and given back by release()
        self.spare_grad: Tensor | None = None  # a (V, H) weight gradient given back by recycle()
        self.compiled_kl: Callable | None = torch.compile(_kl_block_fp32, dynamic=True) if compiled else None
        self.native = native

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised ``shape`` block, the same memory as the last block of that name and dtype."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        n = 1
        for d in shape:
            n *= d
        key = (name, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)

    def lease(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised ``shape`` block that nobody else holds until it is given back with
        :meth:`release`: the memory of a block given back earlier when one is large enough (no page
        faults), else new. For blocks kept from a forward to its backward, such as the losses' logit
        gradients; one never given back is simply freed by Python."""
        n = 1
        for d in shape:
            n *= d
        if device.type == "cpu":
            fits = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= n]
            if fits:
                buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
                return buf[:n].view(shape)
            # None is large enough: drop the smaller ones of this dtype, so that the pool holds no more
            # blocks than were lent at once, each of the largest size asked for (batches change shape).
            self.free = [b for b in self.free if b.dtype != dtype]
        return torch.empty(n, dtype=dtype, device=device).view(shape)

    def release(self, block: Tensor) -> None:
        """Give back a block from :meth:`lease`; the caller must not use it again."""
        if block.device.type == "cpu":
            base = block._base if block._base is not None else block
            if all(b.data_ptr() != base.data_ptr() for b in self.free):
                self.free.append(base)

    def recycle(self, grad: Tensor) -> None:
        """Keep a weight gradient the caller is done with (the optimizer stepped on it and its
        ``.grad`` is about to be cleared) for the next :meth:`vocab_grad` of its size. On the CPU a
        fresh (V, H) fp32 block is mapped afresh, a page fault per 4 KB on its first write: 9 ms for
        (30,522, 256) inside a 36 ms matmul. Nothing else may hold it. At most one is kept."""
        if grad.device.type == "cpu" and grad.dtype == torch.float32 and grad._base is None and grad.is_contiguous():
            self.spare_grad = grad

    def vocab_grad(self, shape: tuple[int, int], device: torch.device) -> Tensor:
        """An uninitialised fp32 ``shape`` block for a weight gradient the loss hands to autograd: the
        one given to :meth:`recycle` when it has that shape (it is not kept after: autograd takes it as
        the weight's ``.grad``), else new."""
        spare, self.spare_grad = self.spare_grad, None
        if spare is not None and device.type == "cpu" and tuple(spare.shape) == tuple(shape):
            return spare
        return torch.empty(shape, dtype=torch.float32, device=device)

    def clear(self) -> None:
        """Free the scratch blocks (the next call allocates them again)."""
        self.buffers.clear()
        self.free.clear()
        self.spare_grad = None


def loss_factors(kind: str, temperature: float = 1.0) -> tuple[float, float]:
    """(row factor, gradient factor) of a kernel ("kl", "ce" or "mse"): the loss is the row factor
    times the sum of the kernel's rows, its gradient in the logits the gradient factor times what the
    kernel writes into ``g_out``. The soft-target loss is T**2 KL of logits / T, hence T**2 and T."""
    t = float(temperature)
    return {"kl": (t * t, t), "ce": (1.0, 1.0), "mse": (1.0, 2.0)}[kind]


def scatter_columns_(g: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``g.scatter_(1, index, src)``, fast for 16-bit blocks on the CPU as well.

    PyTorch's CPU scatter into a bf16 or fp16 tensor costs about a pass over the whole tensor
    (torch 2.13: 35 ms for 64 ids a row into a (384, 49,152) bf16 block, against 0.1 ms in fp32). A
    scatter only moves values, so 16-bit blocks are scattered through their bits as int16: the same
    values land where ``scatter_`` puts them (for an id given twice in a row, the last one).
    """
    src = src.to(g.dtype)
    if g.device.type == "cpu" and g.dtype in (torch.bfloat16, torch.float16):
        g.view(torch.int16).scatter_(1, index, src.view(torch.int16))
    else:
        g.scatter_(1, index, src)
    return g


def floored_copy(x: Tensor, scale: float = 1.0) -> Tensor:
    """A float32 copy of logits ``x`` times ``scale``, floored at :data:`LOGIT_FLOOR` (after scaling,
    so that a scale above 1 cannot push a floored value back to -inf)."""
    out = x.to(torch.float32, copy=True)
    if scale != 1.0:
        out.mul_(scale)
    return out.clamp_(min=LOGIT_FLOOR)


def kl_block(a: Tensor, b: Tensor, g_out: Tensor | None, p_s_out: Tensor | None = None,
             p_t_out: Tensor | None = None, colsum: bool = True) -> tuple[Tensor, Tensor | None]:
    """Rows of KL(softmax(b) || softmax(a)) for fp32 (n, V) blocks a = s / T, b = t / T (both
    overwritten, finite: see :data:`LOGIT_FLOOR`); into ``g_out`` softmax(a) - softmax(b), the
    gradient in s up to the factor T (of T**2 KL: T**2 / T).

    Two softmaxes and cheap passes: sum_v p_t (log p_t - log p_s) = sum_v p_t (b - a) - lse(b) + lse(a)
    since sum_v p_t = 1, and lse(x) = max(x) - log(max(softmax(x))), the largest probability never
    underflowing. Half the exponentials of log-softmaxes plus exp, and no (n, V) temporary when the
    softmaxes are given blocks to write (``p_s_out``, ``p_t_out``).
    """
    lse_a = a.amax(-1)
    lse_b = b.amax(-1)
    p_s = torch.softmax(a, -1, out=p_s_out)
    p_t = torch.softmax(b, -1, out=p_t_out)
    lse_a -= p_s.amax(-1).log_()
    lse_b -= p_t.amax(-1).log_()
    row = b.mul_(p_t).sum(-1).sub_(a.mul_(p_t).sum(-1)).add_(lse_a).sub_(lse_b)
    if g_out is None:
        return row, None
    sums = p_s.sum(0).sub_(p_t.sum(0)) if colsum else None
    if g_out.dtype == torch.float32:
        torch.sub(p_s, p_t, out=g_out)
    else:  # a 16-bit out= would go through a fresh fp32 temporary
        g_out.copy_(p_s.sub_(p_t))
    return row, sums


def _kl_block_fp32(a: Tensor, b: Tensor, g_out: Tensor) -> tuple[Tensor, Tensor | None]:
    """:func:`kl_block` on blocks of any float dtype: what :class:`Workspace` compiles."""
    return kl_block(a.float(), b.float(), g_out)


def kl_rows(a: Tensor, b: Tensor, g_out: Tensor | None, workspace: Workspace,
            colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`kl_block` over a chunk (n, V), a few rows at a time on the CPU so that the fp32 working
    blocks stay small (and in cache). Float32 a, b are overwritten; 16-bit ones are copied a block at
    a time. Runs the workspace's compiled kernel instead when it has one and ``g_out`` is given, and
    otherwise the native one on the CPU where it is built (:class:`Workspace`)."""
    if g_out is not None and workspace.compiled_kl is not None:
        try:
            return workspace.compiled_kl(a, b, g_out)
        except Exception as e:  # no C++ compiler, an unsupported platform, ...
            warnings.warn(f"compiling the fused loss kernel failed ({type(e).__name__}); using eager PyTorch")
            workspace.compiled_kl = None
    if workspace.native and a.device.type == "cpu":
        from distill.losses import native

        done = native.kl_rows(a, b, g_out, colsum)
        if done is not None:
            return done
    n, V = a.shape
    rows, sums = [], None
    step = KERNEL_ROWS if a.device.type == "cpu" else n  # a GPU wants few, large kernels

    def block(name: str, k: int) -> Tensor:
        return workspace.get(name, (k, V), torch.float32, a.device)

    for r in range(0, n, step):
        e = min(r + step, n)
        ar, br = a[r:e], b[r:e]
        if ar.dtype != torch.float32:
            ar = block("a32", e - r).copy_(ar)
        if br.dtype != torch.float32:
            br = block("b32", e - r).copy_(br)
        row, cs = kl_block(ar, br, None if g_out is None else g_out[r:e], block("p_s", e - r),
                           block("p_t", e - r), colsum)
        rows.append(row)
        if cs is not None:
            sums = cs if sums is None else sums.add_(cs)
    return (rows[0] if len(rows) == 1 else torch.cat(rows)), sums


def ce_rows(s: Tensor, y: Tensor, g_out: Tensor | None, colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rows of cross-entropy for logits s (n, V), any float dtype, left untouched, and class ids y (n,)
    in range; into ``g_out`` the gradient softmax(s) - onehot(y)."""
    y = y.unsqueeze(1)
    ls = torch.log_softmax(s.float(), -1)
    row = ls.gather(1, y).squeeze(1).neg_()
    if g_out is None:
        return row, None
    g = ls.exp_()
    g.scatter_add_(1, y, torch.full(y.shape, -1.0, dtype=g.dtype, device=g.device))
    g_out.copy_(g)
    return row, (g.sum(0) if colsum else None)


def ce_rows_scaled(s: Tensor, y: Tensor, g_out: Tensor | None, colsum: bool = False, mul: float = 1.0,
                   native: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`ce_rows` of the logits ``mul * s``. With ``native``, on the CPU, in native code
    (:mod:`distill.losses.native`): two passes for the softmax's statistics, one writing its
    probabilities into ``g_out``, and no (n, V) temporary (eager PyTorch makes two, and about six
    passes). Agrees with the eager kernel to float32 rounding."""
    if native and s.device.type == "cpu":
        done = _ce_rows_native(s, y, g_out, colsum, mul)
        if done is not None:
            return done
    return ce_rows(s if mul == 1.0 else s * mul, y, g_out, colsum)


def _ce_rows_native(s: Tensor, y: Tensor, g_out: Tensor | None, colsum: bool, mul: float
                    ) -> tuple[Tensor, Tensor | None] | None:
    from distill.losses import native

    if g_out is not None and not (g_out.is_contiguous() and g_out.shape == s.shape):
        return None
    yy = y.unsqueeze(1)
    stats = native.softmax_stats(s, yy, mul=mul)
    if stats is None:
        return None
    lse = stats[0]
    log_py = s.gather(1, yy).float().mul_(mul).clamp_min_(LOGIT_FLOOR).squeeze(1).sub_(lse)  # as the kernel floors
    row = -log_py
    if g_out is None:
        return row, None
    if not native.scaled_exp(s, lse, torch.ones_like(lse), g_out, mul=mul):
        return None
    scatter_columns_(g_out, yy, log_py.exp().sub_(1.0).unsqueeze(1))  # p_y - 1, rounded once
    return row, (g_out.float().sum(0) if colsum else None)


def mse_rows(s: Tensor, t: Tensor, g_out: Tensor | None, colsum: bool = False) -> tuple[Tensor, Tensor | None]:
    """Rows of sum_v (s - t)^2 for (n, V) blocks of any float dtype, left untouched; into ``g_out``
    s - t (half the gradient)."""
    d = s.float() - t.float()  # (n, V)
    row = (d * d).sum(-1)
    if g_out is None:
        return row, None
    g_out.copy_(d)
    return row, (d.sum(0) if colsum else None)
