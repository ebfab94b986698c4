"""pyproject.toml's dependencies: every lower bound was tried (<= the installed version), every
third-party import in silc_bench/ is declared, and every declared runtime dependency is used."""
import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Import name -> distribution, where they differ.
IMPORT_TO_DIST = {
    "PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch", "google": "protobuf",
    "sklearn": "scikit-learn", "cv2": "opencv-python", "mmseg": "mmsegmentation", "mmcv": "mmcv-lite",
}
# Declared runtime dependencies that silc_bench/ does not import itself, and why they are declared.
USED_INDIRECTLY = {"protobuf": "transformers needs it to read SigLIP's sentencepiece tokenizer in hf: directories"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse(requirement: str) -> tuple[str, str | None]:
    """'torch>=2.1,<3' -> ('torch', '2.1'); the lower bound is None when there is none."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(\[[^\]]*\])?\s*(.*)$", requirement.split(";")[0])
    assert m, requirement
    lower = None
    for spec in filter(None, (s.strip() for s in m.group(3).split(","))):
        if spec.startswith(">="):
            lower = spec[2:].strip()
        elif spec.startswith("=="):
            lower = spec[2:].strip()
    return m.group(1), lower


def _version_key(version: str) -> tuple:
    """Release numbers of a version ('2.14.1+cpu' -> (2, 14, 1)); enough to compare release bounds."""
    release = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    assert release, version
    parts = [int(p) for p in release.group(1).split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


RUNTIME = [_parse(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = [_parse(r) for reqs in PYPROJECT["project"].get("optional-dependencies", {}).values() for r in reqs]


def test_version_key():
    assert _version_key("2.14.1+cpu") > _version_key("2.14") == _version_key("2.14.0")
    assert _version_key("1.0.31") > _version_key("1.0.4") and _version_key("10.0") > _version_key("9.9.9")
    assert _parse("mmcv-lite>=2.1.0,<2.2") == ("mmcv-lite", "2.1.0") and _parse("tqdm") == ("tqdm", None)


@pytest.mark.parametrize("name,lower", RUNTIME + EXTRAS, ids=[n for n, _ in RUNTIME + EXTRAS])
def test_lower_bound_is_not_above_the_installed_version(name, lower):
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        if (name, lower) in RUNTIME:
            pytest.fail(f"runtime dependency {name} is not installed")
        pytest.skip(f"optional dependency {name} is not installed")
    assert lower is not None, f"{name} has no lower bound: give the version it was tested with"
    assert _version_key(lower) <= _version_key(installed), f"{name}>={lower} but {installed} is installed (and tested)"


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of silc_bench/ importing it (absolute imports outside the stdlib)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "silc_bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("silc_bench", "__future__"):
                    continue
                found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def _distributions(module: str) -> set[str]:
    dists = {_norm(d) for d in metadata.packages_distributions().get(module, [])}
    if module in IMPORT_TO_DIST:
        dists.add(_norm(IMPORT_TO_DIST[module]))
    return dists or {_norm(module)}


def test_every_third_party_import_is_declared():
    declared = {_norm(n) for n, _ in RUNTIME}
    imports = _third_party_imports()
    assert {"torch", "numpy", "open_clip", "timm"} <= set(imports)  # the scan sees lazy imports too
    missing = {m: sorted(files) for m, files in imports.items() if not _distributions(m) & declared}
    assert not missing, f"imported by silc_bench/ but not in [project.dependencies]: {missing}"


def test_every_declared_runtime_dependency_is_used():
    used = set().union(*(_distributions(m) for m in _third_party_imports()))
    unused = [n for n, _ in RUNTIME if _norm(n) not in used and _norm(n) not in USED_INDIRECTLY]
    assert not unused, f"declared but never imported by silc_bench/ (drop them, or say why in USED_INDIRECTLY): {unused}"


def test_pyproject_says_the_bounds_are_the_tested_versions():
    text = (ROOT / "pyproject.toml").read_text()
    assert "Lower bounds are the versions installed and tested" in text
    assert "pandas" not in text
