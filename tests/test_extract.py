"""Student initialisation from teacher layers (distill.extract and its command line), on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertForMaskedLM,
    BertModel,
    DistilBertForMaskedLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    RobertaForMaskedLM,
)

from distill.cli.extract import main
from distill.extract import default_layers, parse_layers, select_layers
from distill.errors import UserError
from tests.test_models import VOCAB, perturb, save_tiny, tiny_config

REPO = Path(__file__).resolve().parent.parent


def extract(teacher: Path, dump: Path, model_type: str, *extra: str) -> None:
    main(["--model_type", model_type, "--model_name", str(teacher), "--dump_checkpoint", str(dump), *extra])


def load_clean(dump: Path, objective: str):
    """Load the student with the Auto class and insist nothing was newly initialised."""
    auto_cls = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    model, info = auto_cls.from_pretrained(dump, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def input_ids(low: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(low, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def bert_teacher(tmp_path) -> tuple[Path, BertForMaskedLM]:
    model = perturb(BertForMaskedLM(tiny_config("bert")))
    return save_tiny(model, tmp_path / "bert", tokenizer=True), model


# ---------------------------------------------------------------------------------------------
# Layer selection


@pytest.mark.parametrize(
    "n_teacher, n_student, expected",
    [
        (12, None, [0, 2, 4, 7, 9, 11]),  # DistilBERT's choice
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (6, None, [0, 2, 5]),  # keeps the last layer; the tie at 2.5 goes down
        (6, 3, [0, 2, 5]),
        (4, None, [0, 3]),
        (3, None, [0, 2]),
        (8, 3, [0, 3, 7]),  # ties round down (3.5 -> 3), not to even
        (24, 12, [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]),
        (2, None, [0]),
        (5, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_default_layers(n_teacher, n_student, expected):
    assert default_layers(n_teacher, n_student) == expected


def test_default_layers_are_evenly_spaced_and_keep_both_ends():
    for n in range(2, 40):
        for k in range(2, n + 1):
            layers = default_layers(n, k)
            assert len(layers) == k and layers[0] == 0 and layers[-1] == n - 1
            assert all(b > a for a, b in zip(layers, layers[1:]))
            # every pick is within half a step of its exact evenly spaced position
            assert all(abs(idx - i * (n - 1) / (k - 1)) <= 0.5 for i, idx in enumerate(layers))


def test_explicit_layers_and_their_errors():
    assert select_layers("0, 3,5", None, 6) == [0, 3, 5]
    assert select_layers(None, 2, 6) == [0, 5]
    with pytest.raises(UserError, match="out of range"):
        parse_layers("0,6", 6)
    with pytest.raises(UserError, match="out of range"):
        parse_layers("-1", 6)
    with pytest.raises(UserError, match="comma-separated"):
        parse_layers("0;2", 6)
    with pytest.raises(UserError, match="strictly increasing"):
        parse_layers("2,1", 6)
    with pytest.raises(UserError, match="disagrees"):
        select_layers("0,1", 3, 6)
    with pytest.raises(UserError, match="between 1 and 6"):
        select_layers(None, 7, 6)


# ---------------------------------------------------------------------------------------------
# BERT -> DistilBERT


def test_bert_to_distilbert_all_layers_reproduces_logits(bert_teacher, tmp_path):
    teacher_dir, teacher = bert_teacher
    extract(teacher_dir, tmp_path / "student", "bert", "--layers", "0,1,2,3")
    student = load_clean(tmp_path / "student", "mlm")
    assert isinstance(student, DistilBertForMaskedLM)

    ids = input_ids()
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding must be handled the same way too
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            expected = teacher(ids, **kwargs).logits
            got = student(ids, **kwargs).logits
            keep = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)


def test_bert_to_distilbert_subset_copies_layer_weights(bert_teacher, tmp_path):
    teacher_dir, teacher = bert_teacher
    extract(teacher_dir, tmp_path / "student", "bert", "--layers", "1,3")
    student = load_clean(tmp_path / "student", "mlm")
    config = student.config
    assert (config.n_layers, config.dim, config.hidden_dim, config.n_heads) == (2, 32, 64, 4)
    assert (config.vocab_size, config.max_position_embeddings, config.activation) == (VOCAB, 64, "gelu")

    t, s = teacher.state_dict(), student.state_dict()
    pairs = {
        "attention.self.query.weight": "attention.q_lin.weight",
        "attention.self.value.bias": "attention.v_lin.bias",
        "attention.output.dense.weight": "attention.out_lin.weight",
        "attention.output.LayerNorm.weight": "sa_layer_norm.weight",
        "intermediate.dense.weight": "ffn.lin1.weight",
        "output.dense.bias": "ffn.lin2.bias",
        "output.LayerNorm.bias": "output_layer_norm.bias",
    }
    for new, old in enumerate([1, 3]):
        for bert_name, distil_name in pairs.items():
            assert torch.equal(s[f"distilbert.transformer.layer.{new}.{distil_name}"], t[f"bert.encoder.layer.{old}.{bert_name}"])
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])
    # tied head, and token type 0 folded into the positions
    assert student.vocab_projector.weight.data_ptr() == student.distilbert.embeddings.word_embeddings.weight.data_ptr()
    folded = t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(s["distilbert.embeddings.position_embeddings.weight"], folded)


def test_headless_bert_teacher_gets_random_student_head(tmp_path, capsys):
    teacher = perturb(BertModel(tiny_config("bert"), add_pooling_layer=False))
    teacher_dir = save_tiny(teacher, tmp_path / "bert")
    extract(teacher_dir, tmp_path / "student", "bert", "--layers", "0,1,2,3")
    out = capsys.readouterr().out
    assert sum("randomly initialised" in line for line in out.splitlines()) == 1
    student = load_clean(tmp_path / "student", "mlm")
    with torch.no_grad():
        ids = input_ids()
        torch.testing.assert_close(student.distilbert(ids).last_hidden_state, teacher(ids).last_hidden_state, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "student" / "extraction.json").read_text())["teacher"]["lm_head_initialized"] is True


# ---------------------------------------------------------------------------------------------
# Same family


SAME_FAMILY = [
    ("gpt2", GPT2LMHeadModel, "transformer.h"),
    ("llama", LlamaForCausalLM, "model.layers"),
    ("roberta", RobertaForMaskedLM, "roberta.encoder.layer"),
    ("bert", BertForMaskedLM, "bert.encoder.layer"),
]


@pytest.mark.parametrize("family, cls, prefix", SAME_FAMILY)
def test_same_family_all_layers_reproduces_logits(family, cls, prefix, tmp_path):
    teacher = perturb(cls(tiny_config(family)))
    teacher_dir = save_tiny(teacher, tmp_path / "teacher")
    extract(teacher_dir, tmp_path / "student", family, "--student_type", family, "--layers", "0,1,2,3")
    student = load_clean(tmp_path / "student", "mlm" if family in ("bert", "roberta") else "clm")
    assert type(student) is cls
    with torch.no_grad():
        ids = input_ids()
        assert torch.equal(student(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("family, cls, prefix", SAME_FAMILY)
def test_same_family_subset_renumbers_layers(family, cls, prefix, tmp_path):
    teacher = perturb(cls(tiny_config(family)))
    teacher_dir = save_tiny(teacher, tmp_path / "teacher")
    extract(teacher_dir, tmp_path / "student", family, "--student_type", family, "--num_layers", "2")
    student = load_clean(tmp_path / "student", "mlm" if family in ("bert", "roberta") else "clm")
    assert student.config.num_hidden_layers == 2
    if family == "gpt2":
        assert student.config.n_layer == 2
    # the default selection for 4 -> 2 is 0,3: layer 3 becomes layer 1, layers 1 and 2 go
    renamed = {}
    for key, value in teacher.state_dict().items():
        if key.startswith((f"{prefix}.1.", f"{prefix}.2.")):
            continue
        renamed[key.replace(f"{prefix}.3.", f"{prefix}.1.")] = value
    s = student.state_dict()
    assert set(s) == set(renamed)
    for key, value in s.items():
        assert torch.equal(value, renamed[key]), key
    record = json.loads((tmp_path / "student" / "extraction.json").read_text())
    assert record["layers"] == [0, 3] and record["student_type"] == family


def test_llama_layer_types_follow_the_selection(tmp_path):
    config = tiny_config("llama")
    teacher = perturb(LlamaForCausalLM(config))
    teacher_dir = save_tiny(teacher, tmp_path / "teacher")
    extract(teacher_dir, tmp_path / "student", "llama", "--layers", "1,2,3")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3
    if "layer_types" in saved:
        assert len(saved["layer_types"]) == 3
    load_clean(tmp_path / "student", "clm")


# ---------------------------------------------------------------------------------------------
# Output folder


def test_output_folder_contents(bert_teacher, tmp_path, capsys):
    teacher_dir, _ = bert_teacher
    dump = tmp_path / "student"
    extract(teacher_dir, dump, "bert")
    out = capsys.readouterr().out
    assert "kept layers 0,3" in out and "parameters" in out
    with safe_open(str(dump / "model.safetensors"), "pt") as f:
        assert any(k.startswith("distilbert.transformer.layer.1.") for k in f.keys())
    assert len(AutoTokenizer.from_pretrained(dump)) == VOCAB
    record = json.loads((dump / "extraction.json").read_text())
    assert record["teacher"]["path"] == str(teacher_dir.resolve())
    assert record["teacher"]["type"] == "bert" and record["student_type"] == "distilbert"
    assert record["layers"] == [0, 3]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder renamed away


def test_teacher_without_tokenizer_says_so(tmp_path, capsys):
    teacher_dir = save_tiny(GPT2LMHeadModel(tiny_config("gpt2")), tmp_path / "teacher")
    extract(teacher_dir, tmp_path / "student", "gpt2")
    assert "no tokenizer files" in capsys.readouterr().out
    assert not (tmp_path / "student" / "tokenizer_config.json").exists()


def test_refuses_non_empty_dump_without_force(bert_teacher, tmp_path):
    teacher_dir, _ = bert_teacher
    dump = tmp_path / "student"
    dump.mkdir()
    (dump / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        extract(teacher_dir, dump, "bert")
    assert exc.value.code == 2
    assert [p.name for p in dump.iterdir()] == ["keep.txt"]

    extract(teacher_dir, dump, "bert", "--force")
    assert not (dump / "keep.txt").exists() and (dump / "extraction.json").exists()


def test_empty_dump_folder_is_fine(bert_teacher, tmp_path):
    teacher_dir, _ = bert_teacher
    (tmp_path / "student").mkdir()
    extract(teacher_dir, tmp_path / "student", "bert")
    assert (tmp_path / "student" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_type", "bert", "--model_name", "{missing}"], "does not exist"),
        (["--model_type", "bert", "--model_name", "{bert}", "--layers", "0,4"], "out of range"),
        (["--model_type", "gpt2", "--model_name", "{gpt2}", "--student_type", "distilbert"], "cannot extract a distilbert student from a gpt2"),
        (["--model_type", "bert", "--model_name", "{bert}", "--student_type", "gpt2"], "cannot extract a gpt2 student"),
        (["--model_type", "t5", "--model_name", "{bert}"], "unknown model type"),
        (["--model_type", "bert", "--model_name", "{bert}", "--dump_checkpoint", "{bert}", "--force"], "teacher's folder"),
    ],
)
def test_bad_input_exits_2_without_output(args, message, bert_teacher, tmp_path, capsys):
    teacher_dir, _ = bert_teacher
    gpt2_dir = save_tiny(GPT2LMHeadModel(tiny_config("gpt2", layers=2)), tmp_path / "gpt2")
    names = {"missing": str(tmp_path / "missing"), "bert": str(teacher_dir), "gpt2": str(gpt2_dir)}
    argv = [a.format(**names) for a in args]
    if "--dump_checkpoint" not in argv:
        argv += ["--dump_checkpoint", str(tmp_path / "out" / "student")]
    before = sorted(p.name for p in teacher_dir.iterdir())
    capsys.readouterr()  # drop the fixtures' progress bars
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in teacher_dir.iterdir()) == before


def test_script_runs_main(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "extract.py"), "--model_type", "bert",
         "--model_name", str(tmp_path / "missing"), "--dump_checkpoint", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: model path") and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# GGUF teacher (runs only where the gguf and accelerate packages are installed)


def write_tiny_llama_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """Write ``model`` as an F32 llama GGUF file, the way llama.cpp's converter lays it out."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}

    def permute(w, n_head):  # llama.cpp reorders q/k rows for its rotary layout; transformers undoes it
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(c.vocab_size - 3)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([2, 3, 3] + [1] * (c.vocab_size - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf_name, gguf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{p}{hf_name}.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_teacher(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    teacher = perturb(LlamaForCausalLM(tiny_config("llama")))
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(teacher, gguf_path)
    extract(gguf_path, tmp_path / "student", "llama", "--layers", "0,1,2,3")
    student = load_clean(tmp_path / "student", "clm")
    with torch.no_grad():
        ids = input_ids()
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-5, rtol=0)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "student")) == VOCAB
    assert json.loads((tmp_path / "student" / "extraction.json").read_text())["teacher"]["path"] == str(gguf_path.resolve())
