"""The Distiller's losses against torch.nn.functional on materialised logits (not against the Distiller's
own count rules), CLM through the Distiller, --restrict_ce_to_mask, DataLoader workers, the fp16
scaler path, the CPU column-sliced projection (V > 1024), and a TrainConfig built in Python."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from distill import losses as L
from distill.cli import train
from distill.config import TrainConfig
from distill.data.collate import Collator, mlm_token_probs
from distill.data.dataset import LMSeqsDataset
from distill.distiller import Distiller
from distill.errors import UserError

from .test_train import TINY, metrics, mlm_args, world  # noqa: F401  (the module-scoped fixture)

T = 2.0


def _distiller(world, kind: str, **over) -> tuple[Distiller, list[dict]]:  # noqa: F811
    """A Distiller on the tiny world without dropout, and one step's micro-batches."""
    torch.manual_seed(0)
    if kind == "mlm":
        data, teacher_dir, student = world["root"] / "data_bert", world["bert"], BertForMaskedLM
        s_cfg = BertConfig(vocab_size=world["V"], **{**TINY, "num_hidden_layers": 1})
        extra = dict(mlm=True, alpha_mlm=1.0, student_type="bert", teacher_type="bert")
    else:
        data, teacher_dir, student = world["root"] / "data_gpt2", world["gpt2"], GPT2LMHeadModel
        s_cfg = GPT2Config(vocab_size=json.loads((world["gpt2"] / "config.json").read_text())["vocab_size"],
                           n_embd=32, n_layer=1, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)
        extra = dict(alpha_clm=1.0, student_type="gpt2", teacher_type="gpt2")
    cfg = TrainConfig(dump_path="x", data_file=str(data), student_config="c", teacher_name=str(teacher_dir),
                      alpha_ce=1.0, alpha_mse=0.5, alpha_cos=0.0, temperature=T, batch_size=3,
                      gradient_accumulation_steps=2, max_model_input_size=64, warmup_prop=0.0, max_grad_norm=0.0,
                      **{**extra, **over})
    ds = LMSeqsDataset(cfg.data_file, max_model_input_size=64)
    special = ds.meta["special_token_ids"]
    if cfg.mlm:
        probs = mlm_token_probs(torch.ones(ds.meta["vocab_size"]).numpy(), 0.7, sorted(set(special.values())))
        coll = Collator(special["pad_token"], mlm=True, mask_id=special["mask_token"], token_probs=probs, seed=0)
    else:
        coll = Collator(special.get("pad_token", special["eos_token"]), causal=True, seed=0)
    teacher = (BertForMaskedLM if kind == "mlm" else GPT2LMHeadModel).from_pretrained(teacher_dir).eval()
    d = Distiller(cfg, student(s_cfg), teacher, ds, coll, torch.device("cpu"), student_objective=kind)
    micro = [coll([ds[i] for i in range(j, j + 3)]) for j in (0, 3)]  # two micro-batches of 3
    return d, micro


def _by_hand(d: Distiller, micro: list[dict], kind: str) -> dict[str, float]:
    """Each loss of the step from materialised logits and torch.nn.functional, normalised over the step."""
    sums = {"ce": 0.0, "mse": 0.0, "lm": 0.0}
    counts = {"ce": 0, "lm": 0}
    with torch.no_grad():
        for b in micro:
            s = d.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            t = d.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            rows = b["attention_mask"].bool() if not d.cfg.restrict_ce_to_mask else b["labels"] != -100
            sums["ce"] += F.kl_div(F.log_softmax(s[rows] / T, -1), F.log_softmax(t[rows] / T, -1),
                                   log_target=True, reduction="sum").item() * T * T
            sums["mse"] += F.mse_loss(s[rows], t[rows], reduction="sum").item()
            counts["ce"] += int(rows.sum())
            logits, labels = (s, b["labels"]) if kind == "mlm" else (s[:, :-1], b["labels"][:, 1:])
            keep = labels != -100
            sums["lm"] += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            counts["lm"] += int(keep.sum())
    return {"ce": sums["ce"] / counts["ce"], "mse": sums["mse"] / counts["ce"], kind: sums["lm"] / counts["lm"]}


@pytest.mark.parametrize("kind", ["mlm", "clm"])
@pytest.mark.parametrize("restrict", [False, True])
def test_step_losses_match_torch_functional(world, kind, restrict):  # noqa: F811
    if restrict and kind == "clm":
        pytest.skip("--restrict_ce_to_mask needs --mlm")
    d, micro = _distiller(world, kind, restrict_ce_to_mask=restrict)
    expected = _by_hand(d, micro, kind)  # before the step changes the student
    res = d.step(micro)
    assert not res.skipped
    for k, v in expected.items():
        assert float(res.parts[k]) == pytest.approx(v, rel=1e-4), k
    weights = d.alphas
    assert float(res.loss) == pytest.approx(sum(weights[k] * v for k, v in expected.items()), rel=1e-4)


def test_restrict_ce_to_mask_changes_the_rows(world):  # noqa: F811
    d, micro = _distiller(world, "mlm")
    full = _by_hand(d, micro, "mlm")
    d.cfg.restrict_ce_to_mask = True
    masked = _by_hand(d, micro, "mlm")
    assert masked["ce"] != pytest.approx(full["ce"], rel=1e-3)  # the hand computation tells them apart
    assert float(d.step(micro).parts["ce"]) == pytest.approx(masked["ce"], rel=1e-4)


def test_dataloader_workers_give_the_same_run(world, tmp_path):  # noqa: F811
    """Batches built in worker processes are the batches built in the main process."""
    runs = {}
    for workers in (0, 2):
        dump = tmp_path / f"w{workers}"
        assert train.main(mlm_args(world, dump, "--max_steps", "4", "--num_workers", str(workers))) == 0
        runs[workers] = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in metrics(dump)]
    assert runs[0] == runs[2]


def test_fp16_scaler_path_skips_overflow_and_matches_unscaled(world):  # noqa: F811
    """The gradient-scaler branch of optimize(): an overflowing step is skipped and the scale shrinks;
    a finite step updates as the unscaled step does (on the CPU, with a CPU scaler)."""
    d_plain, micro = _distiller(world, "mlm")
    d_scaled, _ = _distiller(world, "mlm")
    d_scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in d_scaled.student.parameters()]
    hook = next(d_scaled.student.parameters()).register_hook(lambda g: g * float("inf"))
    res = d_scaled.step(micro)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, d_scaled.student.parameters()))  # no update
    assert d_scaled.scaler.get_scale() < 2.0 ** 10  # the scaler backed off
    assert not res.skipped  # an fp16 overflow is routine, not a bad step
    assert d_scaled.scheduler.last_epoch == 0  # and the schedule did not move
    d_plain.step(micro)
    d_scaled.step(micro)
    for a, b in zip(d_plain.student.parameters(), d_scaled.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_over_column_slices_matches_materialised(dtype):
    """V = 2,500 > 1,024: the CPU path that projects the vocabulary in column slices (the other tests use
    tiny vocabularies that fit one slice); values and gradients against the materialised functions."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 40, 16, 2500
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    teacher = torch.randn(N, V, generator=g) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    mask = torch.rand(N, generator=g) > 0.2
    out = L.projected_vocab_losses(hidden, weight, bias, teacher=teacher, temperature=T, soft_target=True, mse=True,
                                   mask=mask, labels=labels, compute_dtype=dtype)
    total = out["soft_target_ce"] + out["logits_mse"] + out["lm_ce"]
    grads = torch.autograd.grad(total, (hidden, weight, bias))

    h2, w2, b2 = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    logits = (h2.to(dtype) @ w2.to(dtype).T + b2.to(dtype)).float()
    ref = {"soft_target_ce": L.soft_target_ce(logits, teacher, T, mask=mask),
           "logits_mse": L.logits_mse(logits, teacher, mask=mask), "lm_ce": L.lm_ce(logits, labels)}
    ref_grads = torch.autograd.grad(sum(ref.values()), (h2, w2, b2))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], **tol, msg=k)
    for a, b, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, **tol, msg=name)


def test_train_config_built_in_python_is_validated(world):  # noqa: F811
    base = dict(dump_path="x", data_file="d", student_type="distilbert", student_config="c", teacher_type="bert",
                teacher_name="t", mlm=True, alpha_mlm=1.0)
    TrainConfig(**base)  # fine
    for bad, match in ((dict(alpha_ce=-1.0), "--alpha_ce must not be negative"),
                       (dict(temperature=float("nan")), "finite"), (dict(gradient_accumulation_steps=0), "at least 1"),
                       (dict(dump_path=None), "--dump_path is required")):
        with pytest.raises(UserError, match=match):
            TrainConfig(**{**base, **bad})
    assert TrainConfig(**base).loss_weights() == {"ce": 0.5, "mlm": 1.0, "clm": 0.0, "mse": 0.0, "cos": 0.0,
                                                  "hidden_mse": 0.0}


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_a_tied_embeddings_rows_give_the_steps_dense_gradients(world, kind):  # noqa: F811
    """On the CPU the Distiller adds a tied input embedding's gradient into the projection's as rows
    (distill.memory.EmbeddingRowGrads): over a step of two micro-batches, every gradient matches the one
    of PyTorch's dense embedding backward to float rounding."""
    grads = {}
    for mode in ("rows", "dense"):
        d, micro = _distiller(world, kind)
        assert d.embedding_rows is not None
        if mode == "dense":  # the module's own forward again
            del d.embedding_rows.embedding.forward
            d.embedding_rows = None

        def capture(loss_total, d=d, mode=mode):
            grads[mode] = {n: p.grad.clone() for n, p in d.student.named_parameters() if p.grad is not None}
            d.optimizer.zero_grad(set_to_none=True)
            return None

        d.optimize = capture
        d.step(micro)
    assert set(grads["rows"]) == set(grads["dense"])
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["rows"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_the_projections_weight_gradient_is_recycled_and_changes_nothing(world, kind):  # noqa: F811
    """On the CPU, the projection's weight gradient goes back to the loss workspace when cleared and the
    next step's is written into the same memory (L.Workspace.recycle): no fresh (V, H) block, and the
    same parameters after three steps as with a fresh block every step, bit for bit."""
    finals, ptrs = {}, {}
    for mode in ("recycled", "fresh"):
        d, micro = _distiller(world, kind)
        proj = L.output_projection(d.student)
        assert d._recycled_grad is proj.weight
        if mode == "fresh":
            d._recycled_grad = None
        seen = ptrs[mode] = []
        step = d.optimizer.step

        def stepped(*a, seen=seen, step=step, proj=proj, **k):
            seen.append(proj.weight.grad.data_ptr())
            return step(*a, **k)

        d.optimizer.step = stepped
        ws, reused = d.loss_workspace, []
        vocab_grad = ws.vocab_grad

        def tracked(*a, ws=ws, vocab_grad=vocab_grad, reused=reused):
            spare = ws.spare_grad
            out = vocab_grad(*a)
            reused.append(spare is not None and out is spare)
            return out

        ws.vocab_grad = tracked
        for _ in range(3):
            d.step(micro)
            assert (ws.spare_grad is not None) == (mode == "recycled")
        finals[mode] = {n: p.detach().clone() for n, p in d.student.named_parameters()}
        # two micro-batches a step: the first takes the spare, the second's is added into .grad
        assert any(reused) == (mode == "recycled")
    assert len(set(ptrs["recycled"])) == 1  # the first step's block, every step
    for name, p in finals["fresh"].items():
        assert torch.equal(finals["recycled"][name], p), name
