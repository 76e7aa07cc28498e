"""Setting up a distillation run from its config: the models, the data, every check between them,
the hidden-state alignment, the collator, and writing the student. ``distill/cli/train.py`` wires
these together; everything a user can get wrong is refused here, before the first step, with one
sentence.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill import losses as L
from distill import models as M
from distill.config import TrainConfig
from distill.data.binarize import vocab_fingerprint
from distill.data.collate import Collator, mlm_token_probs
from distill.data.counts import load_token_counts
from distill.data.dataset import LMSeqsDataset
from distill.distributed import launched_by_torchrun, transformer_layers
from distill.errors import UserError, note
from distill.fileio import publish_folder, temp_name, write_error
from distill.hf import has_tokenizer, quiet_transformers
from distill.teacher_cache.store import TOKENIZER_DIR, TeacherCache
from distill.testing.faults import kill_point


@dataclass
class Run:
    """Everything a run trains with, loaded and checked against each other."""

    dataset: LMSeqsDataset
    teacher: M.LoadedModel | None  # None when a teacher cache stands for it
    student: M.LoadedModel
    tokenizer: object | None  # the teacher's, saved with the student; None when its folder has none
    collator: Collator
    layer_map: list[tuple[int, int]] | None  # (student layer, teacher layer) for the hidden-state losses
    projection: torch.nn.Module | None  # learned student -> teacher width map, when the widths differ
    cache: TeacherCache | None = None  # --teacher_cache
    extra_teachers: list = field(default_factory=list)  # several --teacher_name: the ones after the first


def build_run(cfg: TrainConfig, world_size: int = 1) -> Run:
    """Load data, teacher and student, check that they fit together and the flags fit them."""
    if cfg.teacher_cache is not None:
        return build_cached_run(cfg, world_size)
    names = cfg.teacher_names()
    for flag, path in [("--teacher_name", n) for n in names] + [("--data_file", cfg.data_file)]:
        if not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist")
    dataset = LMSeqsDataset(cfg.data_file, max_model_input_size=cfg.max_model_input_size)
    teacher = load_teacher(cfg)
    student = build_student(cfg)
    tok = teacher_tokenizer(cfg)
    check_compatibility(cfg, teacher, student, dataset, tok)
    extra = [load_teacher(cfg, name) for name in names[1:]]
    for name, loaded in zip(names[1:], extra):
        check_extra_teacher(cfg, name, loaded, student, tok)
    check_terms(cfg, student, teacher)
    for loaded in (teacher, *extra):
        check_sizes(cfg, loaded, student, dataset, world_size)
    layer_map, projection = hidden_alignment(cfg, teacher.model, student.model)
    if cfg.fsdp:  # every model is sharded per transformer layer: its layers must be found
        for loaded in (student, teacher, *extra):
            transformer_layers(loaded.model)
    freeze(cfg, student.model)
    return Run(dataset, teacher, student, tok, build_collator(cfg, dataset), layer_map, projection,
               extra_teachers=extra)


def build_cached_run(cfg: TrainConfig, world_size: int) -> Run:
    """A run whose soft targets come from --teacher_cache: the teacher is never loaded. The config
    has refused what a cache cannot give (MLM, hidden-state and logit-MSE losses)."""
    if not Path(cfg.data_file).exists():
        raise UserError(f"--data_file {cfg.data_file} does not exist")
    cache = TeacherCache(cfg.teacher_cache)
    dataset = LMSeqsDataset(cfg.data_file, max_model_input_size=cfg.max_model_input_size)
    student = build_student(cfg)
    if student.objective != "clm":
        raise UserError(f"the {cfg.student_type} student is a masked LM; a teacher cache is for causal LM")
    vocab = int(student.model.config.vocab_size)
    if dataset.meta["vocab_size"] > vocab and dataset.max_token_id() >= vocab:
        raise UserError(f"{cfg.data_file} holds token id {dataset.max_token_id()}, beyond the student's {vocab} ids")
    cache.check(data_file=cfg.data_file, example_lengths=dataset.lengths,
                max_model_input_size=cfg.max_model_input_size, temperature=cfg.temperature, vocab_size=vocab,
                k=cfg.teacher_cache_k)
    forward_kl = cfg.divergence == "kl" or (cfg.divergence == "skew_kl" and not cfg.divergence_alpha > 0)
    if cache.tail_samples and not forward_kl:
        note(f"--divergence {cfg.divergence} uses the cache's top {cache.k} and tail bucket; its "
             f"{cache.tail_samples} tail samples serve forward KL only")
    check_terms(cfg, student, None)
    check_sizes(cfg, None, student, dataset, world_size)
    if cfg.fsdp:
        transformer_layers(student.model)
    freeze(cfg, student.model)
    tok = None
    if cache.meta.get("has_tokenizer"):
        with quiet_transformers(progress_bars=True):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cache.folder / TOKENIZER_DIR, local_files_only=True)
    return Run(dataset, None, student, tok, build_collator(cfg, dataset, cache), None, None, cache)


# -- flags ------------------------------------------------------------------------------------


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
    launched = launched_by_torchrun()
    if "local_rank" in given and cfg.local_rank != -1 and not launched:
        note("--local_rank is set by launchers; without WORLD_SIZE > 1 this run is a single process")
    if cfg.n_gpu > 1 and not launched:
        note(f"--n_gpu {cfg.n_gpu}: one process uses one GPU; launch one process per GPU with "
             f"'torchrun --nproc_per_node {cfg.n_gpu} train.py ...'")
    if not cfg.mlm and cfg.token_counts is not None:
        note("--token_counts has no effect without --mlm")
    if cfg.teacher_cache is not None:
        if cfg.teacher_name is not None:
            note(f"--teacher_name {cfg.teacher_name} is not loaded: the soft targets come from --teacher_cache")
        if cfg.alpha_ce == 0:
            note("--teacher_cache has no effect with --alpha_ce 0 (only the soft-target loss reads it)")


def use_gpu(cfg: TrainConfig, given: set[str]) -> bool:
    if cfg.n_gpu > 0 and torch.cuda.is_available():
        return True
    if cfg.fp16:
        raise UserError("--fp16 needs a GPU; on the CPU use --bf16")
    if "n_gpu" in given and cfg.n_gpu > 0:
        note("no GPU found: training on the CPU")
    return False


# -- models -----------------------------------------------------------------------------------


def load_teacher(cfg: TrainConfig, name: str | None = None) -> M.LoadedModel:
    """The teacher ``name`` (by default the first --teacher_name), in the run's teacher dtype."""
    name = name or cfg.teacher_names()[0]
    dtype = cfg.teacher_torch_dtype(cuda=cfg.n_gpu > 0 and torch.cuda.is_available())
    with quiet_transformers(progress_bars=True):  # newly initialised weights are detected and said in one line
        loaded = M.load_model(cfg.teacher_type, name, torch_dtype=dtype)
    loaded.model.to(dtype)  # a GGUF file is dequantised to float32 whatever dtype is asked for
    loaded.model.requires_grad_(False)  # no gradients, so no optimizer state either
    if loaded.lm_head_initialized and name == cfg.teacher_names()[0]:
        note(f"the teacher {name} has no LM head in its checkpoint: only the hidden-state losses "
             "(--alpha_cos, --alpha_hidden_mse) can use it")
    return loaded


def teacher_tokenizer(cfg: TrainConfig, name: str | None = None):
    """The tokenizer of teacher ``name`` (by default the first), or None when its folder holds none."""
    from transformers import AutoTokenizer

    name = Path(name or cfg.teacher_names()[0])
    if name.suffix != ".gguf" and not has_tokenizer(name):
        return None  # AutoTokenizer would return a tiny default instead of failing
    try:
        with quiet_transformers(progress_bars=True):
            if name.suffix == ".gguf":
                return AutoTokenizer.from_pretrained(name.parent, gguf_file=name.name, local_files_only=True)
            return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # no tokenizer files next to the teacher
        return None


def build_student(cfg: TrainConfig) -> M.LoadedModel:
    """The student from --student_pretrained_weights, or initialised at random from --student_config
    (drawing from the generators seeded at the start of the run)."""
    if cfg.student_pretrained_weights is not None:
        loaded = M.load_model(cfg.student_type, cfg.student_pretrained_weights)
        if cfg.student_config is not None:
            note("--student_config is ignored: the config comes with --student_pretrained_weights")
        return loaded
    try:
        model = M.build_model(cfg.student_type, cfg.student_config,
                              overrides={"initializer_range": cfg.initializer_range})
    except (ValueError, TypeError) as e:  # transformers' config validation
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--student_config {cfg.student_config} is not a valid {cfg.student_type} config: "
                        f"{first}") from None
    return M.LoadedModel(model=model, objective=M.model_objective(model))


def check_compatibility(cfg: TrainConfig, teacher: M.LoadedModel, student: M.LoadedModel, dataset: LMSeqsDataset,
                        tok) -> None:
    """Objectives, vocabularies, the data's tokenizer, the heads the losses need."""
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
    if (cfg.alpha_ce > 0 or cfg.alpha_mse > 0) and teacher.lm_head_initialized:
        which = "--alpha_ce" if cfg.alpha_ce > 0 else "--alpha_mse"
        raise UserError(f"{which} needs the teacher's LM head, but {cfg.teacher_names()[0]} has none (its head would "
                        "be random); set it to 0 and use --alpha_cos / --alpha_mlm")
    if cfg.mlm and dataset.meta["special_token_ids"].get("mask_token") is None:
        raise UserError(f"--mlm needs a mask token, and the tokenizer of {cfg.data_file} has none")
    if cfg.freeze_pos_embs and not M.has_position_embeddings(student.model):
        note("--freeze_pos_embs has no effect: the student has no position embeddings")
    if cfg.freeze_token_type_embds and not M.has_token_type_embeddings(student.model):
        note("--freeze_token_type_embds has no effect: the student has no token type embeddings")


def check_extra_teacher(cfg: TrainConfig, name: str, teacher: M.LoadedModel, student: M.LoadedModel,
                        first_tok) -> None:
    """A teacher after the first serves the soft-target losses only: it must share the student's
    vocabulary (the first teacher's tokenizer, when both have one) and have an LM head."""
    if cfg.alpha_ce == 0 and cfg.alpha_mse == 0:
        raise UserError(f"--teacher_name {name}: a second teacher serves only the soft-target losses, and --alpha_ce "
                        "and --alpha_mse are 0")
    if teacher.objective != student.objective:
        raise UserError(f"the teacher {name} is a {teacher.objective.upper()} model and the student a "
                        f"{student.objective.upper()} model; every teacher must be of the student's kind")
    t_vocab, s_vocab = teacher.model.config.vocab_size, student.model.config.vocab_size
    tok = teacher_tokenizer(cfg, name)
    if t_vocab != s_vocab or (tok is not None and first_tok is not None
                              and vocab_fingerprint(tok) != vocab_fingerprint(first_tok)):
        detail = f"{t_vocab} vs {s_vocab} ids" if t_vocab != s_vocab else "another tokenizer than the first teacher's"
        raise UserError(f"the teacher {name} does not share the student's vocabulary ({detail}); several teachers "
                        "must all use the student's tokenizer")
    if teacher.lm_head_initialized:
        raise UserError(f"the teacher {name} has no LM head in its checkpoint, and a second teacher serves only the "
                        "soft-target losses, which need one")


def check_terms(cfg: TrainConfig, student: M.LoadedModel, teacher: M.LoadedModel | None) -> None:
    """Every weighted loss term can run with these models (distill.losses.terms.check_needs)."""
    from distill.losses.terms import TERMS, check_needs

    for name, weight in cfg.loss_weights().items():
        if weight > 0 and (reason := check_needs(TERMS[name], student, teacher)) is not None:
            where = cfg.teacher_names()[0] if teacher is not None else cfg.teacher_cache
            raise UserError(f"--alpha_{name}: the {name} loss {reason} ({where})")


def check_sizes(cfg: TrainConfig, teacher: M.LoadedModel | None, student: M.LoadedModel, dataset: LMSeqsDataset,
                world_size: int) -> None:
    """The longest input fits both models' positions; the data fills at least one global batch."""
    for who, loaded in (("student", student), ("teacher", teacher)):
        if loaded is None:
            continue
        max_pos = M.max_positions(loaded.model.config)
        if max_pos is not None and cfg.max_model_input_size > max_pos:
            raise UserError(f"--max_model_input_size {cfg.max_model_input_size} exceeds the {who}'s "
                            f"{max_pos} positions")
    if len(dataset) < cfg.batch_size * world_size:
        raise UserError(f"{cfg.data_file} has {len(dataset)} examples, fewer than one batch of --batch_size "
                        f"{cfg.batch_size}" + (f" on each of {world_size} processes" if world_size > 1 else ""))


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
    """--freeze_pos_embs, --freeze_token_type_embds; and --gradient_checkpointing, set up here too."""
    if cfg.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise UserError(f"--gradient_checkpointing: {type(student).__name__} does not support gradient "
                            "checkpointing")
        # The non-reentrant implementation: it keeps the RNG state, so dropout draws the same masks when a
        # layer is recomputed, and it needs no input that requires grad. transformers 5 renamed
        # gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns).
        kwargs = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for name, p in student.named_parameters():
        if cfg.freeze_pos_embs and "position_embeddings" in name:
            p.requires_grad_(False)
        if cfg.freeze_token_type_embds and "token_type_embeddings" in name:
            p.requires_grad_(False)


# -- data -------------------------------------------------------------------------------------


def build_collator(cfg: TrainConfig, dataset: LMSeqsDataset, cache: TeacherCache | None = None) -> Collator:
    """Padding and labels: MLM masking (weighted by --token_counts) with --mlm, CLM labels without;
    with a teacher cache, each position's cached top-k too."""
    special = dataset.meta["special_token_ids"]
    pad_id = special.get("pad_token", special.get("eos_token", 0))
    has_mask = dataset.mask_bits is not None
    if cfg.loss_on == "completion" and not has_mask:
        raise UserError(f"--loss_on completion needs data with a completion mask, and {cfg.data_file} has none "
                        "(binarize 'messages' or 'prompt'/'completion' data with --dataset)")
    if not cfg.mlm:
        return Collator(pad_id, causal=True, seed=cfg.seed, cache=cache,
                        completion_only=has_mask and cfg.loss_on != "all")
    vocab = dataset.meta["vocab_size"]
    if cfg.token_counts is not None:
        counts = load_token_counts(cfg.token_counts, vocab)
    else:
        note("no --token_counts: MLM chooses tokens uniformly (mlm_smoothing has no effect)")
        counts = np.ones(vocab, dtype=np.int64)
    probs = mlm_token_probs(counts, cfg.mlm_smoothing, sorted(set(special.values())))
    return Collator(pad_id, mlm=True, mask_id=special["mask_token"], token_probs=probs,
                    mlm_mask_prop=cfg.mlm_mask_prop, word_mask=cfg.word_mask, word_keep=cfg.word_keep,
                    word_rand=cfg.word_rand, seed=cfg.seed)


# -- what the run leaves --------------------------------------------------------------------


def git_info() -> dict:
    try:
        import git

        repo = git.Repo(Path(__file__).resolve().parents[1], search_parent_directories=True)
        return {"repo_id": str(repo.working_dir), "repo_sha": repo.head.object.hexsha,
                "repo_branch": repo.active_branch.name if not repo.head.is_detached else None,
                "dirty": repo.is_dirty()}
    except Exception as e:  # not a checkout, git missing, detached or empty repository
        return {"repo_id": None, "note": f"not run from a git checkout ({type(e).__name__})"}


def write_student(student, tok, folder: Path, state_dict: dict | None = None) -> None:
    """The student (safetensors) and the tokenizer, so that from_pretrained(folder) loads them;
    ``state_dict``: its weights when the module holds only shards (--fsdp)."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with quiet_transformers():  # no one-shard "Writing model shards" bar
            student.save_pretrained(folder, state_dict=state_dict)
            if tok is not None:
                tok.save_pretrained(folder)
    except (OSError, RuntimeError) as e:  # a full disk or a file-size limit
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"could not write the student to {folder.parent} ({write_error(e, folder.parent)}); the "
                        "checkpoints are kept: free some space, then run the same command with --resume") from None


def save_student(student, tok, folder: Path, state_dict: dict | None = None) -> None:
    """Write the student into a temporary folder, then rename it to ``folder``."""
    tmp = temp_name(folder)
    write_student(student, tok, tmp, state_dict)
    publish_folder(tmp, folder)


def save_final_student(student, tok, dump: Path, state_dict: dict | None = None) -> None:
    """The student at the top of dump_path: written aside, then each file moved in by rename, the
    weights last, so that a folder with weights holds a whole student. A kill in between leaves the
    checkpoints, and --resume writes the student again."""
    tmp = dump / ".final.tmp"
    write_student(student, tok, tmp, state_dict)
    files = sorted(tmp.iterdir(), key=lambda p: p.suffix in (".safetensors", ".bin"))
    for i, p in enumerate(files):
        if i == len(files) // 2:
            kill_point("during_final_save")
        os.replace(p, dump / p.name)
    tmp.rmdir()
