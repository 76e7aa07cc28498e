"""A sequence classifier with exit heads on chosen layers, its batched early-exit inference, and its files.

The Hugging Face classifier is left as it is: the exits live beside it. Saved, a folder holds the
ordinary classifier (``model.safetensors``, ``config.json``), which plain ``transformers`` loads
with the same final logits, plus ``early_exit.safetensors`` (the heads) and an ``early_exit`` entry
in ``config.json`` (exit layers, head shape, policy, threshold, recipe) that
:func:`load_early_exit` reads back.

Inference (:meth:`EarlyExitClassifier.infer`) runs the encoder a layer at a time. After each exit
layer the rows whose exit is confident enough leave the batch with that exit's logits; the others
go on, so a batch costs what its slowest rows need, and batch size 1 is not required.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distill.early_exit.backbones import LayerRunner
from distill.early_exit.policies import ExitPolicy, subset
from distill.errors import UserError, note

HEADS_FILE = "early_exit.safetensors"
CONFIG_KEY = "early_exit"
HEAD_KIND = "pooler-dropout-linear"  # DeeBERT's highway: dense + tanh, dropout, linear
POOLINGS = ("cls", "mean")  # what an exit reads of its layer: the [CLS] vector (DeeBERT) or the masked mean


@dataclass
class ExitSettings:
    """What ``config.json``'s ``early_exit`` entry holds."""

    exit_layers: list[int]  # 1-based layers whose output feeds an exit head (the last keeps the model's own)
    head: str = HEAD_KIND
    pooling: str = "cls"
    dropout: float = 0.1
    policy: str | None = None
    threshold: float | None = None
    tolerance: float = 0.1
    recipe: str | None = None
    version: int = 1

    def exit_policy(self) -> ExitPolicy | None:
        if self.policy is None:
            return None
        return ExitPolicy(self.policy, float(self.threshold), self.tolerance)


class ExitHead(nn.Module):
    """dense + tanh on an exit layer's pooled vector, dropout, linear: (B, H) -> (B, C)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.dense(cls))))


def parse_exit_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """``"1,2,3"`` (1-based) -> sorted layers; None: every layer but the last."""
    if spec is None or spec == "":
        return list(range(1, num_layers))
    if isinstance(spec, str):
        try:
            layers = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(f"--exit_layers takes comma-separated layer numbers, got {spec!r}") from None
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 1 <= x < num_layers]
    if bad or not layers:
        raise UserError(f"--exit_layers must name layers from 1 to {num_layers - 1} (layer {num_layers} keeps the "
                        f"model's own classifier), got {spec!r}")
    if len(set(layers)) != len(layers):
        raise UserError(f"--exit_layers names a layer twice: {spec!r}")
    return sorted(layers)


class EarlyExitClassifier(nn.Module):
    """A Hugging Face sequence classifier plus exit heads; ``exit_logits`` trains, ``infer`` exits early."""

    def __init__(self, model: nn.Module, settings: ExitSettings, *, init_from_pooler: bool = True):
        super().__init__()
        self.model = model
        self.runner = LayerRunner(model)
        self.settings = settings
        parse_exit_layers(settings.exit_layers, self.num_layers)  # validates
        hidden, labels = model.config.hidden_size, model.config.num_labels
        self.heads = nn.ModuleList(ExitHead(hidden, labels, settings.dropout) for _ in settings.exit_layers)
        pooler = self.runner.pooler()
        if init_from_pooler and pooler is not None:
            for head in self.heads:
                head.dense.load_state_dict(pooler.dense.state_dict())

    @property
    def num_layers(self) -> int:
        return self.runner.num_layers

    @property
    def exit_layers(self) -> list[int]:
        """Layer (1-based) of each exit, the final classifier's last."""
        return [*self.settings.exit_layers, self.num_layers]

    @property
    def policy(self) -> ExitPolicy | None:
        return self.settings.exit_policy()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What an exit reads of a layer's (B, L, H) output: [CLS] (B, H), or the mean over attended tokens."""
        if self.settings.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.to(hidden.dtype)[:, :, None]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def _inputs(self, input_ids, attention_mask, token_type_ids):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.runner.family.token_types:
            kwargs["token_type_ids"] = token_type_ids
        return kwargs

    def layer_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, num_layers, H) from the encoder's own forward: after each exit layer what its exit reads
        (:meth:`pool`), after the last layer its [CLS] vector (the model's own classifier reads that)."""
        enc = self.runner.encoder
        out = enc(**self._inputs(input_ids, attention_mask, token_type_ids), output_hidden_states=True)
        hs = out.hidden_states[1:]
        exits = set(self.settings.exit_layers)
        states = [self.pool(h, attention_mask) if i + 1 in exits else h[:, 0] for i, h in enumerate(hs[:-1])]
        return torch.stack([*states, hs[-1][:, 0]], dim=1)

    def logits_from_states(self, states: torch.Tensor) -> torch.Tensor:
        """Every exit's logits and the final classifier's, (B, E + 1, C), from (B, num_layers, H)."""
        outs = [head(states[:, layer - 1]) for head, layer in zip(self.heads, self.settings.exit_layers)]
        outs.append(self.runner.final_logits(states[:, -1]))
        return torch.stack(outs, dim=1)

    def exit_logits(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """(B, E + 1, C): all exits on one full forward (training, and the sweep's single pass)."""
        return self.logits_from_states(self.layer_states(input_ids, attention_mask, token_type_ids))

    @torch.inference_mode()
    def infer(self, input_ids, attention_mask, token_type_ids=None, policy: ExitPolicy | None = None):
        """Early-exit inference on a padded batch: (B, C) logits and (B,) the exit index of each row.

        A row leaves after the first exit whose policy says stop; the rest of the batch goes on,
        trimmed to its longest remaining row. With no policy (or one that never stops) every row
        runs the whole model and gets the model's own logits.
        """
        policy = policy if policy is not None else self.policy
        run = self.runner
        n = input_ids.shape[0]
        out = None
        where = torch.full((n,), len(self.heads), dtype=torch.long, device=input_ids.device)
        rows = torch.arange(n, device=input_ids.device)
        hidden = run.embed(input_ids, token_type_ids)
        mask2d = attention_mask
        mask = run.mask(mask2d, hidden)
        state = policy.start(n, hidden.device) if policy is not None else {}
        head_at = {layer: i for i, layer in enumerate(self.settings.exit_layers)}
        for i in range(self.num_layers):
            hidden = run.layer(i, hidden, mask)
            e = head_at.get(i + 1)
            if e is None or policy is None:
                continue
            logits = self.heads[e](self.pool(hidden, mask2d))
            if out is None:
                out = logits.new_zeros((n, logits.shape[1]))
            stop, state = policy.decide(logits, state)
            if not bool(stop.any()):
                continue
            out[rows[stop]] = logits[stop]
            where[rows[stop]] = e
            keep = ~stop
            if not bool(keep.any()):
                return out, where
            rows, hidden, mask2d, state = rows[keep], hidden[keep], mask2d[keep], subset(state, keep)
            width = int(mask2d.any(0).nonzero().max()) + 1  # trim the padding columns no remaining row needs
            hidden, mask2d = hidden[:, :width], mask2d[:, :width]
            mask = run.mask(mask2d, hidden)
        final = run.final_logits(hidden[:, 0])
        if out is None:
            out = final.new_zeros((n, final.shape[1]))
        out[rows] = final.to(out.dtype)
        return out, where

    # ---- files ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "EarlyExitClassifier":
        """A saved early-exit folder: the classifier, its exits, policy and threshold (:func:`load_early_exit`)."""
        return load_early_exit(folder, **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """The classifier as transformers writes it (config.json with the ``early_exit`` entry) plus the heads."""
        from safetensors.torch import save_file

        from distill.hf import quiet_transformers

        folder = Path(folder)
        setattr(self.model.config, CONFIG_KEY, asdict(self.settings))
        with quiet_transformers():
            self.model.save_pretrained(folder)
        heads = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(heads, str(folder / HEADS_FILE), metadata={"format": "pt", CONFIG_KEY: json.dumps(asdict(
            self.settings))})


def has_exits(folder: str | Path) -> bool:
    folder = Path(folder)
    if not (folder / HEADS_FILE).is_file() or not (folder / "config.json").is_file():
        return False
    try:
        return CONFIG_KEY in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False


def attach_exits(model: nn.Module, folder: str | Path) -> EarlyExitClassifier:
    """The exits saved in ``folder`` on an already loaded classifier of that folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = getattr(model.config, CONFIG_KEY, None)
    if not has_exits(folder) or raw is None:
        raise UserError(f"{folder} has no exit heads ({HEADS_FILE} and an {CONFIG_KEY!r} entry in config.json); "
                        "train them with --do_train first")
    settings = ExitSettings(**raw)
    if settings.head != HEAD_KIND or settings.pooling not in POOLINGS:
        raise UserError(f"{folder} has exit heads of kind {settings.head!r} ({settings.pooling!r} pooling), which "
                        "this version cannot run")
    ee = EarlyExitClassifier(model, settings, init_from_pooler=False)
    state = load_file(str(folder / HEADS_FILE))
    missing, unexpected = ee.heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{folder / HEADS_FILE} does not match its config's exit layers "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return ee


def load_early_exit(folder: str | Path, **kwargs) -> EarlyExitClassifier:
    """``from_pretrained`` for a saved early-exit folder: the classifier, its exits, policy and threshold."""
    from transformers import AutoModelForSequenceClassification

    from distill.hf import quiet_transformers

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True, **kwargs)
    return attach_exits(model, folder)


def new_exits(model: nn.Module, exit_layers: str | list[int] | None, dropout: float | None = None,
              pooling: str = "cls") -> EarlyExitClassifier:
    """Fresh exit heads on ``model`` (the caller seeds); says in one line when there is no pooler to copy."""
    if pooling not in POOLINGS:
        raise UserError(f"--exit_pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    runner = LayerRunner(model)
    layers = parse_exit_layers(exit_layers, runner.num_layers)
    if dropout is None:
        dropout = float(getattr(model.config, "hidden_dropout_prob", getattr(model.config, "dropout", 0.1)) or 0.0)
    if runner.pooler() is None:
        note(f"{type(model).__name__} has no pooler to initialise the exits' dense layer from; "
             "the exits start with a new one")
    return EarlyExitClassifier(model, ExitSettings(exit_layers=layers, dropout=dropout, pooling=pooling))
