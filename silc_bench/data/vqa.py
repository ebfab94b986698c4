"""Question answering datasets in their release layouts (LiT-Decoder, SILC Table 5).

- `vqav2`: `<root>/v2_OpenEnded_mscoco_<subtype>_questions.json` and `v2_mscoco_<subtype>_annotations.json`
  (ten human answers per question), images `<root>/<subtype>/COCO_<subtype>_<12-digit image id>.jpg`;
- `gqa`: `<root>/<questions file>` ({question id: {imageId, question, answer, ...}}, e.g.
  `testdev_balanced_questions.json`), images `<root>/images/<imageId>.jpg`.
Items: {"image": uint8 [3, H, W], "index", "question"}; `answers` (ten per question for VQAv2,
one for GQA) and `question_ids` are attributes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from silc_bench import paths
from silc_bench.data.classification import decode_rgb
from silc_bench.errors import UserError


def _read_json(path: Path, name: str, fix: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset {name!r}: file not found", path=path, fix=fix) from None
    except (OSError, ValueError) as e:
        raise UserError(f"dataset {name!r}: not valid JSON ({e})", path=path, fix=fix) from None


class QuestionsDataset(torch.utils.data.Dataset):
    def __init__(self, entry: dict, data_root, limit: int | None = None):
        self.name, self.spec = entry["name"], dict(entry)
        if entry.get("generate"):
            from silc_bench.data import toy_vqa

            toy_vqa.ensure(entry, paths.data_root(data_root))
        root = self.root = paths.data_root(data_root) / entry["root"]
        fix = f"put the release there ({entry.get('prepare', 'see configs/datasets.yaml')})"
        self._fix = fix
        layout = entry.get("layout")
        self.questions, self.answers, self.question_ids, self.files = [], [], [], []
        try:
            if layout == "vqav2":
                sub = entry.get("subtype", "val2014")
                qs = _read_json(root / f"v2_OpenEnded_mscoco_{sub}_questions.json", self.name, fix)["questions"]
                anns = _read_json(root / f"v2_mscoco_{sub}_annotations.json", self.name, fix)["annotations"]
                by_id = {a["question_id"]: a for a in anns}
                for q in sorted(qs, key=lambda q: q["question_id"]):
                    self.question_ids.append(int(q["question_id"]))
                    self.questions.append(q["question"])
                    self.answers.append([a["answer"] for a in by_id[q["question_id"]]["answers"]])
                    self.files.append(root / sub / f"COCO_{sub}_{int(q['image_id']):012d}.jpg")
            elif layout == "gqa":
                qs = _read_json(root / entry["questions"], self.name, fix)
                for qid in sorted(qs):
                    q = qs[qid]
                    self.question_ids.append(qid)
                    self.questions.append(q["question"])
                    self.answers.append([q["answer"]])
                    self.files.append(root / entry.get("images", "images") / f"{q['imageId']}.jpg")
            else:
                raise UserError(f"dataset {self.name!r} has layout {layout!r}", path=paths.CONFIGS_DIR / "datasets.yaml",
                                fix="use vqav2 or gqa")
        except (KeyError, TypeError) as e:
            raise UserError(f"dataset {self.name!r}: question files lack {e} (not the {layout} format)", path=root,
                            fix=fix) from None
        if limit is not None:
            for attr in ("questions", "answers", "question_ids", "files"):
                setattr(self, attr, getattr(self, attr)[:limit])
        if not self.questions:
            raise UserError(f"dataset {self.name!r}: no questions", path=root, fix=fix)

    def describe(self) -> dict:
        return {"layout": self.spec.get("layout"), "num_questions": len(self.questions)}

    def __len__(self):
        return len(self.questions)

    def __getitem__(self, index: int) -> dict:
        return {"image": decode_rgb(self.files[index], self.name, self._fix), "index": index,
                "question": self.questions[index]}
