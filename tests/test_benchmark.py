"""benchmarks/throughput.py runs end to end on a tiny shape and prints the documented JSON keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"

KEYS = {"precision", "real_tokens_per_s", "padded_tokens_per_s", "floor_ratio", "mfu", "peak_rss_mb", "split_ms",
        "matmul_gflops", "gflop_per_step", "step_ms", "cpu_ms_per_step"}
PHASES = {"data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "total"}


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bf16", [False, True])
def test_benchmark_runs_and_reports(throughput, bert_tok_dir, prose_file, tmp_path, capsys, bf16):
    argv = ["--preset", "tiny", "--corpus", str(prose_file), "--tokenizer", str(bert_tok_dir),
            "--work_dir", str(tmp_path), "--steps", "2", "--warmup", "1", "--split_steps", "1",
            "--batch_size", "2", "--seq_len", "32", "--pack_chars", "200", "--matmul_size", "64"]
    assert throughput.main(argv + (["--bf16"] if bf16 else [])) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert set(out["split_ms"]) == PHASES
    assert out["precision"] == ("bf16" if bf16 else "fp32")
    assert set(out["matmul_gflops"]) == ({"float32", "bfloat16"} if bf16 else {"float32"})
    assert out["real_tokens_per_s"] > 0 and out["padded_tokens_per_s"] >= out["real_tokens_per_s"]
    assert out["floor_ratio"] > 0 and out["peak_rss_mb"] > 0


def test_flop_count_by_hand(throughput):
    # One layer of width 4, FFN 8, on 2 sequences of 3 tokens, vocabulary 10.
    t = 2 * 3
    layer = 2 * t * 4 * 4 * 4 + 2 * t * 4 * 8 * 2 + 2 * 2 * 3 * 3 * 4 * 2
    assert throughput.encoder_flops(t, 2, 3, 1, 4, 8) == layer
    assert throughput.head_flops(t, t, 4, 10) == 2 * t * 4 * 4 + 2 * t * 4 * 10
    # the vocabulary projection only on the rows a loss covers
    assert throughput.head_flops(t, 2, 4, 10) == 2 * t * 4 * 4 + 2 * 2 * 4 * 10
    parts = throughput.step_flops("tiny", 10, 2, 3, teacher_rows=0, student_rows=t)
    assert parts["student_backward"] == 2 * parts["student_forward"]
    tiny = throughput.PRESETS["tiny"]
    assert parts["teacher_forward"] == throughput.encoder_flops(t, 2, 3, tiny["teacher_layers"], 32, 64)


def test_data_path_benchmark_reports_both_sizes(bert_tok_dir, prose_file, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("data_path", SCRIPT.with_name("data_path.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--corpus", str(prose_file), "--tokenizer", str(bert_tok_dir), "--work_dir", str(tmp_path),
            "--mults", "1", "3", "--workers", "1", "2", "--train_steps", "0"]
    assert module.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    binarized = [r for r in rows if r["stage"] == "binarize"]
    assert [(r["corpus_mult"], r["num_workers"]) for r in binarized] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    one = binarized[0]["tokens"]
    assert all(r["tokens"] == one * r["corpus_mult"] for r in binarized)  # the corpus really repeated
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 50 for r in binarized)
    summary = rows[-1]
    assert summary["stage"] == "summary" and summary["corpus_ratio"] == 3
    assert summary["x3_speedup_2_over_1_workers"] > 0


def test_matmul_peak_does_not_count_in_the_training_rss():
    # The CPU peak's operands (3 x 9 MiB at n = 1536) live in a child process: the benchmark's process, whose
    # peak RSS it reports for the training, does not grow. The same matmul in-process does (the check can fail).
    # Linux's high-water mark (VmHWM) is reset to the current RSS before each ("5" into /proc/self/clear_refs).
    code = f"""
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("throughput", {str(SCRIPT)!r})
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)
cpu = torch.device("cpu")

def growth(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = lambda key: int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key)))
    before = status("VmRSS:")
    out = fn()
    return out, (status("VmHWM:") - before) / 1024

child, child_growth = growth(lambda: tp.matmul_peaks(cpu, [torch.float32], 1536))
_, in_process_growth = growth(lambda: tp.matmul_peak(cpu, torch.float32, 1536))
print(json.dumps({{"child": child["float32"], "child_growth": child_growth, "in_process_growth": in_process_growth}}))
"""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["child"] > 1e9  # FLOP/s
    assert out["child_growth"] < 8, out
    assert out["in_process_growth"] > 20, out
