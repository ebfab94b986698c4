"""Code and config comments cite public sources, not a PROTOCOLS.md that is not in the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("silc_bench", "tasks", "configs", "tests", "docs", "benchmarks", "experiments")
CITATION = re.compile(r"PROTOCOLS(\.md| §| section)")


def test_no_citation_of_a_missing_protocols_file():
    assert not (ROOT / "PROTOCOLS.md").exists()
    found = []
    files = [ROOT / "README.md"] + [p for d in SCANNED if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*") if p.is_file()]
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if path == Path(__file__).resolve() or path.suffix not in (".py", ".yaml", ".yml", ".md", ".txt"):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if CITATION.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
