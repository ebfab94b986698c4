"""Committed files hold no path of the machine that made them (records, tables, folder names)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABSOLUTE = re.compile(r"(?<![\w<.])/(?:root|home|tmp|work|Users|private|var/folders)/")


def committed_files():
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout: every file under the result folders
        return [p.relative_to(ROOT) for p in (ROOT / "results").rglob("*") if p.is_file()]
    return [Path(line) for line in out.stdout.splitlines()]


def test_records_tables_and_folder_names_hold_no_machine_path():
    bad = []
    for rel in committed_files():
        if rel.parts[0] not in ("results", "configs", "tasks") and rel.parts[:2] != ("tests", "fixtures"):
            continue
        path = ROOT / rel
        if not path.exists():  # deleted in the work tree, not yet committed
            continue
        if "tmp_" in str(rel) or "work_main" in str(rel):
            bad.append(f"{rel}: folder named from a path")
        if path.suffix in (".json", ".md", ".csv", ".yaml", ".txt") and path.exists():
            for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                if ABSOLUTE.search(line):
                    bad.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not bad, "\n".join(bad[:20])
