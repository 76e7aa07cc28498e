"""How close the soft-target gradient from a teacher cache is to the online one, on `make demo-clm`'s models.

    python benchmarks/teacher_cache_gradients.py                      # T = 1 and 2, k = 64, S = 0 and 16
    python benchmarks/teacher_cache_gradients.py --temperatures 1 --tail_samples 0,16,64

Training from a cache changes one thing: the soft-target loss's gradient. This measures that gradient
directly, without a training run, so it is cheap where training is not. On real batches of the demo's
binarized corpus, with SmolLM2-135M-Instruct as the teacher and each given student (by default the
extracted one, and the one `make demo-clm --quick` distilled, when they exist), it computes the forward
KL's gradient in what the loss feeds on (the student's last hidden states and its output projection)
three ways:

- online: against the teacher's full distribution (what `train.py` computes with `--teacher_name`);
- from the top k and one tail bucket (a cache written with `--tail_samples 0`);
- from the top k, the tail bucket and S tokens drawn from the teacher's tail (the cache's default,
  S = 16), for several seeds of the draw.

The cached rows are computed here from the same teacher logits, exactly as `distill-cache-teacher`
writes them, but kept in fp32. For each it prints the cosine similarity with the online gradient,
the norm of the difference relative to the online gradient's, and the loss value relative to the
online loss. One JSON line per (student, temperature, variant), then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill import losses as L  # noqa: E402
from distill import models as M  # noqa: E402
from distill.data.dataset import LMSeqsDataset  # noqa: E402
from distill.hf import quiet_transformers  # noqa: E402
from distill.losses.cached import CachedTargets  # noqa: E402
from distill.teacher_cache import store  # noqa: E402
from distill.teacher_cache.write import top_k_rows  # noqa: E402


def cpu_description() -> dict:
    flags, model = set(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return {"cpu": model, "cores": os.cpu_count(),
            "isa": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})}


def batches(data: Path, max_len: int, batch_size: int, count: int, seed: int) -> list[list]:
    """``count`` batches of whole examples drawn at random (seeded) from the binarized data."""
    ds = LMSeqsDataset(str(data), max_model_input_size=max_len)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[:batch_size * count].tolist()
    return [[ds[i]["input_ids"] for i in order[b * batch_size:(b + 1) * batch_size]] for b in range(count)]


def pad(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, Lmax = len(examples), max(len(e) for e in examples)
    ids = torch.full((B, Lmax), pad_id, dtype=torch.int64)
    attn = torch.zeros((B, Lmax), dtype=torch.int64)
    for b, e in enumerate(examples):
        ids[b, :len(e)] = torch.from_numpy(e)
        attn[b, :len(e)] = 1
    return ids, attn


def cached_targets(teacher_rows: torch.Tensor, k: int, T: float, samples: int, seed: int,
                   logprob_dtype: str = "fp32") -> CachedTargets:
    """The rows a cache would hold, with its log-probabilities rounded as ``logprob_dtype`` stores them."""
    rows = top_k_rows(teacher_rows, k, T, samples, torch.Generator().manual_seed(seed))
    stored = store.decode_logprobs(store.encode_logprobs(rows.logprobs.numpy(), logprob_dtype), logprob_dtype)
    rows = rows._replace(logprobs=torch.from_numpy(stored.astype("float32")))
    return CachedTargets(*(None if x is None else x.clone() for x in rows))


def variant(spec: str) -> tuple[int, str]:
    """'16' -> (16, 'fp16'); '50:q8' -> (50, 'q8')."""
    S, _, dtype = spec.partition(":")
    if (dtype or "fp16") not in store.LOGPROB_DTYPES:
        raise SystemExit(f"--tail_samples {spec}: the dtype must be one of {', '.join(store.LOGPROB_DTYPES)}")
    return int(S), dtype or "fp16"


def gradient(hidden: torch.Tensor, weight: torch.Tensor, teacher, T: float) -> tuple[torch.Tensor, float]:
    """The soft-target loss's gradient in (hidden, weight), flattened, and the loss."""
    x, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss = L.projected_vocab_losses(x, w, teacher=teacher, temperature=T, soft_target=True)["soft_target_ce"]
    gx, gw = torch.autograd.grad(loss, (x, w))
    return torch.cat([gx.reshape(-1), gw.reshape(-1)]).double(), loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", default="runs/demo-clm", help="where `make demo-clm [QUICK=1]` wrote its models")
    p.add_argument("--students", default=None,
                   help="comma-separated student folders (default: student_init and student_quick or student)")
    p.add_argument("--temperatures", default="1,2")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tail_samples", default="0,16",
                   help="comma-separated S[:dtype]; 0 is the buckets alone; the dtype the log-probabilities are "
                        "stored in (default fp16; the cache's own default is q8 with samples), e.g. 50:q8, the "
                        "same 300 bytes as 16 in fp16")
    p.add_argument("--draws", type=int, default=3, help="seeds of the tail samples per S > 0")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    run = Path(args.run_dir)
    if args.students:
        students = [Path(s) for s in args.students.split(",")]
    else:
        students = [run / "student_init"] + [run / n for n in ("student", "student_quick") if (run / n).is_dir()][:1]
    for folder in [run / "teacher", run / "data", *students]:
        if not folder.exists():
            raise SystemExit(f"{folder} does not exist: run `make demo-clm QUICK=1` first")
    temps = [float(t) for t in args.temperatures.split(",")]
    sizes = [variant(s) for s in args.tail_samples.split(",")]
    with quiet_transformers():
        teacher = M.load_model("llama", run / "teacher").model.eval()
    pad_id = int(teacher.config.eos_token_id if teacher.config.pad_token_id is None else teacher.config.pad_token_id)
    data = [pad(b, pad_id) for b in batches(run / "data", args.max_len, args.batch_size, args.batches, args.seed)]
    with torch.inference_mode():
        t_logits = [teacher(input_ids=i, attention_mask=a, use_cache=False).logits[a.bool()].float() for i, a in data]
    del teacher
    print(json.dumps({**cpu_description(), "batches": args.batches, "batch_size": args.batch_size,
                      "positions": sum(t.shape[0] for t in t_logits), "k": args.k}), flush=True)
    table = []
    for folder in students:
        with quiet_transformers():
            student = M.load_model("llama", folder).model.eval()  # dropout off: the same hidden states each time
        proj = L.output_projection(student)
        hidden = []
        with torch.no_grad(), L.projection_input(student):
            for i, a in data:
                hidden.append(student(input_ids=i, attention_mask=a, use_cache=False).logits[a.bool()].float())
        for T in temps:
            per = {}
            for b, (h, t) in enumerate(zip(hidden, t_logits)):
                online, online_loss = gradient(h, proj.weight, t, T)
                top_mass = 1 - cached_targets(t, args.k, T, 0, 0).tail.exp().mean().item()
                per.setdefault("top_k_mass", []).append(top_mass)
                for S, dtype in sizes:
                    for d in range(args.draws if S else 1):
                        rows = cached_targets(t, args.k, T, S, args.seed + 1000 * b + d, dtype)
                        g, loss = gradient(h, proj.weight, rows, T)
                        rec = per.setdefault((S, dtype), {"cosine": [], "relative_error": [], "loss_ratio": []})
                        rec["cosine"].append(torch.nn.functional.cosine_similarity(g, online, dim=0).item())
                        rec["relative_error"].append(((g - online).norm() / online.norm()).item())
                        rec["loss_ratio"].append(loss / online_loss)
            for S, dtype in sizes:
                r = {key: statistics.mean(v) for key, v in per[S, dtype].items()}
                r.update(student=folder.name, temperature=T, tail_samples=S, logprob_dtype=dtype, k=args.k,
                         bytes_per_position=store.bytes_per_position(args.k, t.shape[1], dtype, S),
                         top_k_mass=statistics.mean(per["top_k_mass"]),
                         cosine_min=min(per[S, dtype]["cosine"]), cosine_max=max(per[S, dtype]["cosine"]))
                print(json.dumps(r), flush=True)
                table.append(r)
    print("\n| student | T | top-k mass | variant | bytes | cosine with online | relative error | loss / online |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        name = "top k + tail bucket" if r["tail_samples"] == 0 else f"+ {r['tail_samples']} tail samples"
        name += f", {r['logprob_dtype']}"
        print(f"| {r['student']} | {r['temperature']:g} | {r['top_k_mass']:.3f} | {name} | {r['bytes_per_position']} "
              f"| {r['cosine']:.4f} "
              f"({r['cosine_min']:.4f}–{r['cosine_max']:.4f}) | {r['relative_error']:.3f} | {r['loss_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
