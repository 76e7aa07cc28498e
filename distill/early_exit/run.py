"""One early-exit job (``scripts/run_glue_deebert.py``, ``distill-early-exit``): DeeBERT's flow, batched.

    python scripts/run_glue_deebert.py --task_name sst-2 --data_dir glue_data/SST-2 \
        --model_name_or_path bert-folder --output_dir runs/ee --do_train --do_sweep \
        [--recipe two_stage,self_distill,joint] [--skip_first_stage] [--eval_highway --early_exit_entropy 0.3]

In order: everything checked before anything is loaded or written; stage 1 (fine-tune model and
final classifier, unless ``--skip_first_stage`` or only ``joint``); stage 2 for each stage-2 recipe
(the exits alone, on backbone features computed once); ``joint`` from the same starting weights;
evaluation (the final classifier, ``--eval_highway``, ``--eval_each_highway``); the sweep, which
times chosen points and writes the fastest within ``--max_metric_drop`` into the saved model. The
output folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distill.early_exit import model as EM
from distill.early_exit import recipes as R
from distill.early_exit import sweep as S
from distill.early_exit.backbones import LayerRunner
from distill.early_exit.config import EarlyExitConfig
from distill.early_exit.policies import ExitPolicy
from distill.errors import UserError, note
from distill.fileio import staged_folder, write_atomic
from distill.hf import quiet_transformers
from distill.glue.compare import subset
from distill.glue.features import Features, load_features
from distill.glue.modeling import load_classifier, load_teacher, load_tokenizer, set_padding
from distill.glue.run import (
    check_inputs,
    check_model_fits,
    check_output_dir,
    check_teacher_tokenizer,
    evaluate_splits,
    write_results,
)
from distill.glue.tasks import Task, get_task, split_path
from distill.glue.trainer import fine_tune, map_batches, pick_device, progress_bars
from distill.seeding import seed_everything

ARGS_FILE = "early_exit_args.json"
SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
TRAIN_LOG = "train_log.jsonl"


def _checks(cfg: EarlyExitConfig, task: Task) -> Path:
    """Everything the flags alone can get wrong, before loading a model."""
    recipes = cfg.recipes()
    check_inputs(cfg, task)
    if cfg.do_sweep:
        split_path(task, cfg.data_dir, task.dev_splits[0])
    writes_model = cfg.do_train or cfg.do_sweep
    out = check_output_dir(dataclasses.replace(cfg, do_train=writes_model))
    if cfg.teacher_name_or_path is not None and "self_distill" not in recipes:
        note("--teacher_name_or_path is used only by --recipe self_distill")
    policy = cfg.policy()
    if policy is not None and task.is_regression and policy.name != "patience":
        policy.validate(num_labels=1, num_exits=1, regression=True)  # the one sentence for it
    if cfg.do_sweep and task.is_regression:
        note("on a regression task the sweep tries the patience policy only")
    return out


def _check_policy(cfg: EarlyExitConfig, task: Task, num_exits: int):
    policy = cfg.policy()
    if policy is not None:
        policy.validate(num_labels=task.num_labels, num_exits=num_exits, regression=task.is_regression)
    return policy


def run_early_exit(cfg: EarlyExitConfig | dict, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and/or sweep as ``cfg`` says; returns the results (also in ``eval_results.json``)."""
    if isinstance(cfg, dict):
        cfg = EarlyExitConfig.from_dict(cfg)
    cfg.validate()
    task = get_task(cfg.task_name)
    out = _checks(cfg, task)
    device = pick_device(cfg.no_cuda)
    progress = progress_bars(cfg.disable_tqdm)
    recipes = cfg.recipes()

    tok = load_tokenizer(cfg.model_name_or_path)
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    clf = load_classifier(cfg.model_name_or_path, task)
    num_layers = LayerRunner(clf.model).num_layers  # a model type without exit support: one sentence, here
    check_model_fits(clf, tok, cfg, "model")
    pad_id = set_padding(clf, tok)
    exit_layers = EM.parse_exit_layers(cfg.exit_layers, num_layers)

    saved_exits = None
    if not cfg.do_train:
        if not EM.has_exits(cfg.model_name_or_path):
            if cfg.eval_highway or cfg.eval_each_highway or cfg.do_sweep:
                flag = "--do_sweep" if cfg.do_sweep else ("--eval_highway" if cfg.eval_highway else
                                                          "--eval_each_highway")
                raise UserError(f"{flag} needs a model with exits, and {cfg.model_name_or_path} has none; "
                                "train them with --do_train")
        else:
            saved_exits = EM.attach_exits(clf.model, cfg.model_name_or_path)
            exit_layers = saved_exits.settings.exit_layers
    policy = _check_policy(cfg, task, len(exit_layers))
    report = clf.loading_report()
    if report is not None:
        if cfg.do_train and cfg.skip_first_stage:
            raise UserError(f"--skip_first_stage needs a model fine-tuned on {task.name}, and {report}")
        note(report + (" (trained by --do_train)" if cfg.do_train else " — these stay random without --do_train"))

    teacher = None
    if cfg.do_train and "self_distill" in recipes and cfg.teacher_name_or_path is not None:
        teacher = load_teacher(cfg.teacher_name_or_path, task)
        check_teacher_tokenizer(cfg, tok, teacher)
        check_model_fits(teacher, tok, cfg, "teacher")
        set_padding(teacher, tok)

    load = lambda split: load_features(task, cfg.data_dir, split, tok, cfg.model_name_or_path,  # noqa: E731
                                       cfg.max_seq_length, overwrite_cache=cfg.overwrite_cache, log=log,
                                       progress=progress)
    train_feats = load("train") if cfg.do_train else None
    dev_feats = {s: load(s) for s in task.dev_splits} if (cfg.do_eval or cfg.do_sweep) else {}
    log(f"{task.name}: {type(clf.model).__name__} from {cfg.model_name_or_path}, {num_layers} layers, exits after "
        f"layers {exit_layers}; recipes {', '.join(recipes) if cfg.do_train else '(none: no --do_train)'}; on {device}")

    if not (cfg.do_train or cfg.do_sweep):  # evaluation only: results into the output folder
        results = _evaluate(cfg, task, saved_exits, clf.model, dev_feats, device, pad_id, policy, progress, log)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out, results)
        return results

    with staged_folder(out) as staging:
        def on_log(record: dict) -> None:
            with open(staging / TRAIN_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        if cfg.do_train:
            models, training = _train(cfg, task, recipes, clf, exit_layers, teacher, train_feats, dev_feats, device,
                                      pad_id, progress, on_log, log)
        else:
            models, training = {saved_exits.settings.recipe or "saved": saved_exits}, {}
        results: dict[str, Any] = {"task_name": task.name, "model_name_or_path": str(cfg.model_name_or_path),
                                   "training": training}
        first = next(iter(models))
        if cfg.do_sweep:
            summary = _sweep(cfg, task, models, dev_feats[task.dev_splits[0]], device, pad_id, log)
            results["sweep"] = {k: summary[k] for k in ("full_score", "chosen", "each_exit")}
            write_atomic(staging / SWEEP_JSON, json.dumps(summary, indent=2) + "\n")
            write_atomic(staging / SWEEP_MD, S.markdown(summary))
            if S.plot(summary, staging / SWEEP_PNG):
                log(f"wrote {SWEEP_PNG}")
            chosen = summary["chosen"]
            if chosen is not None:
                first = chosen["recipe"]
                policy = ExitPolicy(chosen["policy"], chosen["threshold"], cfg.patience_tolerance)
        keep = models[first]
        keep.settings.recipe = first if first in R.RECIPES else keep.settings.recipe
        if policy is not None:
            keep.settings.policy, keep.settings.threshold = policy.name, policy.threshold
            keep.settings.tolerance = policy.tolerance
        if cfg.do_eval:
            results.update(_evaluate(cfg, task, keep, keep.model, dev_feats, device, pad_id, policy, progress, log))
            write_results(staging, results)
        else:
            write_atomic(staging / "eval_results.json", json.dumps(results, indent=2) + "\n")
        keep.save_pretrained(staging)
        with quiet_transformers():
            tok.save_pretrained(staging)
        saved = {**cfg.to_dict(), "saved_recipe": keep.settings.recipe, "policy": keep.settings.policy,
                 "threshold": keep.settings.threshold, "exit_layers": keep.settings.exit_layers,
                 "num_layers": num_layers, "device": str(device), "training": training,
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(staging / ARGS_FILE, json.dumps(saved, indent=2) + "\n")
    what = (f"{keep.settings.recipe} exits, policy {keep.settings.policy} {keep.settings.threshold:.4g}"
            if keep.settings.policy else f"{keep.settings.recipe} exits, no exit policy")
    log(f"saved the model with {what} to {out}")
    return results


# ---------------------------------------------------------------------------------------------
# Training


def _train(cfg, task, recipes, clf, exit_layers, teacher, train_feats: Features, dev_feats, device, pad_id,
           progress, on_log, log) -> tuple[dict, dict]:
    """Every recipe's model (stage-2 recipes share one backbone) and the stages' figures."""
    models: dict[str, EM.EarlyExitClassifier] = {}
    training: dict[str, Any] = {}
    stage2 = [r for r in recipes if r in R.STAGE2_RECIPES]
    joint_start = None
    if "joint" in recipes and not cfg.skip_first_stage and stage2:  # joint starts where stage 1 starts
        joint_start = {k: v.detach().clone() for k, v in clf.model.state_dict().items()}

    def logged(stage: str):
        return lambda record: on_log({"stage": stage, **record})

    if stage2:
        if cfg.skip_first_stage:
            log(f"stage 1 skipped: {cfg.model_name_or_path} is already fine-tuned on {task.name}")
        else:
            s1 = fine_tune(clf.model, train_feats, task, cfg, device, pad_id=pad_id, on_log=logged("first"),
                           progress=progress)
            training["first_stage"] = {**s1, "seconds_per_epoch": s1["seconds"] / max(s1["epochs"], 1e-9)}
            log(f"stage 1: {s1['steps']} steps ({s1['epochs']} epochs) in {s1['seconds']:.1f}s, last loss "
                f"{s1['loss']:.4f}")
            if cfg.eval_after_first_stage:
                first = evaluate_splits(clf.model, task, cfg, dev_feats, device, pad_id, progress, log)
                training["after_first_stage"] = {"score": first["score"], "metrics": first["metrics"]}
                log(f"after stage 1: {task.name} score {first['score']:.4f}")
        probe = EM.EarlyExitClassifier(clf.model, EM.ExitSettings(exit_layers=exit_layers, pooling=cfg.exit_pooling),
                                       init_from_pooler=False)
        t0 = time.perf_counter()
        states = R.layer_features(probe, train_feats, batch_size=cfg.per_device_eval_batch_size, device=device,
                             pad_id=pad_id, bf16=cfg.bf16, progress=progress)
        feat_s = time.perf_counter() - t0
        labels = torch.from_numpy(np.asarray(train_feats.labels))
        training["stage2_features_seconds"] = round(feat_s, 3)
        log(f"stage 2: backbone features of {len(states):,} examples ({tuple(states.shape[1:])} each) in {feat_s:.1f}s")
        targets = None
        if "self_distill" in stage2:
            if teacher is not None:
                targets = R.teacher_logits(teacher.model, train_feats, batch_size=cfg.per_device_eval_batch_size,
                                           device=device, pad_id=pad_id, bf16=cfg.bf16)
            else:
                targets = R.final_logits_from_states(probe, states)
        for recipe in stage2:
            seed_everything(cfg.seed)  # every recipe's exits start from the same weights
            ee = EM.new_exits(clf.model, exit_layers, pooling=cfg.exit_pooling)
            s2 = R.train_exits(ee, states, labels, cfg, device, recipe=recipe, regression=task.is_regression,
                               targets=targets, on_log=logged(recipe), progress=progress)
            per_epoch = feat_s + s2["seconds"] / max(s2["epochs"], 1e-9)  # as if the features were recomputed
            training[recipe] = {**s2, "seconds_per_epoch_with_features": round(per_epoch, 3)}
            log(f"stage 2 ({recipe}): {s2['steps']} steps ({s2['epochs']} epochs) in {s2['seconds']:.1f}s, "
                f"last loss {s2['loss']:.4f}; an epoch with its backbone pass: {per_epoch:.1f}s")
            models[recipe] = ee
    if "joint" in recipes:
        if stage2:  # a second copy of the model, from stage 1's starting weights
            seed_everything(cfg.seed)
            joint_clf = load_classifier(cfg.model_name_or_path, task)
            if joint_start is not None:
                joint_clf.model.load_state_dict(joint_start)
            joint_clf.model.config.pad_token_id = clf.model.config.pad_token_id
            model = joint_clf.model
        else:
            model = clf.model
        seed_everything(cfg.seed)
        ee = EM.new_exits(model, exit_layers, pooling=cfg.exit_pooling)
        sj = R.train_joint(ee, train_feats, task, cfg, device, pad_id=pad_id, on_log=logged("joint"),
                           progress=progress)
        training["joint"] = {**sj, "seconds_per_epoch": sj["seconds"] / max(sj["epochs"], 1e-9)}
        log(f"joint: {sj['steps']} steps ({sj['epochs']} epochs) in {sj['seconds']:.1f}s, last loss {sj['loss']:.4f}")
        models["joint"] = ee
    return {r: models[r] for r in recipes}, training


# ---------------------------------------------------------------------------------------------
# Evaluation and the sweep


def _evaluate(cfg, task, ee, model, dev_feats, device, pad_id, policy, progress, log) -> dict:
    """The final classifier's results, plus early-exit and per-exit scores when asked for."""
    results = evaluate_splits(model, task, cfg, dev_feats, device, pad_id, progress, log)
    if ee is None or not (cfg.eval_highway or cfg.eval_each_highway):
        return results
    highway = {}
    for split in task.dev_splits:
        feats = dev_feats[split]
        logits = S.all_exit_logits(ee, feats, batch_size=cfg.per_device_eval_batch_size, device=device,
                                   pad_id=pad_id, bf16=cfg.bf16)
        entry: dict[str, Any] = {}
        if cfg.eval_each_highway:
            entry["each_exit"] = S.each_exit_scores(task, logits, feats.labels, ee.exit_layers)
            log(f"{split}, each exit alone: " + ", ".join(f"layer {e['layer']} {e['score']:.2f}"
                                                          for e in entry["each_exit"]))
        if cfg.eval_highway:
            entry["early_exit"] = _real_early_exit(ee, task, feats, policy, cfg, device, pad_id)
            r = entry["early_exit"]
            log(f"{split}, early exit ({policy.label()}): score {r['score']:.2f}, mean exit layer "
                f"{r['mean_exit_layer']:.2f} of {ee.num_layers} ({r['layer_speedup']:.2f}x fewer layers)")
        highway[split] = entry
    results["highway"] = highway
    return results


def _real_early_exit(ee, task, feats: Features, policy, cfg, device, pad_id) -> dict:
    """Score and exit layers of real batched early-exit inference over a whole split."""
    ee.to(device).eval()
    outs = map_batches(lambda b: [t.cpu() for t in ee.infer(b["input_ids"], b["attention_mask"],
                                                              b.get("token_type_ids"), policy=policy)],
                       feats, batch_size=cfg.per_device_eval_batch_size, device=device, pad_id=pad_id, bf16=cfg.bf16)
    logits = torch.cat([lg.float() for lg, _ in outs])
    layers = torch.tensor(ee.exit_layers, dtype=torch.float64)[torch.cat([wh for _, wh in outs])]
    mean = float(layers.mean())
    return {"policy": policy.name, "threshold": policy.threshold, "score": S.score(task, logits, feats.labels),
            "mean_exit_layer": mean, "layer_speedup": ee.num_layers / mean,
            "exits": {str(layer): int((layers == layer).sum()) for layer in ee.exit_layers}}


def _sweep(cfg, task, models: dict, feats: Features, device, pad_id, log) -> dict:
    """Simulate every policy's grid on each recipe's exits, time chosen points, pick the fastest within tolerance.

    The drop is measured against one full model for all recipes: the stage-2 recipes' (the model a user
    would deploy without exits), or joint's own when it is the only recipe.
    """
    grid_rows, each_exit, to_time, fulls = [], {}, [], {}
    ref = next((r for r in models if r in R.STAGE2_RECIPES), next(iter(models)))
    logits_of = {r: S.all_exit_logits(ee, feats, batch_size=cfg.per_device_eval_batch_size, device=device,
                                      pad_id=pad_id, bf16=cfg.bf16) for r, ee in models.items()}
    full_score = S.score(task, logits_of[ref][:, -1], feats.labels)
    for recipe, ee in models.items():
        logits = logits_of[recipe]
        fulls[recipe], rows = S.simulate_grid(task, logits, feats.labels, ee.exit_layers,
                                              tolerance=cfg.patience_tolerance)
        for r in rows:
            r["recipe"] = recipe
            r["drop"] = full_score - r["score"]
        each_exit[recipe] = S.each_exit_scores(task, logits, feats.labels, ee.exit_layers)
        grid_rows += rows
        to_time += S.points_to_time(rows, cfg.max_metric_drop, cfg.timing_points)
        log(f"sweep ({recipe}): its full model {fulls[recipe]:.2f}; each exit alone: "
            + ", ".join(f"{e['score']:.1f}" for e in each_exit[recipe]))
    order = np.random.default_rng(cfg.seed).permutation(len(feats))  # dev files may be ordered by label
    timing = subset(_reorder(feats, order), cfg.timing_examples)
    sizes = cfg.batch_sizes()
    any_ee = models[ref]
    sets = S.timing_sets(timing, sizes, pad_id, device)
    timed = S.time_points(models, ref, to_time, sets, repeats=cfg.timing_repeats, device=device, bf16=cfg.bf16, log=log)
    chosen = S.choose(timed, cfg.max_metric_drop, sizes)
    if chosen is not None:
        pol = ExitPolicy(chosen["policy"], chosen["threshold"], cfg.patience_tolerance)
        real = _real_early_exit(models[chosen["recipe"]], task, feats, pol, cfg, device, pad_id)
        chosen["real_inference_score"] = real["score"]  # equals the simulated score: the same rule
        # The largest of many noisy timings is biased upwards: time the chosen point again, on its own
        # against the full model with more rounds, and report that.
        again = S.time_points(models, ref, [chosen], sets, repeats=max(5, 2 * cfg.timing_repeats), device=device,
                              bf16=cfg.bf16, log=lambda m: None)[0]
        chosen["confirmed"] = {f"speedup_b{b}": again[f"speedup_b{b}"] for b in sizes}
        chosen["confirmed"].update({f"spread_b{b}": again[f"spread_b{b}"] for b in sizes})
        log(f"chosen: {chosen['recipe']}, {pol.label()}: score {chosen['score']:.2f} (full {full_score:.2f}), "
            f"mean exit layer {chosen['mean_exit_layer']:.2f}, measured again: "
            + ", ".join(f"{again[f'speedup_b{b}']:.2f}x at batch {b}" for b in sizes))
    else:
        log(f"no timed point is within {cfg.max_metric_drop} points of the full model; no exit policy is saved")
    return {"task_name": task.name, "full_score": full_score, "reference_recipe": ref, "full_scores": fulls,
            "num_layers": any_ee.num_layers,
            "max_metric_drop": cfg.max_metric_drop, "timing_examples": len(timing),
            "timing_batch_sizes": sizes, "timing_repeats": cfg.timing_repeats, "device": str(device),
            "bf16": cfg.bf16, "torch_threads": torch.get_num_threads(), "each_exit": each_exit,
            "grid": grid_rows, "timed": timed, "chosen": chosen}


def _reorder(feats: Features, order: np.ndarray) -> Features:
    """``feats`` with its examples in ``order``."""
    starts, ends = feats.offsets[order], feats.offsets[order + 1]
    ids = np.concatenate([feats.input_ids[s:e] for s, e in zip(starts, ends)]) if len(order) else feats.input_ids[:0]
    types = None
    if feats.token_type_ids is not None:
        types = np.concatenate([feats.token_type_ids[s:e] for s, e in zip(starts, ends)])
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    return Features(input_ids=ids, offsets=offsets, labels=feats.labels[order], token_type_ids=types,
                    meta=feats.meta)
