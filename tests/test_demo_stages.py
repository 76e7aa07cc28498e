"""The demos' shared stage runner (distill.demo.stages)."""

from __future__ import annotations

import json

from distill.demo.stages import Stages, restart_flags


def test_stages_time_every_stage_and_keep_the_runs_that_did_work(tmp_path, capsys):
    timings = tmp_path / "stage_seconds.json"
    stages = Stages(timings)
    assert stages.run("build", lambda x: (x + 1, True), 1) == 2
    assert stages.run("reuse", lambda: ("kept", False)) == "kept"
    out = capsys.readouterr().out
    assert "\n== build\n" in out and "\n== reuse\n" in out and out.count("s)\n") == 2
    assert list(stages.now) == ["build", "reuse"] and list(stages.done) == ["build"]
    assert json.loads(timings.read_text()) == {"build": stages.done["build"]}

    again = Stages(timings)  # a second run that reuses everything keeps the first run's times
    again.run("build", lambda: (None, False))
    assert again.done == stages.done and list(again.now) == ["build"]
    again.print_times()
    assert "done in" in capsys.readouterr().out

    no_file = Stages()  # without a file nothing is written
    no_file.run("build", lambda: (None, True))
    assert list(no_file.done) == ["build"] and no_file.elapsed() >= no_file.now["build"]


def test_restart_flags(tmp_path):
    assert restart_flags(tmp_path / "new") == []
    (tmp_path / "stopped").mkdir()
    assert restart_flags(tmp_path / "stopped") == ["--force"]
    (tmp_path / "stopped" / "checkpoints" / "step_00000010").mkdir(parents=True)
    assert restart_flags(tmp_path / "stopped") == ["--resume"]
