"""The nine GLUE tasks: what each predicts and how its TSV files are laid out.

Column positions are those of the files distributed by the GLUE benchmark (the layout the
original ``run_glue.py`` processors read). The files hold quote characters that are part of the
text (MRPC: ``" the witness "``), so they are split on tabs with no CSV quoting at all.

    examples = read_split("sst-2", "glue_data/SST-2", "train")   # list[Example]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distill.errors import UserError


@dataclass(frozen=True)
class Example:
    """One sentence or sentence pair with its label (a class name, or a float for STS-B)."""

    guid: str
    text_a: str
    text_b: str | None
    label: str | float


@dataclass(frozen=True)
class Task:
    """One GLUE task.

    ``labels`` are the class names as written in the files, in the order of the model's outputs
    (the original processors' order); empty for the regression task. ``dev_splits`` names the
    evaluation files (MNLI has a matched and a mismatched one). ``columns`` are the positions of
    (sentence a, sentence b or None, label) in a line; -1 is the last column.
    """

    name: str
    labels: tuple[str, ...]
    has_header: bool
    columns: tuple[int, int | None, int]
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    skip_malformed: bool = False  # QQP's train file has a few lines with missing fields

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def folder_name(self) -> str:
        """The folder the GLUE download script puts this task's files in."""
        return _FOLDERS[self.name]


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # CoLA: no header; source, label, the author's acceptability note, sentence.
        Task("cola", ("0", "1"), False, (3, None, 1), ("matthews_corrcoef",)),
        # SST-2: "sentence\tlabel".
        Task("sst-2", ("0", "1"), True, (0, None, 1), ("accuracy",)),
        # MRPC: "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String".
        Task("mrpc", ("0", "1"), True, (3, 4, 0), ("f1", "accuracy")),
        # STS-B: index genre filename year old_index source1 source2 sentence1 sentence2 score.
        Task("sts-b", (), True, (7, 8, -1), ("pearson", "spearman")),
        # QQP: "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate".
        Task("qqp", ("0", "1"), True, (3, 4, 5), ("f1", "accuracy"), skip_malformed=True),
        # MNLI: index promptID pairID genre 4 parse columns sentence1 sentence2 [label1..label5] gold_label.
        Task("mnli", ("contradiction", "entailment", "neutral"), True, (8, 9, -1), ("accuracy",),
             dev_splits=("dev_matched", "dev_mismatched")),
        # QNLI: "index\tquestion\tsentence\tlabel"; RTE and WNLI: "index\tsentence1\tsentence2\tlabel".
        Task("qnli", ("entailment", "not_entailment"), True, (1, 2, -1), ("accuracy",)),
        Task("rte", ("entailment", "not_entailment"), True, (1, 2, -1), ("accuracy",)),
        Task("wnli", ("0", "1"), True, (1, 2, -1), ("accuracy",)),
    )
}

_FOLDERS = {"cola": "CoLA", "sst-2": "SST-2", "mrpc": "MRPC", "sts-b": "STS-B", "qqp": "QQP", "mnli": "MNLI",
            "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
# Spellings people use for the same task (the HF datasets names drop the hyphen).
_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "mnli-mm": "mnli"}


def get_task(name: str) -> Task:
    """The task called ``name`` (case-insensitive; "sst2", "stsb" accepted); a UserError otherwise."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise UserError(f"unknown GLUE task {name!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[key]


def split_path(task: Task, data_dir: str | Path, split: str) -> Path:
    """``data_dir/<split>.tsv``; a UserError naming the missing file if it is not there."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} does not exist or is not a folder")
    path = data_dir / f"{split}.tsv"
    if not path.is_file():
        hint = f" (the GLUE {task.folder_name} files: train.tsv, {', '.join(s + '.tsv' for s in task.dev_splits)})"
        raise UserError(f"{path} does not exist{hint}")
    return path


def read_tsv_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of each non-empty line; no quoting (quotes are text)."""
    # utf-8-sig: MRPC's files start with a byte-order mark in some copies.
    text = path.read_text(encoding="utf-8-sig")
    lines = (line.rstrip("\r") for line in text.split("\n"))
    return [(n, line.split("\t")) for n, line in enumerate(lines, start=1) if line]


def parse_lines(task: Task, rows: list[tuple[int, list[str]]], source: str, split: str,
                on_skip: Callable[[str], None] | None = None) -> list[Example]:
    """Examples from the split lines of one file of ``task`` (header included if the task has one)."""
    ia, ib, il = task.columns
    need = max(ia, ib or 0, il if il >= 0 else 0) + 1
    start = 1 if task.has_header else 0
    out: list[Example] = []
    skipped = 0
    for n, row in rows[start:]:
        if len(row) < need:
            if task.skip_malformed:
                skipped += 1
                continue
            raise UserError(f"{source} line {n} has {len(row)} tab-separated fields; a {task.name} file has at "
                            f"least {need} (is this the right --task_name?)")
        raw = row[il].strip()
        if task.is_regression:
            try:
                label: str | float = float(raw)
            except ValueError:
                raise UserError(f"{source} line {n}: the score {raw!r} is not a number") from None
        else:
            if raw not in task.labels:
                if task.skip_malformed:
                    skipped += 1
                    continue
                raise UserError(f"{source} line {n}: label {raw!r} is not one of {task.name}'s labels "
                                f"({', '.join(task.labels)}); is this the right --task_name?")
            label = raw
        out.append(Example(f"{split}-{n}", row[ia], row[ib] if ib is not None else None, label))
    if skipped and on_skip is not None:
        on_skip(f"{source}: skipped {skipped} malformed line(s)")
    return out


def read_split(task: Task | str, data_dir: str | Path, split: str,
               on_skip: Callable[[str], None] | None = None) -> list[Example]:
    """The labelled examples of ``data_dir/<split>.tsv``; refuses a missing, empty or mis-shaped file."""
    task = get_task(task) if isinstance(task, str) else task
    path = split_path(task, data_dir, split)
    rows = read_tsv_lines(path)
    examples = parse_lines(task, rows, str(path), split, on_skip)
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples
