"""Toy-world question answering for the LiT-Decoder tasks (paper Table 5), in the real layouts.

Questions are generated from a scene's instances, so every answer is known exactly:
- count ("how many kites?", "how many disks?"): the number of objects of that class or shape,
  as a digit (VQAv2's "number" answers are digits);
- presence ("is there a kite?"): yes / no, present and absent classes equally often;
- colour ("what colour is the kite?"): asked only of a class present once;
- relation ("what is left of the kite?"): asked only when exactly one other object lies wholly to
  the left of it (its box ends before this one's begins); the answer is that object's class.

Layouts:
- VQAv2: `vqa/v2_OpenEnded_mscoco_val2014_questions.json`, `vqa/v2_mscoco_val2014_annotations.json`
  (ten identical human answers per question), images `vqa/val2014/COCO_val2014_<12-digit id>.jpg`;
- GQA: `gqa/testdev_balanced_questions.json` ({question id: {imageId, question, answer, fullAnswer,
  types}}), images `gqa/images/<imageId>.jpg`.

Scenes are the toy world's validation stream at 64 px (the toy models' input size). Written once
with a manifest of the parameters, like the other toy splits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from silc_bench.data import toyworld
from silc_bench.data.toy_image_level import manifest_matches

VERSION = 1
SIZE = 64
NUM_IMAGES = 500
_QUESTION_STREAM = 8  # rng stream of the questions (not a scene stream)


def _things_of(scene) -> list[tuple[str, toyworld.Instance]]:
    return [(toyworld.CLASSES[i.class_id], i) for i in scene.instances]


def questions_for(scene, rng: np.random.Generator) -> list[dict]:
    """[{question, answer, type, answer_type}] for one scene; deterministic given rng."""
    things = _things_of(scene)
    names = [n for n, _ in things]
    out = []
    # count: a present class, then a shape
    name = names[int(rng.integers(len(names)))]
    out.append({"question": f"how many {toyworld.plural(name)}?", "answer": str(names.count(name)),
                "type": "count", "answer_type": "number"})
    shape = toyworld.SHAPES[int(rng.integers(len(toyworld.SHAPES)))]
    out.append({"question": f"how many {toyworld.plural(shape)}?",
                "answer": str(sum(i.shape == shape for _, i in things)), "type": "count", "answer_type": "number"})
    # presence: half present, half absent
    if rng.random() < 0.5:
        ask, answer = names[int(rng.integers(len(names)))], "yes"
    else:
        absent = [n for n in toyworld.THING_CLASSES if n not in names]
        ask, answer = absent[int(rng.integers(len(absent)))], "no"
    out.append({"question": f"is there a {ask}?", "answer": answer, "type": "exist", "answer_type": "yes/no"})
    # colour: a class present once
    once = [n for n in names if names.count(n) == 1]
    if once:
        n = once[int(rng.integers(len(once)))]
        inst = things[names.index(n)][1]
        out.append({"question": f"what colour is the {n}?", "answer": inst.colour, "type": "colour",
                    "answer_type": "other"})
    # relation: the one object wholly left of a class present once
    for n in rng.permutation(once).tolist() if once else []:
        inst = things[names.index(n)][1]
        left = [m for m, j in things if j is not inst and j.box[2] <= inst.box[0]]
        if len(left) == 1:
            out.append({"question": f"what is left of the {n}?", "answer": left[0], "type": "relation",
                        "answer_type": "other"})
            break
    return out


def write_vqa(root: Path, seed: int = 0, world: int = toyworld.DEFAULT_WORLD, num_images: int = NUM_IMAGES) -> Path:
    """VQAv2 and GQA layouts under `root/vqa` and `root/gqa`; returns `root`."""
    root = Path(root)
    params = {"version": VERSION, "world": toyworld.get_world(world).version, "seed": seed, "size": SIZE,
              "images": num_images}
    if manifest_matches(root / "qa_manifest.json", params):
        return root
    vqa_img, gqa_img = root / "vqa" / "val2014", root / "gqa" / "images"
    vqa_img.mkdir(parents=True, exist_ok=True)
    gqa_img.mkdir(parents=True, exist_ok=True)
    questions, annotations, gqa = [], [], {}
    for i in range(num_images):
        scene = toyworld.render(i, seed=seed, size=SIZE, split="validation", world=world)
        image_id = i + 1
        toyworld.save_image(vqa_img / f"COCO_val2014_{image_id:012d}.jpg", scene.image, jpeg_quality=95)
        toyworld.save_image(gqa_img / f"toy{image_id}.jpg", scene.image, jpeg_quality=95)
        rng = np.random.default_rng([_QUESTION_STREAM, seed, i])
        for j, q in enumerate(questions_for(scene, rng)):
            qid = image_id * 100 + j
            questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": q["type"],
                                "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                                "answers": [{"answer": q["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                                            for k in range(10)]})
            gqa[str(qid)] = {"imageId": f"toy{image_id}", "question": q["question"], "answer": q["answer"],
                             "fullAnswer": q["answer"], "types": {"structural": q["type"], "semantic": q["type"],
                                                                  "detailed": q["type"]}}
    info = {"description": "silc-bench toy world questions", **params}
    files = {root / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json":
             {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
              "questions": questions},
             root / "vqa" / "v2_mscoco_val2014_annotations.json":
             {"info": info, "data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations},
             root / "gqa" / "testdev_balanced_questions.json": gqa}
    for path, data in files.items():
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    (root / "qa_manifest.json").write_text(json.dumps(params))
    return root


def ensure(entry: dict, data_root: Path) -> None:
    """Write the question splits an entry names (`generate: toyworld_qa`; its root is `<base>/vqa` or
    `<base>/gqa`) under the data root if not there yet."""
    import sys

    from silc_bench import paths

    base = Path(data_root) / Path(entry["root"]).parent
    if not (base / "qa_manifest.json").exists():
        print(f"silc-bench: generating the toy question splits {entry['name']!r} (first use) in {base}; to write "
              f"them elsewhere pass --data-root DIR or set ${paths.DATA_ENV}", file=sys.stderr, flush=True)
    write_vqa(base, world=entry.get("world", toyworld.DEFAULT_WORLD))


def main(argv=None) -> None:
    """`python -m silc_bench.data.toy_vqa ROOT [--world 2]`: write the question splits under ROOT."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root")
    ap.add_argument("--world", type=int, default=toyworld.DEFAULT_WORLD)
    ap.add_argument("--num-images", type=int, default=NUM_IMAGES)
    a = ap.parse_args(argv)
    print(write_vqa(Path(a.root), world=a.world, num_images=a.num_images))


if __name__ == "__main__":
    main()



def decoder_tokenizer_corpus(num_scenes: int = 3000, seed: int = 0) -> list[str]:
    """Text for the toy LiT-Decoder's tokenizer: the captions corpus plus every question and answer
    of `num_scenes` training scenes, class names and the digits (fixed order: deterministic)."""
    lines = list(toyworld.tokenizer_corpus())
    for world in (1, 2):
        for i in range(num_scenes):
            scene = toyworld.render(i, seed=seed, size=SIZE, split="train", world=world)
            for q in questions_for(scene, np.random.default_rng([_QUESTION_STREAM, seed, i])):
                lines += [q["question"], q["answer"]]
    lines += list(toyworld.CLASSES) + [str(d) for d in range(10)]
    return lines


def train_decoder_tokenizer(out_path, vocab_size: int = 320) -> Path:
    """The toy LiT-Decoder's sentencepiece model (BPE; pad 0, eos 1, unk 2, no bos), byte-identical
    across runs (single thread, unshuffled corpus, written without its path):
    `python -c "from silc_bench.data.toy_vqa import train_decoder_tokenizer as t; t('silc_bench/assets/toyworld_decoder_sp.model')"`."""
    import io

    import sentencepiece as spm

    out = Path(out_path)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(decoder_tokenizer_corpus()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    out.write_bytes(buf.getvalue())
    return out
