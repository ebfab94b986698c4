"""Wall time of the README's main job (the toy-world Table 2), from an empty data root and output folder.

    python benchmarks/main_job.py            # prints seconds for: generate + evaluate, then evaluate again (cached)

Runs `silc-bench run zs-seg --model toy-clip-w2,toy-silc-c-w2 --datasets toyworld_v2` as a user would (a
subprocess, CLI defaults) in a temporary folder, so the toy split is generated as on a fresh
machine; the second run finds every record and only prints the table. The install step of the
README's command is not timed (it depends on the network and pip's cache).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy-clip-w2,toy-silc-c-w2")
    ap.add_argument("--datasets", default="toyworld_v2")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "silc_bench.cli", "run", "zs-seg", "--model", args.models,
               "--datasets", args.datasets, "--data-root", str(tmp / "data"), "--out", str(tmp / "runs")]
        first = timed(cmd, tmp)
        again = timed(cmd, tmp)
    print(f"main_job_first_run_s={first:.1f} (toy split generated, both models evaluated)")
    print(f"main_job_cached_run_s={again:.1f} (records found, table printed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
