"""The student's attention under bf16 on the CPU (distill.attention): the fp32 attention is Hugging Face's SDPA
with fp32 inputs, the choice is pinned or measured once per machine and read back, the Distiller applies
it to SDPA students only, and a saved student does not carry it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from distill import attention


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_BLOCKING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(attention.ENV, raising=False)
    monkeypatch.setattr(attention, "fast_16bit", lambda: True)
    return tmp_path / "cache"


def tiny_models():
    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "bert": BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
    }


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_fp32_attention_runs_sdpa_in_fp32_under_bf16_autocast(kind, monkeypatch):
    model = tiny_models()[kind].train()
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: a mask tensor reaches SDPA
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def run():
        seen.clear()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits.float().sum().backward()
        return logits.detach().float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out_bf16, grads_bf16 = run()
    assert seen and all(s[3] for s in seen)  # plain sdpa: autocast casts its inputs down inside the op
    attention.register()
    model.set_attn_implementation(attention.FP32_SDPA)
    out_fp32, grads_fp32 = run()
    assert len(seen) == 2 and all(s == (torch.float32, torch.float32, torch.float32, False) for s in seen)
    # Same model, same result up to bf16 rounding, and gradients reach every weight that had one.
    torch.testing.assert_close(out_fp32, out_bf16, rtol=0.05, atol=0.05)
    assert len(grads_fp32) == len(grads_bf16) and all(torch.isfinite(g).all() for g in grads_fp32)
    # Outside autocast it is exactly Hugging Face's SDPA attention.
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_pinned_by_the_environment(cache_dir, monkeypatch):
    monkeypatch.setenv(attention.ENV, "fp32")
    assert attention.cpu_attention_choice(4, 8, 64) == attention.Choice(True, "env")
    monkeypatch.setenv(attention.ENV, "bf16")
    assert attention.cpu_attention_choice(4, 8, 64) == attention.Choice(False, "env")
    monkeypatch.setenv(attention.ENV, "fast")
    with pytest.raises(ValueError, match="DISTILL_CPU_ATTENTION must be 'fp32' or 'bf16'"):
        attention.cpu_attention_choice(4, 8, 64)
    assert not cache_dir.exists()  # nothing measured, nothing written


def test_measured_once_then_read_from_the_file(cache_dir, monkeypatch):
    rng = torch.get_rng_state()
    first = attention.cpu_attention_choice(4, 8, 64)
    assert torch.equal(torch.get_rng_state(), rng)  # the measurement draws nothing from the global generator
    assert first.source == "measured"
    data = json.loads((cache_dir / "attention.json").read_text())
    (key, entry), = data.items()
    assert "heads4 dim8 L64" in key and entry["fp32"] is first.fp32
    assert entry["timings"]["bf16"] > 0 and entry["timings"]["fp32"] > 0
    assert entry["fp32"] == (entry["timings"]["fp32"] < (1 - attention.MIN_GAIN) * entry["timings"]["bf16"])
    # A later process reads the file, whatever it holds: every process of a run and every later run agree.
    entry["fp32"] = not first.fp32
    (cache_dir / "attention.json").write_text(json.dumps(data))
    monkeypatch.setattr(attention, "measure", lambda *a: pytest.fail("measured again"))
    assert attention.cpu_attention_choice(4, 8, 64) == attention.Choice(not first.fp32, "file")


def test_no_measurement_without_bf16_instructions_or_a_writable_folder(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(attention, "fast_16bit", lambda: False)  # emulated bf16: the default, unmeasured
    assert attention.cpu_attention_choice(4, 8, 64) == attention.Choice(False, "default")
    assert not cache_dir.exists()
    monkeypatch.setattr(attention, "fast_16bit", lambda: True)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("DISTILL_BLOCKING_CACHE", str(tmp_path / "file" / "cache"))
    assert attention.cpu_attention_choice(4, 8, 64) == attention.Choice(False, "default")


def test_only_sdpa_models_are_switched(monkeypatch):
    monkeypatch.setenv(attention.ENV, "fp32")
    models = tiny_models()
    assert attention.use_fp32_attention(models["llama"], 64) == attention.Choice(True, "env")
    assert models["llama"].config._attn_implementation == attention.FP32_SDPA
    models["gpt2"].set_attn_implementation("eager")  # as a loss that reads attention weights asks
    assert attention.use_fp32_attention(models["gpt2"], 64) is None
    assert models["gpt2"].config._attn_implementation == "eager"
    monkeypatch.setenv(attention.ENV, "bf16")
    assert attention.use_fp32_attention(models["bert"], 64) == attention.Choice(False, "env")
    assert models["bert"].config._attn_implementation == "sdpa"


def test_a_saved_student_loads_with_the_default_attention(tmp_path, monkeypatch):
    monkeypatch.setenv(attention.ENV, "fp32")
    model = tiny_models()["llama"]
    attention.use_fp32_attention(model, 64)
    model.save_pretrained(tmp_path / "s")
    assert attention.FP32_SDPA not in (tmp_path / "s" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config._attn_implementation == "sdpa"


def test_a_model_that_cannot_switch_is_reported_as_unswitched(monkeypatch):
    monkeypatch.setenv(attention.ENV, "fp32")

    class Stuck(torch.nn.Module):  # transformers only warns when a model class cannot switch
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(hidden_size=32, num_attention_heads=4)
            self.config._attn_implementation = "sdpa"

        def set_attn_implementation(self, name):
            pass

    assert attention.use_fp32_attention(Stuck(), 64) is None
