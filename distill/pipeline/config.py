"""What the pipeline does, and everything a user can get wrong checked before any stage runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import ArgumentParser, UserError


@dataclass(frozen=True)
class Budget:
    """How much of each stage runs: the full run, or the few-minute quick one."""

    corpus_lines: int | None  # lines of the corpus to binarize (None: all)
    distil_epochs: int
    distil_max_steps: int | None
    batch_size: int  # sequences per distillation step
    task_train: int | None  # a seeded sample of the task's training examples (None: all)
    task_dev: int | None
    finetune_epochs: float
    finetune_lr: tuple[float, float]  # teacher, students
    checkpoint_interval: int
    in_domain_epochs: int  # passes of the in-domain distillation over the task's training sentences
    in_domain_max_steps: int | None
    timing_examples: int  # dev sentences per timed pass
    timing_repeats: int  # interleaved timed passes per model


FULL = Budget(corpus_lines=None, distil_epochs=1, distil_max_steps=None, batch_size=32, task_train=None,
              task_dev=None, finetune_epochs=1.0, finetune_lr=(5e-5, 1e-4), checkpoint_interval=100,
              in_domain_epochs=1, in_domain_max_steps=None, timing_examples=256, timing_repeats=7)
# Quick: 38 fine-tuning steps need a higher learning rate to leave the majority class.
QUICK = Budget(corpus_lines=3000, distil_epochs=1, distil_max_steps=30, batch_size=16, task_train=1200,
               task_dev=300, finetune_epochs=1.0, finetune_lr=(1e-4, 3e-4), checkpoint_interval=10,
               in_domain_epochs=1, in_domain_max_steps=20, timing_examples=64, timing_repeats=3)

# General distillation for a teacher whose hidden states carry what it knows (a sentence encoder may
# have no MLM head): cosine and MSE to its hidden states lead; the student's own MLM head is a light
# auxiliary loss, weighted to weigh about as much as the two hidden-state losses (MLM ~6.7 nats x 0.01
# against cos ~0.06 + MSE ~0.04 at the end of the demo's full run). With DistilBERT's alpha_mlm 2 it
# outweighed them a hundredfold, and the student's sentence embeddings moved away from the teacher's
# (cosine 0.61 extracted -> 0.29 after). docs/demo.md has the figures.
RECIPE = ["--mlm", "--alpha_ce", "0", "--alpha_mlm", "0.01", "--alpha_cos", "1.0", "--alpha_hidden_mse", "1.0",
          "--temperature", "2.0", "--learning_rate", "3e-4", "--warmup_prop", "0.05", "--max_model_input_size",
          "128", "--gradient_accumulation_steps", "1", "--log_interval", "10"]

# Student type by teacher type: extraction builds these from the teacher's layers (distill.extract).
STUDENT_TYPES = {"bert": "distilbert", "distilbert": "distilbert", "roberta": "roberta"}

# The four rows of the comparison: (name, what it is, initial model, learns from the teacher's outputs?)
ROWS = (
    ("extracted_finetuned", "extracted, fine-tuned (no distillation: the route without this toolkit)", "init", False),
    ("extracted_task_distilled", "extracted, task-distilled", "init", True),
    ("distilled_finetuned", "generally distilled, fine-tuned", "distilled", False),
    ("distilled_task_distilled", "generally distilled, task-distilled (the toolkit's recipe)", "recipe", True),
)


@dataclass
class PipelineConfig:
    teacher: str  # a model folder with its tokenizer (a bare encoder: the pipeline fine-tunes it on the task)
    corpus: str  # a text file, one passage a line
    task_dir: str  # GLUE-format TSV files: train.tsv and dev.tsv
    output_dir: str
    task_name: str = "sst-2"
    student_layers: int = 3
    seeds: list[int] = field(default_factory=lambda: [42, 1, 2])
    quick: bool = False
    bf16: str = "auto"
    max_seq_length: int = 64
    # task distillation (the students' fine-tuning against the fine-tuned teacher's outputs)
    task_temperature: float = 2.0
    task_alpha_ce: float = 0.5
    # in-domain distillation: the generally distilled student matches the teacher's hidden states on
    # the task's own training sentences before its task distillation (on the demo's task, over seeds
    # 42/1/2: 83.35 ± 0.10 with the fine-tuned teacher's hidden states, 82.94 ± 0.39 without the stage;
    # docs/pipeline.md)
    in_domain: bool = True
    in_domain_teacher: str = "finetuned"  # "finetuned" or "general": whose hidden states it matches
    early_exit: bool = False  # exit heads on the fine-tuned teacher, thresholds swept and timed
    finetune_workers: int = 0  # fine-tuning runs side by side (0: two on a CPU of two cores or more, one on a GPU)
    # filled by validate()
    teacher_type: str = ""
    student_type: str = ""

    @property
    def budget(self) -> Budget:
        return QUICK if self.quick else FULL

    def validate(self) -> None:
        """One sentence and no stage run for anything wrong with the inputs or the settings."""
        from distill.glue.tasks import get_task, split_path
        from distill.hf import has_tokenizer

        task = get_task(self.task_name)
        self.task_name = task.name
        teacher = Path(self.teacher)
        if not teacher.is_dir():
            raise UserError(f"--teacher {teacher} is not a model folder")
        if not (teacher / "config.json").is_file():
            raise UserError(f"--teacher {teacher} has no config.json")
        if not has_tokenizer(teacher):
            raise UserError(f"--teacher {teacher} has no tokenizer files (vocab.txt or tokenizer.json); save the "
                            "teacher's tokenizer into its folder")
        model_type = json.loads((teacher / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in STUDENT_TYPES:
            raise UserError(f"--teacher {teacher} is a {model_type} model; the pipeline distils the encoders "
                            f"{', '.join(sorted(STUDENT_TYPES))}")
        self.teacher_type, self.student_type = model_type, STUDENT_TYPES[model_type]
        for split in ("train", *task.dev_splits):
            split_path(task, self.task_dir, split)
        corpus = Path(self.corpus)
        if not corpus.is_file():
            raise UserError(f"--corpus {corpus} does not exist or is not a file")
        if not self.seeds:
            raise UserError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds {','.join(map(str, self.seeds))} repeats a seed")
        if self.student_layers < 1:
            raise UserError(f"--student_layers must be at least 1, got {self.student_layers}")
        if not self.task_temperature > 0:
            raise UserError(f"--task_temperature must be positive, got {self.task_temperature}")
        if not 0 <= self.task_alpha_ce <= 1:
            raise UserError(f"--task_alpha_ce must be in [0, 1], got {self.task_alpha_ce}")
        if self.in_domain_teacher not in ("finetuned", "general"):
            raise UserError(f"--in_domain_teacher must be finetuned or general, got {self.in_domain_teacher}")
        if self.finetune_workers < 0:
            raise UserError(f"--finetune_workers must not be negative, got {self.finetune_workers}")
        if self.max_seq_length < 4:
            raise UserError(f"--max_seq_length {self.max_seq_length} leaves no room for text")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--output_dir {out} exists and is not a folder")
        self.check_corpus_fills_a_batch()

    def check_corpus_fills_a_batch(self) -> None:
        """At least one distillation batch of sequences long enough to be kept (the trainer drops
        those under 12 tokens), counted on the corpus's first lines with the teacher's tokenizer."""
        from transformers import AutoTokenizer

        need = self.budget.batch_size
        tok = AutoTokenizer.from_pretrained(self.teacher)
        kept, lines = 0, []
        with open(self.corpus, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if self.budget.corpus_lines is not None and i >= self.budget.corpus_lines:
                    break
                if line.strip():
                    lines.append(line.strip())
                if len(lines) == 256:
                    kept += sum(len(ids) >= 12 for ids in tok(lines)["input_ids"])
                    lines = []
                    if kept >= need:
                        return
        if lines:
            kept += sum(len(ids) >= 12 for ids in tok(lines)["input_ids"])
        if kept < need:
            raise UserError(f"--corpus {self.corpus} has {kept} passage(s) of at least 12 tokens, fewer than one "
                            f"distillation batch of {need}; give a larger corpus")


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None


def build_parser(prog: str = "distill-pipeline") -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=(
        "General distillation on a corpus, then fine-tuning on a task, compared row by row: the extracted "
        "student fine-tuned, task-distilled; the distilled student fine-tuned, task-distilled (the toolkit's "
        "recipe), each over several fine-tuning seeds, against the fine-tuned teacher. Finished stages are "
        "reused and an interrupted distillation resumes when the same command runs again."))
    d = PipelineConfig("", "", "", "")
    p.add_argument("--teacher", required=True, help="teacher model folder with its tokenizer (bert, distilbert or "
                                                    "roberta; a bare encoder is fine-tuned on the task here)")
    p.add_argument("--corpus", required=True, help="text file for general distillation, one passage a line")
    p.add_argument("--task_dir", required=True, help="folder of the task's GLUE-format train.tsv and dev.tsv")
    p.add_argument("--task_name", default=d.task_name, help=f"the GLUE task the files follow (default: {d.task_name})")
    p.add_argument("--output_dir", required=True, help="where every stage writes; a second run reuses it")
    p.add_argument("--student_layers", type=int, default=d.student_layers,
                   help=f"layers of the student extracted from the teacher (default: {d.student_layers})")
    p.add_argument("--seeds", default="42,1,2", help="fine-tuning seeds of every row (default: 42,1,2)")
    p.add_argument("--quick", action="store_true", help="the few-minute variant: slices of the corpus and task, "
                                                        "few steps")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on a GPU or a CPU with bf16 instructions)")
    p.add_argument("--max_seq_length", type=int, default=d.max_seq_length,
                   help=f"longest task input in tokens (default: {d.max_seq_length})")
    p.add_argument("--task_temperature", type=float, default=d.task_temperature,
                   help=f"temperature of task distillation (default: {d.task_temperature})")
    p.add_argument("--task_alpha_ce", type=float, default=d.task_alpha_ce,
                   help="weight of the teacher's soft targets in task distillation; the labels get 1 minus it "
                        f"(default: {d.task_alpha_ce})")
    p.add_argument("--in_domain", choices=["on", "off"], default="on" if d.in_domain else "off",
                   help="distil the generally distilled student on the task's training sentences (the teacher's "
                        f"hidden states) before its task distillation (default: {'on' if d.in_domain else 'off'})")
    p.add_argument("--in_domain_teacher", choices=["finetuned", "general"], default=d.in_domain_teacher,
                   help=f"whose hidden states the in-domain stage matches (default: {d.in_domain_teacher})")
    p.add_argument("--finetune_workers", type=int, default=0,
                   help="fine-tuning runs side by side, the cores split between them (default 0: two on a CPU "
                        "with two cores or more, one on a GPU)")
    p.add_argument("--early_exit", action="store_true", help="also train exit heads on the fine-tuned teacher and "
                                                             "sweep their thresholds")
    return p


def parse_config(argv: list[str] | None = None) -> PipelineConfig:
    """The settings from a command line, not yet checked (:meth:`PipelineConfig.validate`)."""
    a = build_parser().parse_args(argv)
    cfg = PipelineConfig(teacher=a.teacher, corpus=a.corpus, task_dir=a.task_dir, output_dir=a.output_dir,
                         task_name=a.task_name, student_layers=a.student_layers, seeds=parse_seeds(a.seeds),
                         quick=a.quick, bf16=a.bf16, max_seq_length=a.max_seq_length,
                         task_temperature=a.task_temperature, task_alpha_ce=a.task_alpha_ce,
                         in_domain=a.in_domain == "on", in_domain_teacher=a.in_domain_teacher,
                         early_exit=a.early_exit, finetune_workers=a.finetune_workers)
    return cfg  # run_pipeline validates it before any stage
