"""Where the project's data files live, and where users keep checkpoints and datasets."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# tasks/, configs/ and results/ sit next to the package in a source checkout (pip install -e .).
PROJECT_DIR = Path(os.environ.get("SILC_BENCH_HOME", PACKAGE_DIR.parent)).resolve()
TASKS_DIR = PROJECT_DIR / "tasks"
CONFIGS_DIR = PROJECT_DIR / "configs"
RESULTS_DIR = PROJECT_DIR / "results"
PAPER_DIR = RESULTS_DIR / "paper"

CHECKPOINT_ENV = "SILC_BENCH_CHECKPOINTS"
DATA_ENV = "SILC_BENCH_DATA"


def checkpoint_dir(flag: str | os.PathLike | None = None) -> Path:
    return Path(flag or os.environ.get(CHECKPOINT_ENV, Path.home() / ".cache" / "silc_bench" / "checkpoints"))


def data_root(flag: str | os.PathLike | None = None) -> Path:
    return Path(flag or os.environ.get(DATA_ENV, Path.home() / "data"))
