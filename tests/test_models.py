"""Model registry and loading, on tiny models built from configs (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from distill import models
from distill.errors import UserError
from distill.models import (
    build_model,
    get_model_type,
    has_position_embeddings,
    has_token_type_embeddings,
    hidden_size,
    load_model,
    max_positions,
    model_objective,
    num_layers,
    set_num_layers,
)

VOCAB = 100


# ---------------------------------------------------------------------------------------------
# Tiny-model helpers (also used by test_extract.py)


def tiny_config(family: str, layers: int = 4):
    """A 32-wide, 4-head config of ``family`` with a 100-token vocabulary."""
    if family == "bert":
        return BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
        )
    if family == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so it needs two spare positions.
        return RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            type_vocab_size=1,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_inner=64, n_positions=64,
            bos_token_id=1, eos_token_id=2,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise ValueError(family)


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every weight so LayerNorm gains/biases are not 1/0 and a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def tiny_tokenizer() -> BertTokenizer:
    # transformers 5 ignores vocab_file=...; the vocabulary must be passed as a dict.
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def save_tiny(model: torch.nn.Module, folder: Path, tokenizer: bool = False) -> Path:
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize(
    "name, cls, objective",
    [
        ("bert", BertForMaskedLM, "mlm"),
        ("distilbert", DistilBertForMaskedLM, "mlm"),
        ("roberta", RobertaForMaskedLM, "mlm"),
        ("gpt2", GPT2LMHeadModel, "clm"),
        ("llama", LlamaForCausalLM, "clm"),
    ],
)
def test_registry_resolves_types(name, cls, objective):
    mtype = get_model_type(name)
    assert (mtype.name, mtype.model_cls, mtype.objective) == (name, cls, objective)
    assert mtype.config_cls().model_type == name


def test_unknown_type_is_a_user_error():
    with pytest.raises(UserError, match="unknown model type 'bart'"):
        get_model_type("bart")
    with pytest.raises(UserError):
        load_model("bart", "/nonexistent")


@pytest.mark.parametrize(
    "config, cls, objective",
    [
        ({"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4}, BertForMaskedLM, "mlm"),
        ({"model_type": "gpt2", "n_embd": 32, "n_head": 4}, GPT2LMHeadModel, "clm"),
        ({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4}, LlamaForCausalLM, "clm"),
    ],
)
def test_auto_picks_masked_or_causal_from_config(config, cls, objective):
    model = build_model("auto", {**config, "num_hidden_layers": 1, "vocab_size": VOCAB})
    assert type(model) is cls
    assert model_objective(model) == objective


def test_auto_bert_decoder_is_causal():
    model = build_model("auto", {"model_type": "bert", "is_decoder": True, "hidden_size": 32,
                                 "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": VOCAB})
    assert model_objective(model) == "clm"


def test_build_model_from_json_file_with_vocab_override(tmp_path):
    path = tmp_path / "student.json"
    path.write_text(json.dumps(tiny_config("gpt2", layers=2).to_dict()))
    model = build_model("gpt2", path, vocab_size=120)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.vocab_size == 120 and model.config.n_layer == 2
    assert model.get_input_embeddings().weight.shape == (120, 32)


def test_build_model_rejects_other_family_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="'gpt2' model, not 'bert'"):
        build_model("bert", tiny_config("gpt2").to_dict())
    with pytest.raises(UserError, match="does not exist"):
        build_model("bert", tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# Loading


def test_lm_head_initialized_for_headless_bert(tmp_path):
    save_tiny(BertModel(tiny_config("bert")), tmp_path)
    loaded = load_model("bert", tmp_path)
    assert isinstance(loaded.model, BertForMaskedLM)
    assert loaded.objective == "mlm"
    assert loaded.lm_head_initialized is True
    assert "cls.predictions.transform.dense.weight" in loaded.missing_keys
    # The decoder weight is tied to the word embeddings, so it is never reported missing.
    assert "cls.predictions.decoder.weight" not in loaded.missing_keys


def test_lm_head_present_for_masked_lm_checkpoint(tmp_path):
    save_tiny(BertForMaskedLM(tiny_config("bert")), tmp_path)
    loaded = load_model("bert", tmp_path)
    assert loaded.lm_head_initialized is False
    assert loaded.missing_keys == []


def test_headless_gpt2_keeps_its_tied_head(tmp_path):
    # GPT-2's lm_head is the token embedding, so a bare GPT2Model checkpoint has a real head.
    save_tiny(GPT2Model(tiny_config("gpt2")), tmp_path)
    loaded = load_model("gpt2", tmp_path)
    assert loaded.lm_head_initialized is False
    assert loaded.objective == "clm"


def test_headless_llama_has_untied_head_initialized(tmp_path):
    save_tiny(LlamaModel(tiny_config("llama")), tmp_path)
    loaded = load_model("llama", tmp_path)
    assert loaded.lm_head_initialized is True
    assert loaded.missing_keys == ["lm_head.weight"]


def test_auto_type_loads_the_right_class(tmp_path):
    save_tiny(GPT2LMHeadModel(tiny_config("gpt2")), tmp_path)
    loaded = load_model("auto", tmp_path)
    assert isinstance(loaded.model, GPT2LMHeadModel) and loaded.objective == "clm"


def test_load_model_dtype(tmp_path):
    save_tiny(GPT2LMHeadModel(tiny_config("gpt2")), tmp_path)
    loaded = load_model("gpt2", tmp_path, torch_dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model("bert", tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_model("bert", tmp_path)
    tiny_config("bert").save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no model weights"):
        load_model("bert", tmp_path)


def test_load_model_refuses_other_family(tmp_path):
    save_tiny(RobertaForMaskedLM(tiny_config("roberta")), tmp_path)
    with pytest.raises(UserError, match="holds a 'roberta' model, not 'bert'"):
        load_model("bert", tmp_path)


def test_gguf_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model("llama", tmp_path / "model.gguf")
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="causal"):
        load_model("bert", tmp_path / "model.gguf")


def test_gguf_file_goes_through_auto_causal_lm(tmp_path, monkeypatch):
    """A .gguf path loads as AutoModelForCausalLM(folder, gguf_file=name), locally only."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"")
    model = LlamaForCausalLM(tiny_config("llama", layers=2))
    calls = []

    def fake_from_pretrained(folder, **kwargs):
        calls.append((Path(folder), kwargs))
        return model, {"missing_keys": set()}

    monkeypatch.setattr(models, "_require_gguf_support", lambda: None)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    loaded = load_model("llama", gguf)
    folder, kwargs = calls[0]
    assert folder == tmp_path and kwargs["gguf_file"] == "tiny.gguf" and kwargs["local_files_only"] is True
    assert loaded.model is model and loaded.gguf_file == "tiny.gguf" and loaded.objective == "clm"
    with pytest.raises(UserError, match="holds a 'llama' model, not 'gpt2'"):
        load_model("gpt2", gguf)


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_config_helpers(family):
    config = tiny_config(family, layers=3)
    assert num_layers(config) == 3
    assert hidden_size(config) == 32
    assert max_positions(config) in (64, 66)
    set_num_layers(config, 2)
    assert num_layers(config) == 2


def test_config_helpers_distilbert_and_gpt2_names():
    config = DistilBertConfig(dim=48, n_layers=5, n_heads=4, max_position_embeddings=70)
    assert (num_layers(config), hidden_size(config), max_positions(config)) == (5, 48, 70)
    gpt2 = tiny_config("gpt2")
    set_num_layers(gpt2, 1)
    assert gpt2.n_layer == 1


def test_embedding_helpers():
    bert = BertForMaskedLM(tiny_config("bert", layers=1))
    gpt2 = GPT2LMHeadModel(tiny_config("gpt2", layers=1))
    llama = LlamaForCausalLM(tiny_config("llama", layers=1))
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_heads=4, n_layers=1))
    assert [has_position_embeddings(m) for m in (bert, gpt2, llama, distil)] == [True, True, False, True]
    assert [has_token_type_embeddings(m) for m in (bert, gpt2, llama, distil)] == [True, False, False, False]
    assert [model_objective(m) for m in (bert, gpt2, llama, distil)] == ["mlm", "clm", "clm", "mlm"]


def test_tiny_tokenizer_has_full_vocab(tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == VOCAB
