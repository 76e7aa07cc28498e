"""The fault matrix: kill, signal, damage and starve real train.py runs, then resume them.

    python benchmarks/faults.py                # 12 random SIGKILL points and every other fault
    python benchmarks/faults.py --quick        # one trial of each kind (what the marked test runs)

Every trial trains on the README's path (a student extracted with scripts/extract.py, loaded with
--student_pretrained_weights, dropout on, 2 micro-batches a step) on a tiny world built offline
(distill/testing/tiny.py), through ``train.py`` in a subprocess, and compares the outcome with an
uninterrupted run of the same flags:

- **resumed exactly**: the same command plus ``--resume`` finished, and its student and
  metrics.jsonl (timing fields aside) are bit for bit those of the uninterrupted run;
- **refused with a sentence**: the command ended with exit 2 and one ``error:`` line, no traceback;
- **continued**: the run itself carried on past the fault (a NaN step skipped on every rank);
- **user data lost**: a file of the user's (teacher, data, token counts, extracted student) changed
  or vanished, or a checkpoint that fails its checksum is left where ``--resume`` would look;
- **other**: anything else (a traceback, a resumed run that differs): each is a bug.

Faults: SIGKILL at random points (after a step, inside a checkpoint write, between a checkpoint
and its ``latest`` pointer, inside a metrics.jsonl append, inside the final save); SIGTERM and
SIGINT; a truncated, a corrupt and a checksum-failing latest checkpoint, every checkpoint corrupt,
a missing ``latest`` pointer; a full disk during a checkpoint write, simulated with a file-size
limit (RLIMIT_FSIZE, which works unprivileged: writes past it fail with EFBIG, as they would with
ENOSPC); a NaN loss on one rank of two under torchrun (gloo).

Prints a Markdown table, one row per fault, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from distill.testing import tiny  # noqa: E402

MAX_STEPS, INTERVAL = 10, 4  # checkpoints at 4 and 8
OUTCOMES = ("resumed exactly", "refused with a sentence", "continued", "other")


def run_train(argv: list[str], *, fault: str = "", nproc: int = 1, fsize: int | None = None,
              nan_at: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTILL_FAULT=fault, DISTILL_NAN_AT=nan_at, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *argv]

    def limit():  # in the child only: a file-size limit, as a full disk would stop a write
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          preexec_fn=limit if fsize is not None else None)


def one_sentence(r: subprocess.CompletedProcess, torchrun: bool = False) -> bool:
    """Exit 2 with one ``error:`` line and no traceback. Under torchrun every rank says the same
    sentence, and the launcher, whose worker failed, exits 1 after a report of its own (with the
    launcher's own ChildFailedError traceback, which no flag of ours turns off)."""
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    code_ok = r.returncode != 0 if torchrun else r.returncode == 2
    allowed = 1 if torchrun and "ChildFailedError" in r.stderr else 0
    return code_ok and len(set(errors)) == 1 and r.stderr.count("Traceback (most recent call last)") <= allowed


def student_and_metrics(dump: Path):
    from safetensors.torch import load_file

    weights = load_file(dump / "model.safetensors")
    lines = [{k: v for k, v in json.loads(ln).items() if k not in ("time", "tokens_per_s")}
             for ln in (dump / "metrics.jsonl").read_text().splitlines()]
    return weights, lines


def same_run(a: Path, b: Path) -> bool:
    import torch

    if not (b / "model.safetensors").is_file():
        return False
    (wa, ma), (wb, mb) = student_and_metrics(a), student_and_metrics(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and ma == mb


def bad_checkpoints(dump: Path) -> list[str]:
    """Complete-looking checkpoints (``step_*``) that do not read back: what --resume might pick."""
    from distill import checkpoint as C

    bad = []
    for folder in C.list_checkpoints(dump):
        try:
            C.read_checkpoint(folder)
        except Exception:
            bad.append(folder.name)
    return bad


class Matrix:
    def __init__(self, world: tiny.TinyRun, work: Path, straight: Path):
        self.world, self.work, self.straight = world, work, straight
        self.inputs = tiny.tree_hashes(world.inputs())
        self.rows: dict[str, Counter] = {}
        self.notes: list[str] = []
        self._n = 0

    def args(self, dump: Path, *extra: str) -> list[str]:
        return self.world.train_args(dump, *extra, max_steps=MAX_STEPS, interval=INTERVAL)

    def dump(self, name: str) -> Path:
        self._n += 1
        return self.work / f"{self._n:03d}-{name}"

    def record(self, row: str, outcome: str, detail: str = "", lost: bool = False) -> None:
        c = self.rows.setdefault(row, Counter())
        c["trials"] += 1
        c[outcome] += 1
        if lost or tiny.tree_hashes(self.world.inputs()) != self.inputs:
            c["user data lost"] += 1
        if outcome == "other" or lost:
            self.notes.append(f"{row}: {detail}")

    def latest_is_bad(self, dump: Path) -> bool:
        """``latest`` names a checkpoint that does not read back: what --resume would pick first."""
        latest = dump / "checkpoints" / "latest"
        return latest.is_file() and latest.read_text().strip() in bad_checkpoints(dump)

    def resume_and_judge(self, row: str, dump: Path, what: str, damaged: bool = False, **kw) -> None:
        """--resume the interrupted run and record how it ended. Unless we damaged the checkpoints
        ourselves, a ``latest`` that names an unreadable checkpoint is a loss: the fault left it."""
        lost = not damaged and self.latest_is_bad(dump)
        r = run_train(self.args(dump, "--resume"), **kw)
        if r.returncode == 0 and same_run(self.straight, dump):
            lost = lost or self.latest_is_bad(dump)
            self.record(row, "resumed exactly", lost=lost, detail=f"{what}: latest names a bad checkpoint")
        elif one_sentence(r):
            self.record(row, "refused with a sentence", lost=lost, detail=f"{what}: latest names a bad checkpoint")
        else:
            tail = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else ["(no stderr)"]
            self.record(row, "other", f"{what}: exit {r.returncode}, {tail[0][:200]}", lost=lost)

    # -- the faults ------------------------------------------------------------------------

    def sigkill(self, point: str) -> None:
        dump = self.dump("kill")
        r = run_train(self.args(dump), fault=point)
        if r.returncode != -signal.SIGKILL:
            self.record("SIGKILL at a random point", "other", f"{point}: not reached (exit {r.returncode})")
            return
        self.resume_and_judge("SIGKILL at a random point", dump, point)

    def stop_signal(self, sig: signal.Signals, after_lines: int) -> None:
        row = f"{sig.name} (stop, then --resume)"
        dump = self.dump(sig.name.lower())
        env = dict(os.environ, DISTILL_FAULT="", DISTILL_NAN_AT="", OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *self.args(dump)], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = dump / "metrics.jsonl"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines:
                break
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
        if f"stopped by {sig.name}" not in out:
            self.record(row, "other", f"the run ended before {sig.name} arrived (exit {proc.returncode})")
            return
        if proc.returncode != 0:
            self.record(row, "other", f"exit {proc.returncode} after {sig.name}: {err[-300:]}")
            return
        self.resume_and_judge(row, dump, f"{sig.name} after {after_lines} log lines")

    def damaged(self, base: Path) -> None:
        """One killed run (checkpoints 4 and 8, latest = 8), copied and damaged five ways."""
        def variant(name: str, damage) -> None:
            dump = self.dump(name)
            shutil.copytree(base, dump)
            damage(dump / "checkpoints")
            self.resume_and_judge(name, dump, name, damaged=True)

        last = f"step_{2 * INTERVAL:08d}"

        def truncate(ck):
            p = ck / last / "state.pt"
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

        def flip(ck):  # bytes damaged inside a tensor: torch.load alone reads it without complaint
            p = ck / last / "state.pt"
            b = bytearray(p.read_bytes())
            mid = len(b) // 2
            b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
            p.write_bytes(bytes(b))

        def bad_meta(ck):
            (ck / last / "meta.json").write_text("{not json")

        def no_pointer(ck):
            (ck / "latest").unlink()

        def all_bad(ck):
            for folder in ck.glob("step_*"):
                (folder / "state.pt").write_bytes(b"\0" * 100)

        variant("truncated latest checkpoint", truncate)
        variant("corrupt latest checkpoint (bytes flipped)", flip)
        variant("unreadable meta.json in the latest", bad_meta)
        variant("missing latest pointer", no_pointer)
        variant("every checkpoint corrupt", all_bad)

    def disk_full(self, base: Path) -> None:
        """A checkpoint write that runs out of room: a file-size limit below state.pt's size."""
        row = "disk full during a checkpoint write (RLIMIT_FSIZE)"
        dump = self.dump("diskfull")
        shutil.copytree(base, dump)
        size = (dump / "checkpoints" / f"step_{INTERVAL:08d}" / "state.pt").stat().st_size
        r = run_train(self.args(dump, "--resume"), fsize=size // 2)
        leftovers = [p.name for p in (dump / "checkpoints").iterdir() if p.name.startswith(".")]
        latest = (dump / "checkpoints" / "latest").read_text().strip()
        if not one_sentence(r) or "could not write checkpoint" not in r.stderr:
            self.record(row, "other", f"exit {r.returncode}: {r.stderr.strip()[-300:]}")
            return
        if leftovers or latest != f"step_{INTERVAL:08d}" or bad_checkpoints(dump):
            self.record(row, "other", f"left {leftovers}, latest {latest}", lost=bool(bad_checkpoints(dump)))
            return
        self.record(row, "refused with a sentence")
        # room again: the same command resumes exactly
        self.resume_and_judge(row, dump, "resume after the disk was freed")

    def nan_on_one_rank(self) -> None:
        row = "NaN loss on one rank of two (torchrun, gloo)"
        dump = self.dump("nan")
        r = run_train(self.args(dump), nproc=2, nan_at="1:3")
        skipped = [ln for ln in r.stderr.splitlines() if "step 3: the loss is NaN or Inf" in ln]
        steps = [json.loads(ln)["step"] for ln in (dump / "metrics.jsonl").read_text().splitlines()] \
            if (dump / "metrics.jsonl").is_file() else []
        if r.returncode == 0 and len(skipped) == 2 and 3 not in steps and steps[-1] == MAX_STEPS:
            self.record(row, "continued")
        else:
            self.record(row, "other", f"exit {r.returncode}, {len(skipped)} ranks skipped, steps {steps}")
        dump = self.dump("nan-diverged")  # and when every step is NaN: one sentence, the student kept
        r = run_train(self.args(dump, "--max_bad_steps", "1"), nproc=2, nan_at="1:3")
        if one_sentence(r, torchrun=True) and (dump / "student_at_stop" / "model.safetensors").is_file():
            self.record(row, "refused with a sentence")
        else:
            self.record(row, "other", f"diverged run: exit {r.returncode}, {r.stderr.strip()[-300:]}")


def kill_points(rng: random.Random, n: int) -> list[str]:
    """``n`` points drawn from every place a kill can land; each kind of point is drawn at least once."""
    must = [f"during_checkpoint_write_{rng.choice([INTERVAL, 2 * INTERVAL])}", "during_final_save",
            f"during_metrics_append_{rng.randint(INTERVAL + 1, MAX_STEPS)}",
            f"before_latest_{rng.choice([INTERVAL, 2 * INTERVAL])}"]
    pool = ([f"after_step_{s}" for s in range(1, MAX_STEPS + 1)]
            + [f"during_metrics_append_{s}" for s in range(1, MAX_STEPS + 1)]
            + [f"during_checkpoint_write_{s}" for s in (INTERVAL, 2 * INTERVAL)]
            + [f"before_latest_{s}" for s in (INTERVAL, 2 * INTERVAL)] + ["during_final_save"])
    rest = [p for p in pool if p not in must]
    return (must + rng.sample(rest, max(0, n - len(must))))[:max(n, 1)]


def table(rows: dict[str, Counter]) -> str:
    cols = ["trials", *OUTCOMES, "user data lost"]
    lines = ["| fault | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, c in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=12, help="random SIGKILL points (default 12)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draws (default: from the clock, printed)")
    p.add_argument("--quick", action="store_true", help="4 kill points and one trial of every other fault")
    p.add_argument("--jobs", type=int, default=2, help="trials run side by side (each on one thread)")
    p.add_argument("--work_dir", default=None, help="default: a temporary folder, removed at the end")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 2**31
    rng = random.Random(seed)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="distill-faults-"))
    t0 = time.time()
    try:
        world = tiny.build(work / "world", "mlm")
        straight = work / "straight"
        r = run_train(world.train_args(straight, max_steps=MAX_STEPS, interval=INTERVAL))
        if r.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{r.stderr[-3000:]}")
        m = Matrix(world, work, straight)
        base = work / "killed-after-9"  # checkpoints 4 and 8
        if run_train(m.args(base), fault=f"after_step_{2 * INTERVAL + 1}").returncode != -signal.SIGKILL:
            raise SystemExit("the base run for the damaged-checkpoint faults was not killed")
        base6 = work / "killed-after-6"  # checkpoint 4 only
        if run_train(m.args(base6), fault=f"after_step_{INTERVAL + 2}").returncode != -signal.SIGKILL:
            raise SystemExit("the base run for the disk-full fault was not killed")
        points = kill_points(rng, 4 if args.quick else args.kills)
        jobs = [lambda pt=pt: m.sigkill(pt) for pt in points]
        term_at, int_at = rng.randint(2, 6), rng.randint(2, 6)  # log lines before the signal
        jobs += [lambda: m.stop_signal(signal.SIGTERM, term_at), lambda: m.stop_signal(signal.SIGINT, int_at),
                 lambda: m.damaged(base), lambda: m.disk_full(base6), m.nan_on_one_rank]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for f in [pool.submit(j) for j in jobs]:
                f.result()
        order = ["SIGKILL at a random point", "SIGTERM (stop, then --resume)", "SIGINT (stop, then --resume)",
                 "truncated latest checkpoint", "corrupt latest checkpoint (bytes flipped)",
                 "unreadable meta.json in the latest", "missing latest pointer", "every checkpoint corrupt",
                 "disk full during a checkpoint write (RLIMIT_FSIZE)", "NaN loss on one rank of two (torchrun, gloo)"]
        rows = {k: m.rows[k] for k in order if k in m.rows}
        print(f"fault matrix, seed {seed}, kill points: {', '.join(points)}")
        print(table(rows))
        for n in m.notes:
            print(f"- {n}")
        totals = Counter()
        for c in rows.values():
            totals.update(c)
        print(json.dumps({"seed": seed, "kill_points": points, "seconds": round(time.time() - t0, 1),
                          "rows": {k: dict(v) for k, v in rows.items()}, "totals": dict(totals)}))
        return 0 if totals["other"] == 0 and totals["user data lost"] == 0 else 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
