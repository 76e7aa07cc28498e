"""Training throughput of the Distiller, and how far it is from the machine's matmul floor.

    python benchmarks/throughput.py                 # the DistilBERT paper-code shape, fp32
    python benchmarks/throughput.py --bf16
    python benchmarks/throughput.py --device cuda --preset distilbert-base --bf16 --seq_len 512

Builds randomly initialised models from configs (nothing is downloaded), binarizes a real corpus
(the King James Bible, packed into documents so that sequences fill --seq_len) with the packaged
BERT uncased tokenizer, and runs the real training step: ``Distiller.step`` built from a
``TrainConfig`` exactly as train.py builds it. It measures the matmul peak (fp32, and bf16 when --bf16)
just before and just after the timed steps; on the CPU in a child process, so that the peak matmul's
operands (48 MiB at n = 2048 in fp32) do not count in the training's peak RSS.

Prints one JSON line. ``floor_ratio`` is the measured step time over the time the step's matmul
FLOPs (counted analytically on the *padded* tokens, which is what the hardware computes: teacher
forward with its vocabulary projection when a logit loss needs it, student forward and backward,
attention QK^T and AV, the vocabulary projections) take at the measured peak of the precision the
step runs its matmuls in. 1.0 would mean nothing but matmuls, at peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.matmul_peak import matmul_peak  # noqa: E402
from distill import losses as L  # noqa: E402
from distill.config import TrainConfig  # noqa: E402
from distill.data.binarize import TOKENS_FILE, binarize, read_meta  # noqa: E402
from distill.data.collate import Collator, mlm_token_probs  # noqa: E402
from distill.data.dataset import LMSeqsDataset  # noqa: E402
from distill.distiller import Distiller  # noqa: E402
from distill.models import build_model  # noqa: E402

# Teacher BERT and student DistilBERT shapes. "paper": the original DistilBERT code's benchmark
# shape; "distilbert-base": BERT-base into a 6-layer DistilBERT (for a GPU); "tiny": smoke tests.
PRESETS = {
    "paper": dict(hidden=256, heads=4, ffn=1024, teacher_layers=6, student_layers=3),
    "distilbert-base": dict(hidden=768, heads=12, ffn=3072, teacher_layers=12, student_layers=6),
    "tiny": dict(hidden=32, heads=4, ffn=64, teacher_layers=2, student_layers=1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model shapes (default: paper)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainConfig.bf16)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128, help="--max_model_input_size")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--split_steps", type=int, default=None,
                   help="steps of the instrumented run that splits a step into phases (default: --steps; 0: none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile", nargs="?", const="losses", default=None, choices=["losses", "models", "all"],
                   help="torch.compile the fused losses' block kernels (losses, the default), the student and "
                        "the teacher (models), or both (all)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--restrict_ce_to_mask", action="store_true", help="TrainConfig.restrict_ce_to_mask")
    p.add_argument("--corpus", default=None,
                   help="text file, one document per line (default: the KJV Bible); 'vim': Vim's own documentation "
                        "(/usr/share/vim/vim*/doc), one paragraph a line, the corpus issue 19 was measured on")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the packaged all-MiniLM-L6-v2's BERT uncased WordPiece)")
    p.add_argument("--corpus_mult", type=int, default=1, help="repeat the corpus this many times (data-path checks)")
    p.add_argument("--pack_chars", type=int, default=4096,
                   help="join consecutive lines into documents of about this many characters, so that most "
                        "examples are --seq_len long (0: one document per line)")
    p.add_argument("--data", default=None, help="an existing binarized dataset folder (skips corpus and binarizing)")
    p.add_argument("--work_dir", default=str(ROOT / "runs" / "bench"), help="cache of the corpus and its binarization")
    p.add_argument("--matmul_size", type=int, default=None,
                   help="n of the n^3 peak matmul (default: 2048 CPU, 8192 GPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more steps with torch.profiler and print the top "
                        "operators to stderr")
    p.add_argument("--adamw", default="default", choices=["default", "foreach", "fused", "for-loop"],
                   help="experiment: rebuild the Distiller's AdamW with this implementation (default: as the "
                        "Distiller builds it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.split_steps is None:
        args.split_steps = args.steps
    for name in ("batch_size", "seq_len", "steps", "corpus_mult"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------
# Data


def packaged_tokenizer() -> Path:
    from distill.demo.assets import minilm_teacher_dir

    return minilm_teacher_dir()


def vim_paragraphs(out: Path) -> Path:
    """Vim's documentation (Debian's vim-runtime), one paragraph a line: its help files' lines joined
    up to each blank line, whitespace collapsed."""
    if out.is_file():
        return out
    import glob

    files = sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt"))
    if not files:
        raise SystemExit("--corpus vim: no Vim documentation under /usr/share/vim/vim*/doc (apt-get install "
                         "vim-runtime)")
    paragraphs = []
    for name in files:
        cur: list[str] = []
        for line in Path(name).read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
            if line.strip():
                cur.append(" ".join(line.split()))
            elif cur:
                paragraphs.append(" ".join(cur))
                cur = []
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def prepare_corpus(args, work: Path) -> Path:
    """The corpus as binarized: the source repeated --corpus_mult times, lines packed into documents."""
    if args.corpus is None:
        from distill.demo.assets import kjv_corpus

        src = kjv_corpus(work / "kjv.txt")
    elif args.corpus == "vim":
        src = vim_paragraphs(work / "vim_paragraphs.txt")
    else:
        src = Path(args.corpus)
    out = work / f"{src.stem}_x{args.corpus_mult}_p{args.pack_chars}.txt"
    if out.is_file() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    docs, cur, n = [], [], 0
    for ln in lines:
        cur.append(ln)
        n += len(ln) + 1
        if n >= args.pack_chars:
            docs.append(" ".join(cur))
            cur, n = [], 0
    if cur:
        docs.append(" ".join(cur))
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(args.corpus_mult):
            f.write("\n".join(docs) + "\n")
    os.replace(tmp, out)
    return out


def prepare_data(args) -> Path:
    if args.data is not None:
        return Path(args.data)
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    tok = Path(args.tokenizer) if args.tokenizer else packaged_tokenizer()
    text = prepare_corpus(args, work)
    folder = work / f"data_{text.stem}_{tok.name}"
    try:
        meta = read_meta(folder)
        if meta["source"]["size"] == text.stat().st_size:
            return folder
    except Exception:  # missing or stale: binarize again
        pass
    binarize(text, str(tok), folder, overwrite=True, progress=False, num_workers=1)
    return folder


# ------------------------------------------------------------------------------------------------
# Models and FLOPs


def model_configs(preset: str, vocab: int, max_pos: int) -> tuple[dict, dict]:
    s = PRESETS[preset]
    teacher = dict(vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["teacher_layers"],
                   num_attention_heads=s["heads"], intermediate_size=s["ffn"], max_position_embeddings=max_pos)
    student = dict(vocab_size=vocab, dim=s["hidden"], n_layers=s["student_layers"], n_heads=s["heads"],
                   hidden_dim=s["ffn"], max_position_embeddings=max_pos)
    return teacher, student


def encoder_flops(tokens: int, batch: int, length: int, layers: int, hidden: int, ffn: int) -> int:
    """Forward matmul FLOPs (2*M*N*K) of ``layers`` transformer layers on (batch, length) tokens."""
    proj = 2 * tokens * hidden * hidden * 4  # Q, K, V, output
    mlp = 2 * tokens * hidden * ffn * 2
    attn = 2 * batch * length * length * hidden * 2  # QK^T and AV over all heads
    return layers * (proj + mlp + attn)


def head_flops(tokens: int, rows: int, hidden: int, vocab: int) -> int:
    """MLM head: the hidden->hidden transform on every token, the vocabulary projection on ``rows``."""
    return 2 * tokens * hidden * hidden + 2 * rows * hidden * vocab


def step_flops(preset: str, vocab: int, batch: int, length: int, teacher_rows: int, student_rows: int
               ) -> dict[str, int]:
    """Matmul FLOPs of one micro-batch of shape (batch, length) (padded), by part.

    Encoders and the heads' transforms count every padded position; the vocabulary projections count
    the rows a loss covers, which are the rows the Distiller projects (``teacher_rows``: the
    soft-target rows, 0 when no logit loss needs the teacher's; ``student_rows``: those and the
    labelled rows). With the default ce over every attended position that is all but the padding;
    with --restrict_ce_to_mask it is the 15% of masked positions.
    """
    s = PRESETS[preset]
    t = batch * length
    h, f = s["hidden"], s["ffn"]
    teacher = encoder_flops(t, batch, length, s["teacher_layers"], h, f)
    teacher_head = head_flops(t, teacher_rows, h, vocab) if teacher_rows else 0
    student_fwd = encoder_flops(t, batch, length, s["student_layers"], h, f) + head_flops(t, student_rows, h, vocab)
    # Backward: each matmul's input gradient and weight gradient, 2x its forward (the first layer's
    # input gradient is needed too: the embeddings are trained).
    return {"teacher_forward": teacher + teacher_head, "student_forward": student_fwd,
            "student_backward": 2 * student_fwd}


def projected_rows(distiller: Distiller, batch: dict) -> tuple[int, int]:
    """(teacher rows, student rows) of the vocabulary projections for this batch, from the
    Distiller's own masks."""
    masks = distiller.masks(batch)
    ce = masks["ce"].bool()
    union = ce | masks["labels"].bool()
    return (int(ce.sum()) if distiller.need_teacher_logits else 0), int(union.sum())


# ------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_peaks(device: torch.device, dtypes: list[torch.dtype], n: int) -> dict[str, float]:
    """:func:`matmul_peak` of each dtype, by name ("float32", ...). On the CPU in a child process with as many
    threads as this one (this process waits meanwhile), so that its operands, freed afterwards, do not
    raise this process's peak RSS, which the benchmark reports for the training."""
    names = [str(dt).split(".")[-1] for dt in dtypes]
    if device.type != "cpu":
        return {name: matmul_peak(device, dt, n) for name, dt in zip(names, dtypes)}
    script = Path(__file__).with_name("matmul_peak.py")
    r = subprocess.run([sys.executable, str(script), str(torch.get_num_threads()), str(n), *names],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"error: the matmul peak's child process failed: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------------------------
# The run


def build_distiller(args, data: Path, device: torch.device) -> tuple[Distiller, LMSeqsDataset]:
    """As train.py wires a run: TrainConfig, dataset, collator with MLM, random-init models, Distiller."""
    cfg = TrainConfig(dump_path="unused", data_file=str(data), student_type="distilbert", teacher_type="bert",
                      teacher_name="random-init", student_config="preset", mlm=True, alpha_ce=5.0, alpha_mlm=2.0,
                      alpha_cos=1.0, alpha_clm=0.0, temperature=2.0, batch_size=args.batch_size,
                      gradient_accumulation_steps=1, max_model_input_size=args.seq_len, bf16=args.bf16,
                      restrict_ce_to_mask=args.restrict_ce_to_mask, group_by_size=True, seed=args.seed,
                      n_epoch=1000, max_steps=args.warmup + args.steps + args.split_steps,
                      n_gpu=1 if device.type == "cuda" else 0)  # validated when built
    dataset = LMSeqsDataset(cfg.data_file, max_model_input_size=cfg.max_model_input_size)
    meta = dataset.meta
    vocab = int(meta["vocab_size"])
    t_cfg, s_cfg = model_configs(args.preset, vocab, max(512, args.seq_len))
    torch.manual_seed(args.seed)
    teacher = build_model("bert", {"model_type": "bert", **t_cfg})
    student = build_model("distilbert", {"model_type": "distilbert", **s_cfg},
                          overrides={"initializer_range": cfg.initializer_range})
    # As train.py loads a teacher (distill.training.load_teacher): in the run's teacher dtype (bf16 with
    # --bf16), without gradients.
    teacher.to(cfg.teacher_torch_dtype(cuda=device.type == "cuda")).requires_grad_(False)
    special = meta["special_token_ids"]
    probs = mlm_token_probs(token_counts(data, meta), cfg.mlm_smoothing, sorted(set(special.values())))
    collator = Collator(special["pad_token"], mlm=True, mask_id=special["mask_token"], token_probs=probs,
                        mlm_mask_prop=cfg.mlm_mask_prop, word_mask=cfg.word_mask, word_keep=cfg.word_keep,
                        word_rand=cfg.word_rand, seed=cfg.seed)
    layer_map = L.default_layer_map(PRESETS[args.preset]["student_layers"], PRESETS[args.preset]["teacher_layers"])
    if args.compile in ("models", "all"):
        student = torch.compile(student)
        teacher = torch.compile(teacher)
    distiller = Distiller(cfg, student, teacher, dataset, collator, device, student_objective="mlm",
                          layer_map=layer_map)
    if args.compile in ("losses", "all"):
        distiller.loss_workspace = L.Workspace(compiled=True)
    if args.adamw != "default":  # same groups and hyper-parameters, another implementation
        opt = distiller.optimizer
        impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}
        groups = [{**g, "foreach": None, "fused": None, **impl[args.adamw]} for g in opt.param_groups]
        distiller.optimizer = torch.optim.AdamW(groups)
        distiller.scheduler.optimizer = distiller.optimizer
    return distiller, dataset


def token_counts(data: Path, meta: dict, block: int = 1 << 22) -> np.ndarray:
    """As scripts/token_counts.py counts (for MLM smoothing), reading the token file a block at a time
    rather than through a memory map, so the corpus's pages do not count in this process's RSS."""
    dtype = np.dtype(meta["dtype"])
    counts = np.zeros(int(meta["vocab_size"]), dtype=np.int64)
    with open(data / TOKENS_FILE, "rb") as f:
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=block)
            if chunk.size == 0:
                return counts
            counts += np.bincount(chunk, minlength=len(counts))[:len(counts)]


def batches(distiller: Distiller):
    """Micro-batches in training order, epoch after epoch."""
    epoch = 0
    while True:
        distiller.sampler.set_epoch(epoch)
        distiller.collator.epoch = epoch
        yield from distiller.loader
        epoch += 1


class Split:
    """Per-phase times of Distiller.step, by wrapping its methods on the instance (a separate,
    instrumented run: the headline figures come from the unmodified step)."""

    PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")

    def __init__(self, d: Distiller, sync):
        self.d, self.sync = d, sync
        self.t = defaultdict(float)
        self._hooks = []

    def _timed(self, key, fn):
        def wrapper(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.sync()
            self.t[key] += time.perf_counter() - t0
            return out
        return wrapper

    def __enter__(self):
        d = self.d
        d.teacher_forward = self._timed("teacher_forward", d.teacher_forward)
        d.loss_sums = self._timed("loss_sums", d.loss_sums)
        d.optimize = self._timed("optimizer", d.optimize)
        start = {}

        def pre(module, args, kwargs):
            self.sync()
            start["t"] = time.perf_counter()

        def post(module, args, kwargs, out):
            self.sync()
            self.t["student_forward"] += time.perf_counter() - start["t"]

        self._hooks = [d.student.register_forward_pre_hook(pre, with_kwargs=True),
                       d.student.register_forward_hook(post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for name in ("teacher_forward", "loss_sums", "optimize"):
            delattr(self.d, name)  # back to the class's methods
        for h in self._hooks:
            h.remove()

    def phases(self, steps: int) -> dict[str, float]:
        t = self.t
        out = {
            "data": t["data"],
            "teacher_forward": t["teacher_forward"],
            "student_forward": t["student_forward"],
            # the vocabulary losses compute their gradient here, in their forward pass
            "loss": t["loss_sums"] - t["teacher_forward"] - t["student_forward"],
            "backward": t["step"] - t["loss_sums"] - t["optimizer"],  # with masks, counts, transfers
            "optimizer": t["optimizer"],
        }
        return {k: round(v / steps * 1e3, 2) for k, v in out.items()}  # ms per step


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mm_n = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    run_dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak_dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])

    t_setup = time.perf_counter()
    data = prepare_data(args)
    distiller, dataset = build_distiller(args, data, device)
    vocab = int(dataset.meta["vocab_size"])
    setup_s = time.perf_counter() - t_setup
    it = batches(distiller)

    for _ in range(args.warmup):
        distiller.step([next(it)])
    sync()

    peaks_before = matmul_peaks(device, peak_dtypes, mm_n)

    # The headline: the unmodified Distiller.step, data loading included.
    real = padded = 0
    flops = defaultdict(int)
    step_times = []
    cpu0 = time.process_time()
    t_all = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(it)
        res = distiller.step([batch])
        sync()
        step_times.append(time.perf_counter() - t0)
        B, Lb = batch["input_ids"].shape
        real += res.tokens
        padded += B * Lb
        for k, v in step_flops(args.preset, vocab, B, Lb, *projected_rows(distiller, batch)).items():
            flops[k] += v
    elapsed = time.perf_counter() - t_all
    cpu_s = time.process_time() - cpu0

    peaks_after = matmul_peaks(device, peak_dtypes, mm_n)
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    peak = peaks[str(run_dtype).split(".")[-1]]

    split = None
    if args.split_steps > 0:
        with Split(distiller, sync) as sp:
            t_split = time.perf_counter()
            for _ in range(args.split_steps):
                t0 = time.perf_counter()
                batch = next(it)
                sp.t["data"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                distiller.step([batch])
                sync()
                sp.t["step"] += time.perf_counter() - t1
            split = sp.phases(args.split_steps)
            split["total"] = round((time.perf_counter() - t_split) / args.split_steps * 1e3, 2)

    if args.profile > 0:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(args.profile):
                distiller.step([next(it)])
            sync()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30), file=sys.stderr)

    total_flops = sum(flops.values())
    floor_s = total_flops / peak
    out = {
        "precision": "bf16" if args.bf16 else "fp32",
        "device": args.device,
        "preset": args.preset,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "compile": args.compile or "none",
        "restrict_ce_to_mask": args.restrict_ce_to_mask,
        "real_tokens_per_s": round(real / elapsed, 1),
        "padded_tokens_per_s": round(padded / elapsed, 1),
        "mean_padded_len": round(padded / args.steps / args.batch_size, 1),
        "step_ms": round(elapsed / args.steps * 1e3, 2),
        "step_ms_min_max": [round(min(step_times) * 1e3, 2), round(max(step_times) * 1e3, 2)],
        # CPU time of the process per step: with --threads 1 a measure that other processes on the
        # machine barely disturb (wall time does), for comparing two versions on a busy machine
        "cpu_ms_per_step": round(cpu_s / args.steps * 1e3, 2),
        "floor_ratio": round(elapsed / floor_s, 3),
        "mfu": round(floor_s / elapsed, 3),  # model FLOP/s over the measured matmul peak
        "achieved_gflops": round(total_flops / elapsed / 1e9, 1),
        "gflop_per_step": {k: round(v / args.steps / 1e9, 3) for k, v in flops.items()},
        "matmul_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "matmul_gflops_before_after": {k: [round(peaks_before[k] / 1e9, 1), round(peaks_after[k] / 1e9, 1)]
                                       for k in peaks},
        "matmul_n": mm_n,
        "split_ms": split,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "corpus_tokens": int(dataset.meta["num_tokens"]),
        "examples": len(dataset),
        "setup_s": round(setup_s, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **cpu_description(),
        "loss_kernel": loss_kernel(),
    }
    if device.type == "cpu":  # rows per chunk and columns per matmul of the fused vocabulary losses
        from distill.losses.blocking import cpu_blocking

        b = cpu_blocking(run_dtype, PRESETS[args.preset]["hidden"], vocab)
        out["vocab_blocking"] = {"rows": b.rows, "cols": b.cols, "source": b.source}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def cpu_description() -> dict:
    """The CPU's model name and the ISA flags that decide its matmul peaks."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    return {"cpu": model, "isa": isa, "cores": os.cpu_count()}


def loss_kernel() -> str:
    """Which forward-KL block kernel the run used (distill.losses.native, or eager PyTorch and why)."""
    from distill.losses import native

    return "native" if native.available() else f"eager ({native.unavailable_reason()})"


def main(argv=None) -> int:
    args = parse_args(argv)
    print(json.dumps(run(args)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
