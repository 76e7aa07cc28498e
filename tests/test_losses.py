"""Tests for distill.losses against torch.nn.functional / hand computations (CPU, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    HiddenProjection,
    clm_ce,
    clm_count,
    count_positions,
    default_layer_map,
    hidden_cosine,
    hidden_mse,
    lm_ce,
    lm_count,
    logits_mse,
    multi_layer_cosine,
    multi_layer_mse,
    parse_layer_map,
    soft_target_ce,
)

B, L, V, H = 2, 5, 11, 7
N = B * L


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(B, L, V, generator=g) * scale, torch.randn(B, L, V, generator=g) * scale


def _mask(kind: str) -> torch.Tensor | None:
    """None (all), sparse (gather path), dense (compute-all-then-zero path), all, empty."""
    if kind == "none":
        return None
    m = torch.zeros(B, L, dtype=torch.bool)
    if kind == "sparse":  # 3 of 10 selected
        m[0, 1] = m[1, 0] = m[1, 4] = True
    elif kind == "dense":  # 8 of 10 selected
        m[:] = True
        m[0, 4] = m[1, 2] = False
    elif kind == "all":
        m[:] = True
    elif kind == "int01":  # 0/1 integer mask, 6 of 10
        return torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    elif kind != "empty":
        raise AssertionError(kind)
    return m


MASKS = ["none", "sparse", "dense", "all", "int01"]


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).bool()]


def _ref_kl(s, t, T, mask):
    s, t = _rows(s, mask).float(), _rows(t, mask).float()
    return F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="sum") * T**2


def _ref_mse(s, t, mask):
    return F.mse_loss(_rows(s, mask).float(), _rows(t, mask).float(), reduction="sum")


def _ref_cos(s, t, mask):
    s, t = _rows(s, mask).float(), _rows(t, mask).float()
    return F.cosine_embedding_loss(s, t, torch.ones(s.shape[0]), reduction="sum")


def _ref_hmse(s, t, mask):
    s, t = _rows(s, mask).float(), _rows(t, mask).float()
    return ((s - t) ** 2).mean(-1).sum()


def _grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_soft_target_ce_matches_kl_div(mask_kind, T):
    s, t = _logits()
    m = _mask(mask_kind)
    out = soft_target_ce(s, t, T, mask=m)
    assert out.dim() == 0 and out.dtype == torch.float32
    torch.testing.assert_close(out, _ref_kl(s, t, T, m), rtol=1e-5, atol=1e-5)
    assert out.item() > 0.1  # a real, non-trivial value


def test_soft_target_ce_flat_and_identical_inputs():
    s, t = _logits()
    flat = soft_target_ce(s.reshape(N, V), t.reshape(N, V), 2.0)
    torch.testing.assert_close(flat, soft_target_ce(s, t, 2.0))
    # KL of a distribution with itself is zero.
    assert soft_target_ce(s, s.clone(), 3.0).abs().item() < 1e-5


def test_soft_target_ce_is_not_symmetric():
    # Guards against computing KL(p_s || p_t) instead of KL(p_t || p_s).
    s, t = _logits(3)
    assert not torch.allclose(soft_target_ce(s, t, 1.0), soft_target_ce(t, s, 1.0))


def test_soft_target_ce_teacher_minus_inf_is_finite():
    s, t = _logits()
    t[..., :3] = float("-inf")  # e.g. teacher vocabulary padding
    out, g = _grad(lambda x: soft_target_ce(x, t, 2.0), s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    torch.testing.assert_close(out, _ref_kl(s, t, 2.0, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_lm_ce_matches_cross_entropy(mask_kind):
    s, _ = _logits()
    labels = torch.randint(0, V, (B, L), generator=_gen(1))
    m = _mask(mask_kind)
    if m is not None:
        labels[~m.bool()] = -100
    out = lm_ce(s, labels)
    ref = F.cross_entropy(s.reshape(N, V), labels.reshape(N), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert lm_count(labels).item() == (labels != -100).sum().item()


def test_lm_ce_custom_ignore_index_and_flat():
    s, _ = _logits()
    labels = torch.randint(0, V, (N,), generator=_gen(2))
    labels[[1, 4]] = -1
    out = lm_ce(s.reshape(N, V), labels, ignore_index=-1)
    ref = F.cross_entropy(s.reshape(N, V), labels, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert lm_count(labels, ignore_index=-1).item() == N - 2


def test_clm_ce_matches_manual_shift():
    s, _ = _logits()
    labels = torch.randint(0, V, (B, L), generator=_gen(3))
    labels[1, 3:] = -100  # right padding
    out = clm_ce(s, labels)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(L - 1):
            y = labels[b, i + 1].item()
            if y == -100:
                continue
            total += -torch.log_softmax(s[b, i].double(), -1)[y].item()
            count += 1
    assert out.item() == pytest.approx(total, rel=1e-5)
    assert clm_count(labels).item() == count == 6
    # The shifted-label trick must not change the unshifted F.cross_entropy answer.
    ref = F.cross_entropy(
        s[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_logits_mse_matches_mse_loss(mask_kind):
    s, t = _logits()
    m = _mask(mask_kind)
    torch.testing.assert_close(logits_mse(s, t, m), _ref_mse(s, t, m), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_hidden_cosine_matches_cosine_embedding_loss(mask_kind):
    s, t = _logits(4)  # any (B, L, F) works; reuse
    m = _mask(mask_kind)
    torch.testing.assert_close(hidden_cosine(s, t, m), _ref_cos(s, t, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_hidden_mse_is_mean_over_h(mask_kind):
    s, t = _logits(5)
    m = _mask(mask_kind)
    out = hidden_mse(s, t, m)
    torch.testing.assert_close(out, _ref_hmse(s, t, m), rtol=1e-5, atol=1e-5)
    # Mean over H, so it is the summed MSE divided by the width.
    torch.testing.assert_close(out, _ref_mse(s, t, m) / V, rtol=1e-5, atol=1e-5)


def test_hidden_cosine_zero_vector_is_finite():
    s, t = _logits(6)
    s[0, 0] = 0.0
    out, g = _grad(lambda x: hidden_cosine(x, t), s)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    torch.testing.assert_close(out, _ref_cos(s, t, None), rtol=1e-5, atol=1e-5)


def test_counts():
    s, _ = _logits()
    assert count_positions(None, s).item() == N
    assert count_positions(None, s.reshape(N, V)).item() == N
    assert count_positions(_mask("sparse"), s).item() == 3
    assert count_positions(_mask("int01"), s).item() == 6


# --------------------------------------------------------------------------- gradients

FUSED = {
    "kl": (lambda s, t, m, **kw: soft_target_ce(s, t, 2.0, mask=m, **kw), lambda s, t, m: _ref_kl(s, t, 2.0, m)),
    "mse": (lambda s, t, m, **kw: logits_mse(s, t, mask=m, **kw), _ref_mse),
}
HIDDEN = {
    "cos": (lambda s, t, m: hidden_cosine(s, t, m), _ref_cos),
    "hmse": (lambda s, t, m: hidden_mse(s, t, m), _ref_hmse),
}


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("name", sorted({**FUSED, **HIDDEN}))
def test_gradients_match_reference(name, mask_kind):
    fn, ref = {**FUSED, **HIDDEN}[name]
    s, t = _logits(7)
    m = _mask(mask_kind)
    out, g = _grad(lambda x: fn(x, t, m), s)
    ref_out, ref_g = _grad(lambda x: ref(x, t, m), s)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-5)
    if m is not None:  # unselected rows get exactly zero gradient
        assert (g[~m.bool()] == 0).all()
    assert g.abs().sum() > 0


@pytest.mark.parametrize("mask_kind", MASKS)
def test_ce_gradients_match_reference(mask_kind):
    s, _ = _logits(8)
    labels = torch.randint(0, V, (B, L), generator=_gen(9))
    m = _mask(mask_kind)
    if m is not None:
        labels[~m.bool()] = -100
    out, g = _grad(lambda x: lm_ce(x, labels), s)
    ref_out, ref_g = _grad(
        lambda x: F.cross_entropy(x.reshape(N, V), labels.reshape(N), reduction="sum"), s
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)

    out, g = _grad(lambda x: clm_ce(x, labels), s)
    ref_out, ref_g = _grad(
        lambda x: F.cross_entropy(
            x[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum"
        ),
        s,
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_grad_scales_with_upstream_and_retain_graph():
    s, t = _logits(10)
    x = s.clone().requires_grad_(True)
    loss = soft_target_ce(x, t, 2.0)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3.0, x)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_combined_losses_accumulate_on_same_logits():
    s, t = _logits(11)
    labels = torch.randint(0, V, (B, L), generator=_gen(12))
    _, g = _grad(lambda x: 0.5 * soft_target_ce(x, t, 2.0) + 0.25 * lm_ce(x, labels), s)
    _, ref_g = _grad(
        lambda x: 0.5 * _ref_kl(x, t, 2.0, None)
        + 0.25 * F.cross_entropy(x.reshape(N, V), labels.reshape(N), reduction="sum"),
        s,
    )
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6)


def test_inputs_not_modified():
    # The fused kernels overwrite their fp32 working copies; the caller's tensors must survive.
    s, t = _logits(13)
    s0, t0 = s.clone(), t.clone()
    labels = torch.randint(0, V, (B, L), generator=_gen(14))
    for m in (None, _mask("sparse"), _mask("dense")):
        x = s.clone().requires_grad_(True)
        (soft_target_ce(x, t, 2.0, m) + logits_mse(x, t, m) + lm_ce(x, labels)).backward()
        assert torch.equal(x.detach(), s0)
        soft_target_ce(s, t, 0.5, m, chunk_size=3)
        logits_mse(s, t, m)
        lm_ce(s, labels)
    assert torch.equal(s, s0) and torch.equal(t, t0)


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("mask_kind", ["none", "sparse", "dense"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 100])
def test_chunked_equals_unchunked(chunk_size, mask_kind):
    s, t = _logits(15)
    m = _mask(mask_kind)
    labels = torch.randint(0, V, (B, L), generator=_gen(16))
    cases = [
        lambda x, **kw: soft_target_ce(x, t, 2.0, m, **kw),
        lambda x, **kw: logits_mse(x, t, m, **kw),
        lambda x, **kw: lm_ce(x, labels, **kw),
        lambda x, **kw: clm_ce(x, labels, **kw),
    ]
    for fn in cases:
        out, g = _grad(lambda x: fn(x), s)
        out_c, g_c = _grad(lambda x: fn(x, chunk_size=chunk_size), s)
        torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(g_c, g, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- edge cases


def _all_losses(s, t, m):
    labels = torch.randint(0, V, (B, L), generator=_gen(17))
    labels_m = labels.masked_fill(~m.bool(), -100)
    return {
        "kl": soft_target_ce(s, t, 2.0, m),
        "kl_chunked": soft_target_ce(s, t, 2.0, m, chunk_size=2),
        "lm": lm_ce(s, labels_m),
        "clm": clm_ce(s, torch.full_like(labels, -100)),
        "mse": logits_mse(s, t, m),
        "cos": hidden_cosine(s, t, m),
        "hmse": hidden_mse(s, t, m),
        "ml_cos": multi_layer_cosine((s, s), (t, t), [(1, 1)], m),
        "ml_mse": multi_layer_mse((s, s), (t, t), [(0, 1), (1, 0)], m),
    }


@pytest.mark.parametrize("empty", [torch.zeros(B, L, dtype=torch.bool), torch.zeros(B, L)])
def test_empty_mask_is_exact_zero_with_working_backward(empty):
    s, t = _logits(18)
    s[0, 0, 0] = float("nan")  # an exact zero must not depend on the (ignored) values
    x = s.clone().requires_grad_(True)
    losses = _all_losses(x, t, empty)
    for name, loss in losses.items():
        assert loss.dim() == 0 and loss.dtype == torch.float32, name
        assert loss.item() == 0.0, name
        assert loss.requires_grad, name
    sum(losses.values()).backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_empty_mask_without_grad():
    s, t = _logits(19)
    m = torch.zeros(B, L, dtype=torch.bool)
    assert soft_target_ce(s, t, 1.0, m).item() == 0.0
    assert hidden_cosine(s, t, m).item() == 0.0


def test_teacher_gets_no_grad():
    s, t = _logits(20)
    x = s.clone().requires_grad_(True)
    y = t.clone().requires_grad_(True)
    proj = HiddenProjection(V, V, 1, force=True)
    total = (
        soft_target_ce(x, y, 2.0)
        + logits_mse(x, y, _mask("sparse"))
        + hidden_cosine(x, y)
        + hidden_mse(x, y, _mask("dense"))
        + multi_layer_cosine((x,), (y,), [(0, 0)], projection=proj)
        + multi_layer_mse((x,), (y,), [(0, 0)])
    )
    total.backward()
    assert y.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_grad_mode_and_no_requires_grad():
    s, t = _logits(21)
    with torch.no_grad():
        a = soft_target_ce(s.clone().requires_grad_(True), t, 2.0)
    b = soft_target_ce(s, t, 2.0)
    assert not a.requires_grad and not b.requires_grad
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mask_kind", ["none", "sparse", "dense"])
def test_low_precision_inputs_computed_in_fp32(mask_kind):
    s, t = _logits(22)
    m = _mask(mask_kind)
    s16, t16 = s.bfloat16(), t.half()  # student and teacher dtypes differ
    labels = torch.randint(0, V, (B, L), generator=_gen(23))
    cases = [
        (lambda x: soft_target_ce(x, t16, 2.0, m), lambda x: _ref_kl(x, t16.float(), 2.0, m)),
        (lambda x: logits_mse(x, t16, m), lambda x: _ref_mse(x, t16.float(), m)),
        (lambda x: hidden_cosine(x, t16, m), lambda x: _ref_cos(x, t16.float(), m)),
        (lambda x: hidden_mse(x, t16, m), lambda x: _ref_hmse(x, t16.float(), m)),
        (
            lambda x: lm_ce(x, labels),
            lambda x: F.cross_entropy(x.reshape(N, V).float(), labels.reshape(N), reduction="sum"),
        ),
    ]
    for fn, ref in cases:
        out, g = _grad(fn, s16)
        assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
        # Same answer as the fp32 computation on the upcast values...
        ref_out, ref_g = _grad(ref, s16.float())
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(g.float(), ref_g, rtol=1e-2, atol=1e-2)
        # ...and close to the full-precision inputs' answer.
        full = ref(s)
        assert out.item() == pytest.approx(full.item(), rel=2e-2, abs=1e-2)


def test_shape_errors():
    s, t = _logits()
    with pytest.raises(ValueError, match="same shape"):
        soft_target_ce(s, t[..., :-1], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_target_ce(s, t, 0.0)
    with pytest.raises(ValueError, match="mask"):
        logits_mse(s, t, torch.ones(B, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        lm_ce(s, torch.zeros(B, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="clm_ce"):
        clm_ce(s.reshape(N, V), torch.zeros(N, dtype=torch.long))


# --------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize(
    "n_s, n_t, expected",
    [
        (3, 6, [(1, 2), (2, 4), (3, 6)]),
        (6, 12, [(i, 2 * i) for i in range(1, 7)]),
        (2, 2, [(1, 1), (2, 2)]),
        (4, 6, [(1, 2), (2, 3), (3, 5), (4, 6)]),  # 1.5 -> 2, 4.5 -> 5 (half up)
        (1, 12, [(1, 12)]),
        (3, 1, [(1, 1), (2, 1), (3, 1)]),
        (6, 4, [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 4)]),
    ],
)
def test_default_layer_map(n_s, n_t, expected):
    assert default_layer_map(n_s, n_t) == expected


@pytest.mark.parametrize("n_s, n_t", [(4, 12), (5, 24), (7, 32), (12, 12), (2, 3)])
def test_default_layer_map_properties(n_s, n_t):
    pairs = default_layer_map(n_s, n_t)
    assert [p[0] for p in pairs] == list(range(1, n_s + 1))
    teach = [p[1] for p in pairs]
    assert teach[-1] == n_t and all(1 <= x <= n_t for x in teach)
    assert teach == sorted(teach)
    for i, t in pairs:
        assert abs(t - i * n_t / n_s) <= 0.5 + 1e-9


@pytest.mark.parametrize("bad", [0, -1, 2.0, None])
def test_default_layer_map_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integer"):
        default_layer_map(bad, 6)


def test_parse_layer_map():
    assert parse_layer_map("1:2,2:4,3:6") == [(1, 2), (2, 4), (3, 6)]
    assert parse_layer_map(" 1 : 2 , 0:0 ") == [(1, 2), (0, 0)]
    assert parse_layer_map("3:6", n_student=3, n_teacher=6) == [(3, 6)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("1:2,", "bad layer map entry"),
        ("1-2", "bad layer map entry"),
        ("1:2:3", "bad layer map entry"),
        ("a:b", "bad layer map entry"),
        ("1:2.5", "bad layer map entry"),
        ("-1:2", ">= 0"),
        ("1:2,1:2", "twice"),
        ("4:2", "student layer 4"),
        ("1:7", "teacher layer 7"),
    ],
)
def test_parse_layer_map_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layer_map(text, n_student=3, n_teacher=6)


# --------------------------------------------------------------------------- projection / multi-layer


def _hiddens(n_layers: int, width: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    return tuple(torch.randn(B, L, width, generator=g) for _ in range(n_layers + 1))


def test_projection_identity_and_shapes():
    ident = HiddenProjection(H, H, 2)
    assert ident.is_identity and sum(p.numel() for p in ident.parameters()) == 0
    forced = HiddenProjection(H, H, 2, force=True)
    x = torch.randn(B, L, H)
    for out in forced([x, x]):
        torch.testing.assert_close(out, x)
    wide = HiddenProjection(H, 2 * H, 3)
    outs = wide([torch.randn(B, L, H) for _ in range(3)])
    assert [tuple(o.shape) for o in outs] == [(B, L, 2 * H)] * 3
    with pytest.raises(ValueError, match="3 layer pairs"):
        wide([x])


@pytest.mark.parametrize("mask_kind", ["none", "sparse", "dense"])
def test_multi_layer_matches_mean_of_single_layer(mask_kind):
    sh, th = _hiddens(3, H, 24), _hiddens(6, H, 25)
    m = _mask(mask_kind)
    layer_map = default_layer_map(3, 6)
    for multi, single in ((multi_layer_cosine, hidden_cosine), (multi_layer_mse, hidden_mse)):
        out = multi(sh, th, layer_map, m)
        ref = sum(single(sh[i], th[j], m) for i, j in layer_map) / len(layer_map)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_multi_layer_with_projection_matches_manual():
    sh, th = _hiddens(2, 4, 26), _hiddens(4, 6, 27)
    layer_map = [(1, 2), (2, 4)]
    proj = HiddenProjection(4, 6, 2)
    m = _mask("sparse")
    out = multi_layer_cosine(sh, th, layer_map, m, projection=proj)
    projected = proj([sh[1], sh[2]])
    ref = (_ref_cos(projected[0], th[2], m) + _ref_cos(projected[1], th[4], m)) / 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_multi_layer_errors():
    sh, th = _hiddens(2, 4, 28), _hiddens(4, 6, 29)
    with pytest.raises(ValueError, match="HiddenProjection"):
        multi_layer_cosine(sh, th, [(1, 2)])
    with pytest.raises(ValueError, match="teacher layer 5 is out of range"):
        multi_layer_mse(sh, th, [(1, 5)], projection=HiddenProjection(4, 6, 1))
    with pytest.raises(ValueError, match="student layer 3 is out of range"):
        multi_layer_cosine(sh, th, [(3, 2)], projection=HiddenProjection(4, 6, 1))
    with pytest.raises(ValueError, match="projection maps"):
        multi_layer_cosine(sh, th, [(1, 2), (2, 4)], projection=HiddenProjection(4, 6, 1))
    with pytest.raises(ValueError, match="empty"):
        multi_layer_cosine(sh, th, [])


def test_empty_mask_reaches_projection_params():
    sh, th = _hiddens(2, 4, 30), _hiddens(4, 6, 31)
    proj = HiddenProjection(4, 6, 2)
    loss = multi_layer_cosine(sh, th, [(1, 2), (2, 4)], torch.zeros(B, L), projection=proj)
    assert loss.item() == 0.0
    loss.backward()
    for p in proj.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_projection_trains_with_unequal_widths():
    torch.manual_seed(0)
    g = _gen(32)
    # Teacher hidden states are a fixed linear function of the student's, so a
    # projection can learn to align them.
    student = tuple(torch.randn(B, L, 4, generator=g) for _ in range(3))
    w = torch.randn(4, 9, generator=g)
    teacher = tuple(torch.randn(B, L, 9, generator=g) for _ in range(5))
    teacher = teacher[:2] + (student[1] @ w,) + teacher[3:4] + (student[2] @ w,)
    layer_map = [(1, 2), (2, 4)]
    proj = HiddenProjection(4, 9, len(layer_map))
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    mask = _mask("dense")
    n = count_positions(mask, student[0]).item()
    losses = []
    for _ in range(30):
        loss = multi_layer_cosine(student, teacher, layer_map, mask, projection=proj) / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.2 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))


def test_label_mask_given_by_the_caller_matches_the_computed_one():
    from distill.losses import clm_ce, lm_ce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :3] = -100
    labels[1, 4] = -100
    mask = labels != -100
    for fn in (lm_ce, clm_ce):
        a = fn(logits, labels)
        (ga,) = torch.autograd.grad(a, logits)
        b = fn(logits, labels, label_mask=mask.clone())
        (gb,) = torch.autograd.grad(b, logits)
        assert torch.equal(a, b) and torch.equal(ga, gb)


# --------------------------------------------------------------------------- projection fused with the losses

from distill import losses as Lmod  # noqa: E402
from distill.losses import ProjectedLogits, projected_vocab_losses, projection_input, shift_labels  # noqa: E402

Hp = 6  # hidden width of the projected tests (V, B, L as above)


def _proj_case(seed: int = 0, bias: bool = True):
    """Student hidden (B, L, Hp) and projection, teacher hidden and projection, labels with ~40% kept."""
    g = _gen(seed)
    h = torch.randn(B, L, Hp, generator=g)
    w = torch.randn(V, Hp, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    th = torch.randn(B, L, Hp, generator=g) * 2
    tw = torch.randn(V, Hp, generator=g)
    tb = torch.randn(V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) > 0.4] = -100
    return h, w, b, th, tw, tb, labels


def _params(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


WANTS = {  # which losses: soft_target, mse, labels
    "kl+ce": (True, False, True),
    "kl": (True, False, False),
    "ce": (False, False, True),
    "kl+mse+ce": (True, True, True),
    "mse": (False, True, False),
}


@pytest.mark.parametrize("want", sorted(WANTS))
@pytest.mark.parametrize("mask_kind", ["none", "sparse", "dense", "int01"])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_projected_losses_match_the_unfused_ones(want, mask_kind, chunk_size, T):
    soft, mse, use_labels = WANTS[want]
    h0, w0, b0, th, tw, tb, labels = _proj_case(1)
    m = _mask(mask_kind)
    teacher_logits = F.linear(th, tw, tb)
    weights = {"soft_target_ce": 0.7, "logits_mse": 0.01, "lm_ce": 1.3}
    for teacher in (ProjectedLogits(th, tw, tb), teacher_logits):
        h, w, b = _params(h0, w0, b0)
        out = projected_vocab_losses(h, w, b, teacher=teacher, temperature=T, soft_target=soft, mse=mse, mask=m,
                                     labels=labels if use_labels else None, chunk_size=chunk_size)
        loss = sum(weights[k] * v for k, v in out.items())
        grads = torch.autograd.grad(loss, [h, w, b])

        rh, rw, rb = _params(h0, w0, b0)
        logits = F.linear(rh, rw, rb)
        ref = {}
        if soft:
            ref["soft_target_ce"] = soft_target_ce(logits, teacher_logits, T, mask=m)
        if mse:
            ref["logits_mse"] = logits_mse(logits, teacher_logits, mask=m)
        if use_labels:
            ref["lm_ce"] = lm_ce(logits, labels)
        ref_loss = sum(weights[k] * v for k, v in ref.items())
        ref_grads = torch.autograd.grad(ref_loss, [rh, rw, rb])
        assert out.keys() == ref.keys()
        for k in ref:
            assert out[k].dtype == torch.float32 and out[k].dim() == 0
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-4)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_projected_losses_without_bias_and_flat_rows():
    h0, w0, _, th, tw, _, labels = _proj_case(2, bias=False)
    h, w = _params(h0.reshape(N, Hp), w0)
    out = projected_vocab_losses(h, w, None, teacher=ProjectedLogits(th.reshape(N, Hp), tw), temperature=2.0,
                                 soft_target=True, labels=labels.reshape(N), chunk_size=4)
    gh, gw = torch.autograd.grad(out["soft_target_ce"] + out["lm_ce"], [h, w])
    rh, rw = _params(h0.reshape(N, Hp), w0)
    logits = rh @ rw.t()
    ref = soft_target_ce(logits, th.reshape(N, Hp) @ tw.t(), 2.0) + lm_ce(logits, labels.reshape(N))
    rgh, rgw = torch.autograd.grad(ref, [rh, rw])
    torch.testing.assert_close(out["soft_target_ce"] + out["lm_ce"], ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, rgh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rgw, rtol=1e-5, atol=1e-5)


def test_projected_clm_with_shifted_labels_matches_clm_ce():
    h0, w0, b0, _, _, _, labels = _proj_case(3)
    labels[:, 0] = 1  # something to predict from the previous position
    h, w, b = _params(h0, w0, b0)
    lbl, lmask = shift_labels(labels, labels != -100)
    out = projected_vocab_losses(h, w, b, labels=lbl, label_mask=lmask, chunk_size=3)["lm_ce"]
    gh = torch.autograd.grad(out, h)[0]
    rh, rw, rb = _params(h0, w0, b0)
    ref = clm_ce(F.linear(rh, rw, rb), labels)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, torch.autograd.grad(ref, rh)[0], rtol=1e-5, atol=1e-6)
    assert clm_count(labels).item() == int(lmask.sum())


def test_projected_losses_in_bf16_are_close_to_autocast():
    h0, w0, b0, th, tw, tb, labels = _proj_case(4)
    h, w, b = _params(h0, w0, b0)
    out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw, tb), temperature=2.0, soft_target=True,
                                 labels=labels, compute_dtype=torch.bfloat16, chunk_size=3)
    grads = torch.autograd.grad(out["soft_target_ce"] + out["lm_ce"], [h, w, b])
    assert all(g.dtype == torch.float32 for g in grads)  # gradients come back in the inputs' dtypes
    rh, rw, rb = _params(h0, w0, b0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, t_logits = F.linear(rh, rw, rb), F.linear(th, tw, tb)
    ref = soft_target_ce(logits, t_logits, 2.0) + lm_ce(logits, labels)
    ref_grads = torch.autograd.grad(ref, [rh, rw, rb])
    torch.testing.assert_close(out["soft_target_ce"] + out["lm_ce"], ref, rtol=2e-2, atol=1e-2)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=5e-2, atol=5e-2)


def test_projected_losses_empty_masks_give_exact_zeros_and_zero_gradients():
    h0, w0, b0, th, tw, tb, labels = _proj_case(5)
    h, w, b = _params(h0, w0, b0)
    none = torch.zeros(B, L, dtype=torch.bool)
    out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw, tb), soft_target=True, mask=none,
                                 labels=torch.full((B, L), -100))
    assert all(v.item() == 0.0 for v in out.values())
    grads = torch.autograd.grad(sum(out.values()), [h, w, b])
    assert all((g == 0).all() for g in grads)


def test_projected_losses_without_grad_and_one_backward_only():
    h0, w0, b0, th, tw, tb, labels = _proj_case(6)
    teacher = ProjectedLogits(th, tw, tb)
    with torch.no_grad():
        a = projected_vocab_losses(h0, w0, b0, teacher=teacher, soft_target=True, labels=labels)
    h, w, b = _params(h0, w0, b0)
    out = projected_vocab_losses(h, w, b, teacher=teacher, soft_target=True, labels=labels)
    for k in a:
        torch.testing.assert_close(a[k], out[k].detach())
    loss = out["soft_target_ce"] + out["lm_ce"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_projected_losses_teacher_minus_inf_bias_is_finite():
    h0, w0, b0, th, tw, tb, _ = _proj_case(7)
    tb[:3] = float("-inf")  # e.g. vocabulary padding the teacher never predicts
    h, w, b = _params(h0, w0, b0)
    out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw, tb), temperature=2.0, soft_target=True)
    g = torch.autograd.grad(out["soft_target_ce"], h)[0]
    assert torch.isfinite(out["soft_target_ce"]) and torch.isfinite(g).all()
    ref = soft_target_ce(F.linear(h0, w0, b0), F.linear(th, tw, tb), 2.0)
    torch.testing.assert_close(out["soft_target_ce"], ref, rtol=1e-5, atol=1e-4)


def test_projected_losses_reuse_the_workspace_across_shapes():
    h0, w0, b0, th, tw, tb, labels = _proj_case(8)
    teacher = ProjectedLogits(th, tw, tb)
    ws = Lmod.Workspace()
    first = projected_vocab_losses(h0, w0, b0, teacher=teacher, soft_target=True, labels=labels, chunk_size=7,
                                   workspace=ws)
    projected_vocab_losses(h0[:1, :2], w0, b0, teacher=ProjectedLogits(th[:1, :2], tw, tb), soft_target=True,
                           chunk_size=2, workspace=ws)  # a smaller call in between
    again = projected_vocab_losses(h0, w0, b0, teacher=teacher, soft_target=True, labels=labels, chunk_size=7,
                                   workspace=ws)
    ws.clear()
    fresh = projected_vocab_losses(h0, w0, b0, teacher=teacher, soft_target=True, labels=labels, chunk_size=7,
                                   workspace=ws)
    for k in first:
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], fresh[k])


def test_workspace_lease_reuses_given_back_blocks_and_never_lends_one_twice():
    ws = Lmod.Workspace()
    a = ws.lease((4, 6), torch.float32, torch.device("cpu"))
    b = ws.lease((4, 6), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()  # a is not given back: b is new
    ws.release(a)
    ws.release(a)  # twice: still lent once
    c = ws.lease((2, 6), torch.float32, torch.device("cpu"))
    assert c.data_ptr() == a.data_ptr() and c.shape == (2, 6)
    d = ws.lease((2, 6), torch.float32, torch.device("cpu"))
    assert d.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert ws.lease((2, 6), torch.float64, torch.device("cpu")).dtype == torch.float64
    ws.release(b)
    assert ws.lease((5, 6), torch.float32, torch.device("cpu")).data_ptr() != b.data_ptr()  # too small
    assert all(x.dtype != torch.float32 for x in ws.free)  # b is dropped, not kept beside the larger block


def _losses_and_grads(h0, w0, b0, teacher, labels, ws, calls: int):
    """``calls`` forwards on one workspace, then their backwards in reverse order."""
    outs, params = [], []
    for _ in range(calls):
        h, w, b = _params(h0, w0, b0)
        outs.append(projected_vocab_losses(h, w, b, teacher=teacher, soft_target=True, labels=labels,
                                           chunk_size=3, workspace=ws))
        params.append((h, w, b))
    grads = []
    for out, ps in reversed(list(zip(outs, params))):
        grads.append(torch.autograd.grad(2.0 * out["soft_target_ce"] + 3.0 * out["lm_ce"], ps))
    return outs, grads


def test_projected_losses_kept_gradients_survive_a_second_forward_before_the_backward():
    h0, w0, b0, th, tw, tb, labels = _proj_case(10)
    teacher = ProjectedLogits(th, tw, tb)
    _, (ref,) = _losses_and_grads(h0, w0, b0, teacher, labels, Lmod.Workspace(), 1)
    ws = Lmod.Workspace()
    for _ in range(2):  # the second round reuses the blocks the first gave back
        _, grads = _losses_and_grads(h0, w0, b0, teacher, labels, ws, 2)
        for g in grads:
            for x, y in zip(g, ref):
                assert torch.equal(x, y)
    assert len(ws.free) >= 2


def test_projected_losses_lease_the_weights_16bit_copy():
    """bf16 compute on an fp32 weight: the weight's bf16 copy is leased from the workspace and given back after
    the backward (or at the end of a forward without gradients), so the next forward writes the same memory
    instead of a fresh (V, H) block; the losses and gradients are those of a fresh workspace."""
    h0, w0, b0, th, tw, tb, labels = _proj_case(10)
    teacher = ProjectedLogits(th, tw, tb)

    def run(ws, grad=True):
        h, w, b = _params(h0, w0, b0)
        with torch.set_grad_enabled(grad):
            out = projected_vocab_losses(h, w, b, teacher=teacher, soft_target=True, labels=labels,
                                         compute_dtype=torch.bfloat16, chunk_size=3, workspace=ws)
        if not grad:
            return out, None
        return out, torch.autograd.grad(out["soft_target_ce"] + out["lm_ce"], (h, w, b))

    def weight_copies(ws):
        return [x for x in ws.free if x.dtype == torch.bfloat16 and x.numel() == w0.numel()]

    ref = run(Lmod.Workspace())
    ws = Lmod.Workspace()
    got = run(ws)
    (copy,) = weight_copies(ws)  # given back by the backward
    again = run(ws)
    assert [x.data_ptr() for x in weight_copies(ws)] == [copy.data_ptr()]  # the same memory, written again
    for out, grads in (got, again):
        assert all(torch.equal(out[k], ref[0][k]) for k in out)
        assert all(torch.equal(x, y) for x, y in zip(grads, ref[1]))
    run(ws, grad=False)
    assert [x.data_ptr() for x in weight_copies(ws)] == [copy.data_ptr()]  # no backward: given back at once


def test_projected_losses_argument_errors():
    h0, w0, b0, th, tw, tb, labels = _proj_case(9)
    with pytest.raises(ValueError, match="need the teacher"):
        projected_vocab_losses(h0, w0, b0, soft_target=True)
    with pytest.raises(ValueError, match="no loss"):
        projected_vocab_losses(h0, w0, b0)
    with pytest.raises(ValueError, match="weight must be"):
        projected_vocab_losses(h0, w0[:, :2], b0, labels=labels)
    with pytest.raises(ValueError, match="teacher logits must be"):
        projected_vocab_losses(h0, w0, b0, teacher=torch.zeros(B, L, V + 1), soft_target=True)


def _tiny_lms():
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel)

    torch.manual_seed(0)
    return [
        BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16)).eval(),
        DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=8, n_layers=1, n_heads=2, hidden_dim=16)).eval(),
        GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=8, n_layer=1, n_head=2, n_positions=16)).eval(),
    ]


@pytest.mark.parametrize("i", range(3))
def test_projection_input_gives_what_the_projection_sees(i):
    model = _tiny_lms()[i]
    ids = torch.randint(0, V, (2, 5), generator=_gen(10))
    logits = model(input_ids=ids).logits
    proj = Lmod.output_projection(model)
    assert proj is model.get_output_embeddings()
    with projection_input(model) as p:
        hidden = model(input_ids=ids).logits
    assert p is proj and hidden.shape == (2, 5, 8)
    torch.testing.assert_close(F.linear(hidden, proj.weight, proj.bias), logits)
    torch.testing.assert_close(ProjectedLogits(hidden, proj.weight, proj.bias).materialize(), logits)
    torch.testing.assert_close(model(input_ids=ids).logits, logits)  # the projection is back


def test_output_projection_of_unknown_models_is_none():
    assert Lmod.output_projection(torch.nn.Linear(3, 4)) is None
    with pytest.raises(ValueError, match="no plain vocabulary projection"):
        with projection_input(torch.nn.Linear(3, 4)):
            pass


@pytest.mark.slow
def test_compiled_kernel_matches_eager():
    h0, w0, b0, th, tw, tb, labels = _proj_case(11)
    teacher = ProjectedLogits(th, tw, tb)
    runs = []
    for compiled in (False, True):
        h, w, b = _params(h0, w0, b0)
        out = projected_vocab_losses(h, w, b, teacher=teacher, temperature=2.0, soft_target=True, labels=labels,
                                     chunk_size=3, workspace=Lmod.Workspace(compiled=compiled))
        runs.append((out, torch.autograd.grad(out["soft_target_ce"] + out["lm_ce"], [h, w, b])))
    (eager, ge), (comp, gc) = runs
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-5, atol=1e-4)
    for a, r in zip(gc, ge):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_few_unlabelled_rows_keep_their_gradients_and_many_go_through_the_projection():
    """Causal LM leaves one row a sequence unlabelled: its kl gradient is kept with the labelled rows'
    (one matmul through the projection in backward); MLM leaves most rows unlabelled: theirs go
    through the projection as the chunks go. The parity tests above cover both paths' values."""
    from distill.losses.fused import _kept_rows

    assert _kept_rows(k_ce=120, k=128, chunk=64) == 128  # 8 unlabelled rows, at most a chunk
    assert _kept_rows(k_ce=20, k=128, chunk=64) == 20  # 108 unlabelled rows
    assert _kept_rows(k_ce=0, k=128, chunk=256) == 0  # no labels: nothing kept


@pytest.mark.parametrize("native", [True, False])
def test_projected_forward_kl_writes_the_unlabelled_rows_gradient_over_the_students_block(native):
    """fp32 forward KL: the gradient of the rows without labels overwrites the student's (chunk, V) block
    and goes through the projection at once, so no group block is made; the labelled rows keep theirs,
    ce's only for its own rows. Values and gradients are the unfused ones."""
    h0, w0, b0, th, tw, tb, labels = _proj_case(11)
    teacher_logits = F.linear(th, tw, tb)
    for chunk in (3, 100):  # 100: the few unlabelled rows are kept too, and ce's block is smaller than kl's
        ws = Lmod.Workspace(native=native)
        h, w, b = _params(h0, w0, b0)
        out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw, tb), temperature=2.0, soft_target=True,
                                     labels=labels, chunk_size=chunk, workspace=ws)
        grads = torch.autograd.grad(0.7 * out["soft_target_ce"] + 1.3 * out["lm_ce"], [h, w, b])
        assert not any(name.startswith("group") for name, _ in ws.buffers)
        k_ce, k = int((labels != -100).sum()), B * L
        kept = sorted(blk.numel() // V for blk in ws.free)
        assert kept == ([k_ce, k] if k - k_ce <= max(1, chunk // 4) else [k_ce, k_ce])
        rh, rw, rb = _params(h0, w0, b0)
        logits = F.linear(rh, rw, rb)
        ref = {"soft_target_ce": soft_target_ce(logits, teacher_logits, 2.0), "lm_ce": lm_ce(logits, labels)}
        ref_grads = torch.autograd.grad(0.7 * ref["soft_target_ce"] + 1.3 * ref["lm_ce"], [rh, rw, rb])
        for key in ref:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-4)
        for a, r in zip(grads, ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # 16-bit compute still gathers two chunks' rows in a group block before the (V, H) partial
    ws = Lmod.Workspace(native=native)
    h, w, b = _params(h0, w0, b0)
    out = projected_vocab_losses(h, w, b, teacher=ProjectedLogits(th, tw, tb), soft_target=True, labels=labels,
                                 chunk_size=3, workspace=ws, compute_dtype=torch.bfloat16)
    out["soft_target_ce"].backward()
    assert ("group0", torch.bfloat16) in ws.buffers
