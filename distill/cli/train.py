"""Distil a teacher into a student: ``python train.py --student_type distilbert --teacher_type bert ...``

Everything a user can get wrong is checked before the first step and refused with one sentence.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill import checkpoint as C
from distill import distributed
from distill import losses as L
from distill import models as M
from distill.config import TrainConfig, parse_config
from distill.data.binarize import vocab_fingerprint
from distill.data.collate import Collator, mlm_token_probs
from distill.data.counts import load_token_counts
from distill.data.dataset import LMSeqsDataset
from distill.distiller import Distiller, TrainingDiverged, TrainingStopped, write_jsonl
from distill.errors import UserError, cli_entry
from distill.seeding import seed_everything
from distill.testing.faults import kill_point

logger = logging.getLogger("distill")


def note(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(f"note: {msg}", file=sys.stderr, flush=True)


def say(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, flush=True)


def warn_about_flags(cfg: TrainConfig, given: set[str]) -> None:
    """Flags accepted for compatibility that act differently here, or not at all in this set-up."""
    if "fp16_opt_level" in given:
        note("--fp16_opt_level is apex's; mixed precision here is torch.amp "
             "(--fp16: fp16 autocast with a gradient scaler, --bf16: bf16 autocast), the level is ignored")
    if "group_by_size" in given and cfg.group_by_size:
        note("length grouping is on by default (the original's --group_by_size turned it off); "
             "--no_group_by_size turns it off")
    if cfg.mlm and "alpha_clm" in given and cfg.alpha_clm > 0:
        note("--alpha_clm has no effect with --mlm (the student is trained with MLM)")
    if not cfg.mlm and "alpha_mlm" in given and cfg.alpha_mlm > 0:
        note("--alpha_mlm has no effect without --mlm (the student is trained with CLM)")
    launched = distributed.launched_by_torchrun()
    if "local_rank" in given and cfg.local_rank != -1 and not launched:
        note("--local_rank is set by launchers; without WORLD_SIZE > 1 this run is a single process")
    if cfg.n_gpu > 1 and not launched:
        note(f"--n_gpu {cfg.n_gpu}: one process uses one GPU; launch one process per GPU with "
             f"'torchrun --nproc_per_node {cfg.n_gpu} train.py ...'")
    if not cfg.mlm and cfg.token_counts is not None:
        note("--token_counts has no effect without --mlm")


def prepare_dump_path(cfg: TrainConfig) -> Path:
    dump = Path(cfg.dump_path)
    if dump.exists() and not dump.is_dir():
        raise UserError(f"--dump_path {dump} exists and is not a folder")
    if dump.exists() and any(dump.iterdir()):
        if not cfg.force:
            if C.list_checkpoints(dump):
                raise UserError(f"--dump_path {dump} holds checkpoints of a run: add --resume to continue it, "
                                "or --force to delete it and start over")
            raise UserError(f"--dump_path {dump} is not empty; pass --force to delete its contents and start over")
        # Never delete the inputs themselves.
        for name in ("data_file", "teacher_name", "student_pretrained_weights", "student_config", "token_counts",
                     "config"):
            value = getattr(cfg, name)
            if value and _is_within(Path(value), dump):
                raise UserError(f"--{name} {value} lies inside --dump_path {dump}; --force would delete it")
        shutil.rmtree(dump)
    dump.mkdir(parents=True, exist_ok=True)
    return dump


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def load_teacher(cfg: TrainConfig) -> M.LoadedModel:
    from transformers.utils import logging as hf_logging

    # transformers prints a table of newly initialised weights; we detect them and say it in one line.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        loaded = M.load_model(cfg.teacher_type, cfg.teacher_name)
    finally:
        hf_logging.set_verbosity(verbosity)
    if loaded.lm_head_initialized:
        note(f"the teacher {cfg.teacher_name} has no LM head in its checkpoint: only the hidden-state losses "
             "(--alpha_cos, --alpha_hidden_mse) can use it")
    return loaded


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def teacher_tokenizer(cfg: TrainConfig):
    """The teacher's tokenizer, or None when its folder holds none."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = Path(cfg.teacher_name)
    folder = name.parent if name.suffix == ".gguf" else name
    # AutoTokenizer does not fail on a folder without tokenizer files: it returns a tiny default.
    if name.suffix != ".gguf" and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if name.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(name.parent, gguf_file=name.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # no tokenizer files next to the teacher
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


def build_student(cfg: TrainConfig) -> M.LoadedModel:
    if cfg.student_pretrained_weights is not None:
        loaded = M.load_model(cfg.student_type, cfg.student_pretrained_weights)
        if cfg.student_config is not None:
            note("--student_config is ignored: the config comes with --student_pretrained_weights")
        return loaded
    try:  # the random initialisation draws from generators seeded at the start of the run
        model = M.build_model(cfg.student_type, cfg.student_config,
                              overrides={"initializer_range": cfg.initializer_range})
    except (ValueError, TypeError) as e:  # transformers' config validation
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--student_config {cfg.student_config} is not a valid {cfg.student_type} config: "
                        f"{first}") from None
    return M.LoadedModel(model=model, objective=M.model_objective(model))


def check_compatibility(cfg: TrainConfig, teacher: M.LoadedModel, student: M.LoadedModel, dataset: LMSeqsDataset,
                        tok) -> None:
    """Each refusal of the issue, before any training."""
    t_cfg, s_cfg = teacher.model.config, student.model.config
    if cfg.mlm and student.objective != "mlm":
        raise UserError(f"--mlm needs a masked LM student, but {cfg.student_type} is causal; drop --mlm to train "
                        "it with --alpha_clm")
    if not cfg.mlm and student.objective != "clm":
        raise UserError(f"the {cfg.student_type} student is a masked LM: pass --mlm (causal LM needs a causal model)")
    if teacher.objective != student.objective:
        raise UserError(f"the teacher is a {teacher.objective.upper()} model and the student a "
                        f"{student.objective.upper()} model; both must be masked or both causal")
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise UserError(f"teacher and student vocabularies differ ({t_cfg.vocab_size} vs {s_cfg.vocab_size} ids)")
    meta = dataset.meta
    if meta["vocab_size"] > s_cfg.vocab_size:
        top = dataset.max_token_id()
        if top >= s_cfg.vocab_size:
            raise UserError(f"{cfg.data_file} holds token id {top}, beyond the models' {s_cfg.vocab_size} ids")
    if tok is None:
        note("the teacher folder has no tokenizer, so the data's tokenizer cannot be checked against it")
    elif meta.get("vocab_fingerprint") != vocab_fingerprint(tok):
        raise UserError(f"{cfg.data_file} was binarized with another tokenizer ({meta.get('tokenizer_name')}) "
                        "than the teacher's; binarize it with --tokenizer_name set to the teacher")
    uses_teacher_logits = cfg.alpha_ce > 0 or cfg.alpha_mse > 0
    if uses_teacher_logits and teacher.lm_head_initialized:
        which = "--alpha_ce" if cfg.alpha_ce > 0 else "--alpha_mse"
        raise UserError(f"{which} needs the teacher's LM head, but {cfg.teacher_name} has none (its head would be "
                        "random); set it to 0 and use --alpha_cos / --alpha_mlm")
    if cfg.mlm and dataset.meta["special_token_ids"].get("mask_token") is None:
        raise UserError(f"--mlm needs a mask token, and the tokenizer of {cfg.data_file} has none")
    if cfg.freeze_pos_embs and not M.has_position_embeddings(student.model):
        note("--freeze_pos_embs has no effect: the student has no position embeddings")
    if cfg.freeze_token_type_embds and not M.has_token_type_embeddings(student.model):
        note("--freeze_token_type_embds has no effect: the student has no token type embeddings")


def hidden_alignment(cfg: TrainConfig, teacher, student):
    """Layer map and projection for the hidden-state losses (None when they are off)."""
    if cfg.alpha_cos == 0 and cfg.alpha_hidden_mse == 0:
        if cfg.layer_map is not None:
            note("--layer_map has no effect without --alpha_cos or --alpha_hidden_mse")
        return None, None
    n_s, n_t = M.num_layers(student.config), M.num_layers(teacher.config)
    if cfg.layer_map is None:
        layer_map = L.default_layer_map(n_s, n_t)
    else:
        try:
            layer_map = L.parse_layer_map(cfg.layer_map, n_student=n_s, n_teacher=n_t)
        except ValueError as e:
            raise UserError(f"--layer_map: {e}") from None
    h_s, h_t = M.hidden_size(student.config), M.hidden_size(teacher.config)
    if h_s != h_t and cfg.hidden_projection == "none":
        raise UserError(f"student and teacher hidden sizes differ ({h_s} vs {h_t}) and --hidden_projection is none; "
                        "use --hidden_projection auto for a learned projection")
    projection = L.HiddenProjection(h_s, h_t, len(layer_map)) if h_s != h_t else None
    return layer_map, projection


def freeze(cfg: TrainConfig, student) -> None:
    for name, p in student.named_parameters():
        if cfg.freeze_pos_embs and "position_embeddings" in name:
            p.requires_grad_(False)
        if cfg.freeze_token_type_embds and "token_type_embeddings" in name:
            p.requires_grad_(False)


def git_info() -> dict:
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parents[2], search_parent_directories=True)
        return {"repo_id": str(repo.working_dir), "repo_sha": repo.head.object.hexsha,
                "repo_branch": repo.active_branch.name if not repo.head.is_detached else None,
                "dirty": repo.is_dirty()}
    except Exception as e:  # not a checkout, git missing, detached or empty repository
        return {"repo_id": None, "note": f"not run from a git checkout ({type(e).__name__})"}


def write_student(student, tok, folder: Path) -> None:
    """The student (safetensors) and the tokenizer, so that from_pretrained(folder) loads them."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        student.save_pretrained(folder)
        if tok is not None:
            tok.save_pretrained(folder)
    except (OSError, RuntimeError) as e:  # a full disk or a file-size limit
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"could not write the student to {folder.parent} ({C.write_error(e, folder.parent)}); the checkpoints "
                        "are kept: free some space, then run the same command with --resume") from None


def save_student(student, tok, folder: Path) -> None:
    """Write the student into a temporary folder, then rename it to ``folder``."""
    tmp = folder.parent / f".{folder.name}.tmp"
    write_student(student, tok, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_final_student(student, tok, dump: Path) -> None:
    """The student at the top of dump_path: written aside, then each file moved in by rename, the
    weights last, so that a folder with weights holds a whole student. A kill in between leaves the
    checkpoints, and --resume writes the student again."""
    tmp = dump / ".final.tmp"
    write_student(student, tok, tmp)
    files = sorted(tmp.iterdir(), key=lambda p: p.suffix in (".safetensors", ".bin"))
    for i, p in enumerate(files):
        if i == len(files) // 2:
            kill_point("during_final_save")
        os.replace(p, dump / p.name)
    tmp.rmdir()


def use_gpu(cfg: TrainConfig, given: set[str]) -> bool:
    if cfg.n_gpu > 0 and torch.cuda.is_available():
        return True
    if cfg.fp16:
        raise UserError("--fp16 needs a GPU; on the CPU use --bf16")
    if "n_gpu" in given and cfg.n_gpu > 0:
        note("no GPU found: training on the CPU")
    return False


def on_main(env: distributed.DistEnv, fn, *args):
    """Run ``fn`` on the main process only; every rank gets its result, or raises its UserError."""
    result = error = None
    if env.is_main:
        try:
            result = fn(*args)
        except UserError as e:
            error = str(e)
    result, error = env.broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


@cli_entry
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg, given = parse_config(argv)
    cfg.validate()
    warn_about_flags(cfg, given)
    env = distributed.init(use_gpu(cfg, given))
    finished = False
    try:
        rc = _train(cfg, env)
        finished = True
        return rc
    finally:
        distributed.shutdown(env, finished=finished)


def _train(cfg: TrainConfig, env: distributed.DistEnv) -> int:
    device = env.device
    # The same on every rank: a student built from a config starts from the same weights everywhere.
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    for name in ("teacher_name", "data_file"):
        if not Path(getattr(cfg, name)).exists():
            raise UserError(f"--{name} {getattr(cfg, name)} does not exist")
    dataset = LMSeqsDataset(cfg.data_file, max_model_input_size=cfg.max_model_input_size)
    teacher = load_teacher(cfg)
    student = build_student(cfg)
    tok = teacher_tokenizer(cfg)
    check_compatibility(cfg, teacher, student, dataset, tok)
    for who, loaded in (("student", student), ("teacher", teacher)):
        max_pos = M.max_positions(loaded.model.config)
        if max_pos is not None and cfg.max_model_input_size > max_pos:
            raise UserError(f"--max_model_input_size {cfg.max_model_input_size} exceeds the {who}'s "
                            f"{max_pos} positions")
    if len(dataset) < cfg.batch_size * env.world_size:
        raise UserError(f"{cfg.data_file} has {len(dataset)} examples, fewer than one batch of --batch_size "
                        f"{cfg.batch_size}" + (f" on each of {env.world_size} processes" if env.enabled else ""))
    layer_map, projection = hidden_alignment(cfg, teacher.model, student.model)
    freeze(cfg, student.model)

    meta = dataset.meta
    special = meta["special_token_ids"]
    pad_id = special.get("pad_token", special.get("eos_token", 0))
    if cfg.mlm:
        if cfg.token_counts is not None:
            counts = load_token_counts(cfg.token_counts, meta["vocab_size"])
        else:
            note("no --token_counts: MLM chooses tokens uniformly (mlm_smoothing has no effect)")
            counts = np.ones(meta["vocab_size"], dtype=np.int64)
        probs = mlm_token_probs(counts, cfg.mlm_smoothing, sorted(set(special.values())))
        collator = Collator(pad_id, mlm=True, mask_id=special["mask_token"], token_probs=probs,
                            mlm_mask_prop=cfg.mlm_mask_prop, word_mask=cfg.word_mask, word_keep=cfg.word_keep,
                            word_rand=cfg.word_rand, seed=cfg.seed)
    else:
        collator = Collator(pad_id, causal=True, seed=cfg.seed)

    # Everything checked: only now is anything in dump_path touched, by the main process only.
    dump = Path(cfg.dump_path)
    state = None
    if cfg.resume is not None:
        if cfg.force:
            raise UserError("--resume and --force contradict each other (continue the run, or delete it)")
        if not dump.is_dir():
            raise UserError(f"--resume: --dump_path {dump} does not exist")

        loaded = {}

        def choose_checkpoint() -> str:
            loaded["state"], ck_meta, ck_folder = C.load_for_resume(dump, cfg.resume, note)
            check_resumable(cfg, ck_meta, env.world_size)
            return str(ck_folder)

        ck_folder = Path(on_main(env, choose_checkpoint))  # then every other rank reads that one
        state = loaded["state"] if env.is_main else C.read_checkpoint(ck_folder)[0]
    else:
        on_main(env, prepare_dump_path, cfg)
    if env.is_main:
        (dump / "parameters.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (dump / "git_log.json").write_text(json.dumps(git_info(), indent=2) + "\n")
    # Training's draws (dropout) start from a known state whatever loading drew, on every path (a student
    # built from a config or loaded from weights). They differ per rank; the student's initial weights
    # are rank 0's (DDP broadcasts them).
    seed_everything(cfg.seed, rank=env.rank)
    say(f"data: {dataset.stats.summary()}")
    say(f"teacher: {cfg.teacher_name} ({sum(p.numel() for p in teacher.model.parameters()):,} parameters); "
        f"student: {sum(p.numel() for p in student.model.parameters()):,} parameters; "
        f"losses: {', '.join(f'{k}={v}' for k, v in _alphas(cfg).items() if v > 0)}")

    from tensorboardX import SummaryWriter

    metrics_path = dump / "metrics.jsonl"
    distiller = Distiller(cfg, student.model, teacher.model, dataset, collator, device,
                          student_objective=student.objective, layer_map=layer_map, projection=projection,
                          dist=env)
    if state is not None:
        distiller.load_state_dict(state)
        del state
        if env.is_main:
            C.truncate_metrics(metrics_path, distiller.global_step)  # lines after the checkpoint are redone
        say(f"resumed from {ck_folder} at step {distiller.global_step} (epoch {distiller.epoch}, "
            f"batch {distiller.batches_in_epoch})")
    # purge_step drops TensorBoard events logged after the checkpoint by the interrupted run
    tb = SummaryWriter(logdir=str(dump / "tensorboard"),
                       purge_step=distiller.global_step + 1 if cfg.resume is not None else None) \
        if env.is_main else None

    def on_log(record: dict) -> None:
        write_jsonl(metrics_path, record)
        for k, v in record.items():
            if k not in ("step", "epoch", "time") and v is not None:
                tb.add_scalar(k if k.startswith("loss") else f"train/{k}", v, record["step"])
        tb.flush()

    run_meta = {"config": cfg.to_dict(), "data": C.data_identity(cfg.data_file),
                "teacher": C.teacher_identity(cfg.teacher_name), "world_size": env.world_size}

    def on_checkpoint(step: int) -> None:
        t0 = time.perf_counter()
        state = distiller.state_dict()  # every rank: it gathers their RNG states
        if env.is_main:
            folder = C.save_checkpoint(dump, step, state, {"step": step, "epoch": distiller.epoch, **run_meta},
                                       cfg.keep_checkpoints)
            size = sum(f.stat().st_size for f in folder.iterdir())
            logger.info("checkpoint %s: %.1f MB in %.2fs", folder.name, size / 1e6, time.perf_counter() - t0)
        env.barrier()

    distiller.on_log = on_log
    distiller.on_checkpoint = on_checkpoint
    previous = {sig: signal.signal(sig, lambda signum, frame: _request_stop(distiller, signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    where = f"{env.world_size} processes ({env.backend}, {device.type})" if env.enabled else str(device)
    say(f"training for {distiller.total_steps} optimizer steps of {cfg.gradient_accumulation_steps} x "
        f"{cfg.batch_size} sequences{' per process' if env.enabled else ''} on {where}")
    try:
        distiller.train()
    except TrainingDiverged:
        if env.is_main:
            save_student(student.model, tok, dump / "student_at_stop")
        raise
    except TrainingStopped as stop:
        say(f"stopped by {stop} at step {distiller.global_step}; checkpoint saved in {dump / C.CHECKPOINTS}. "
            f"Resume with the same command plus --resume")
        return 0
    finally:
        if tb is not None:
            tb.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if env.is_main:
        save_final_student(student.model, tok, dump)
        say(f"saved the student to {dump} (load it with from_pretrained)")
    env.barrier()
    return 0


def _request_stop(distiller: Distiller, signum: int) -> None:
    name = signal.Signals(signum).name
    if distiller.stop_requested is not None:  # a second signal: stop now
        raise KeyboardInterrupt
    distiller.stop_requested = name
    print(f"\n{name}: saving a checkpoint after this step, then stopping", file=sys.stderr, flush=True)


def check_resumable(cfg: TrainConfig, ck_meta: dict, world_size: int = 1) -> None:
    saved = ck_meta["config"]
    saved_world = ck_meta.get("world_size", 1)
    saved_global = saved["batch_size"] * saved_world
    if saved_global != cfg.batch_size * world_size:
        raise UserError(f"cannot resume: the global batch would change from {saved_world} x {saved['batch_size']} "
                        f"to {world_size} x {cfg.batch_size} sequences; keep --batch_size x processes at "
                        f"{saved_global}")
    if saved_world != world_size:
        note(f"resuming on {world_size} processes instead of {saved_world}: the same global batches, re-sharded "
             "(dropout's random draws differ from an uninterrupted run)")
        saved = dict(saved, batch_size=cfg.batch_size)
    harmless, bad = C.config_changes(saved, cfg.to_dict())
    if bad:
        raise UserError(f"cannot resume: the config differs from the checkpoint's in {'; '.join(bad)}")
    if C.data_identity(cfg.data_file) != ck_meta["data"]:
        raise UserError(f"cannot resume: {cfg.data_file} is not the data the checkpoint was trained on")
    if C.teacher_identity(cfg.teacher_name) != ck_meta["teacher"]:
        raise UserError(f"cannot resume: {cfg.teacher_name} is not the teacher the checkpoint was trained with")
    for change in harmless:
        note(f"resuming with a changed setting: {change}")


def _alphas(cfg: TrainConfig) -> dict[str, float]:
    return {"ce": cfg.alpha_ce, "mlm": cfg.alpha_mlm if cfg.mlm else 0.0, "clm": 0.0 if cfg.mlm else cfg.alpha_clm,
            "mse": cfg.alpha_mse, "cos": cfg.alpha_cos, "hidden_mse": cfg.alpha_hidden_mse}


if __name__ == "__main__":
    raise SystemExit(main())
