"""The bundled toy checkpoints agree with the recipe their registry entry names and with the CI
baselines: a swapped file, a recipe edited after the fact, or a baseline row for the wrong world
fails here, before the regression gate's numbers are read. The README's main job, its benchmark and
the CI gate name the same models."""
from __future__ import annotations

import csv
import hashlib
import json
import shlex

import yaml

from silc_bench import registry
from silc_bench.data import toyworld
from silc_bench.paths import PROJECT_DIR, RESULTS_DIR
from silc_bench.pretrain.trainer import load_config


def differing_settings(saved, recipe, where=""):
    """Paths where the saved config disagrees with the recipe; keys the sidecar lacks (settings
    added after it was written, at their defaults) are not compared."""
    if isinstance(saved, dict) and isinstance(recipe, dict):
        return [p for k, v in saved.items() for p in differing_settings(v, recipe.get(k), f"{where}.{k}")]
    return [] if saved == recipe else [where]


def test_bundled_toy_models_match_their_recipe_and_the_ci_baseline():
    baseline = []
    for name in ("toy.csv", "toy_w1.csv"):  # the main job's world 2, and world 1
        with open(RESULTS_DIR / "baselines" / name, newline="") as f:
            baseline += list(csv.DictReader(f))
    toys = {name: entry for name, entry in registry.models().items() if name.startswith("toy-")}
    assert {"toy-clip", "toy-silc-c", "toy-clip-w2", "toy-silc-c-w2"} <= set(toys)
    for name, entry in toys.items():
        npz = PROJECT_DIR / entry["bundled"]
        words = shlex.split(entry["release"])
        recipe = load_config(PROJECT_DIR / words[words.index("--config") + 1],
                             {"train": {"seed": int(words[words.index("--seed") + 1])}})
        saved = json.loads(npz.with_name(npz.name.replace(".npz", ".config.json")).read_text())
        assert differing_settings(saved, json.loads(json.dumps(recipe))) == [], name
        world = recipe["data"].get("world", 1)
        rows = [r for r in baseline if r["model"] == name]
        assert {r["dataset"] for r in rows} == {toyworld.dataset_name(world)}, name
        assert {r["checkpoint_sha256"] for r in rows} == {hashlib.sha256(npz.read_bytes()).hexdigest()}, name
        assert {r["metric"] for r in rows} >= {"mIoU"}, name


def test_main_job_is_the_same_everywhere():
    main_job = "silc-bench run zs-seg --model toy-clip-w2,toy-silc-c-w2 --datasets toyworld_v2"
    readme = (PROJECT_DIR / "README.md").read_text()
    assert readme.split("```bash\n", 1)[1].splitlines()[0] == "pip install -e . && " + main_job
    assert main_job in (PROJECT_DIR / ".ci" / "run").read_text()
    bench = (PROJECT_DIR / "benchmarks" / "main_job.py").read_text()
    assert 'default="toy-clip-w2,toy-silc-c-w2"' in bench and 'default="toyworld_v2"' in bench
    with open(RESULTS_DIR / "baselines" / "toy.csv", newline="") as f:
        assert {(r["model"], r["dataset"]) for r in csv.DictReader(f)} == {
            ("toy-clip-w2", "toyworld_v2"), ("toy-silc-c-w2", "toyworld_v2")}


def test_ci_checks_every_baseline_and_each_holds_one_world():
    ci = (PROJECT_DIR / ".ci" / "run").read_text()
    worlds = {"toy.csv": "toyworld_v2", "toy_w1.csv": "toyworld"}
    for path in (RESULTS_DIR / "baselines").glob("*.csv"):
        assert f"compare --baseline results/baselines/{path.name} " in ci, path.name
        with open(path, newline="") as f:
            assert {r["dataset"] for r in csv.DictReader(f)} == {worlds[path.name]}, path.name


def test_each_toy_world_has_its_dataset_and_recipes():
    """World N > 1: dataset `toyworld_vN` generates world N; every pretraining recipe
    `toy_<variant>_wN.yaml` (N > 2) is its world-2 twin `toy_<variant>_w2.yaml` with only `data.world`
    changed, and every downstream `toy_wN.yaml` is its tool's `toy.yaml` but for the world (so rows of
    different worlds compare)."""
    WORLDS = toyworld.WORLDS
    generated = {name: entry for name, entry in registry.datasets().items()
                 if entry.get("generate") == "toyworld" and "labels" in entry}
    assert set(generated) == {toyworld.dataset_name(w) for w in WORLDS}
    for name, entry in generated.items():
        world = int(entry.get("world", 1))
        assert name == toyworld.dataset_name(world)
        assert entry["prepare"].endswith(f"<data root>/{name}" + (f" --world {world}" if world > 1 else ""))
    recipes = PROJECT_DIR / "configs" / "pretrain"
    for world in (w for w in WORLDS if w > 2):
        for variant in ("clip", "silc_c"):
            assert (recipes / f"toy_{variant}{toyworld.recipe_suffix(world)}.yaml").exists(), (variant, world)
        for path in recipes.glob(f"toy_*{toyworld.recipe_suffix(world)}.yaml"):
            twin = path.with_name(path.name.replace(toyworld.recipe_suffix(world), toyworld.recipe_suffix(2)))
            this, twin = ({k: v for k, v in load_config(p).items() if not k.startswith("_config")} for p in (path, twin))
            assert this["data"].pop("world") == world and twin["data"].pop("world") == 2, path.name
            assert this == twin, path.name  # both ways: a setting dropped from either one fails
    # Downstream toy recipes (CAT-Seg, OWL, LiT-Decoder): world N's is toy.yaml with that world and
    # its own split folder under the world's name (a shared one would hand one world's cached split
    # to another), everything else equal, so their rows compare across worlds.
    for world in WORLDS:  # the CAT-Seg demo takes every world
        assert (PROJECT_DIR / "configs" / "cat_seg" / f"toy{toyworld.recipe_suffix(world)}.yaml").exists(), world
    for tool in ("cat_seg", "owl", "lit_decoder"):
        found = sorted(p.name for p in (PROJECT_DIR / "configs" / tool).glob("toy_w*.yaml"))
        assert "toy_w2.yaml" in found, tool
        for name in found:
            path = PROJECT_DIR / "configs" / tool / name
            world = int(path.stem.removeprefix("toy_w"))
            this, base = (yaml.safe_load(p.read_text()) for p in (path, path.with_name("toy.yaml")))
            split, base_split = this["data"]["toyworld"], base["data"]["toyworld"]
            assert split.pop("world") == world and "world" not in base_split, f"{tool}/{name}"
            root, _ = split.pop("root", None), base_split.pop("root", None)
            if tool != "lit_decoder":  # the others write their split to disk (LiT-Decoder renders in memory)
                assert root.startswith((toyworld.dataset_name(world) + "/", toyworld.dataset_name(world) + "_")), f"{tool}/{name}"
            assert this == base, f"{tool}/{name}"
    # Every generated toy split of world N is named and stored under world N's name.
    for name, entry in registry.datasets().items():
        if str(entry.get("generate", "")).startswith("toyworld"):
            world = int(entry.get("world", 1))
            assert name.startswith(toyworld.dataset_name(world)), name
            assert entry["root"].startswith(toyworld.dataset_name(world) + "/"), name
