"""LiT-Decoder evaluation (SILC Table 5): greedy decoding from a frozen encoder, scored per dataset kind.

- classification (ImageNet, SUN397, toy): exact match of the generated text with the class's first
  name (lower-cased, stripped);
- captioning (COCO Karpathy test): CIDEr-D with pycocoevalcap (Java needed, checked first);
- VQAv2: the official accuracy (ten answers, leave-one-out, its answer normalisation);
- GQA: exact match (testdev balanced), as GQA's evaluator scores.
Prompts are the decoder's own (recorded with it). Decoding is batched and greedy with a KV cache,
or beam search (`--protocol decoding=beam --protocol beams=4`); `max_new_tokens` is in the protocol. Shard results are the generated strings per example.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from silc_bench import registry
from silc_bench.data.loading import iterate
from silc_bench.data.transforms import ImageTransform
from silc_bench.errors import UserError
from silc_bench.harness.base import EXAMPLES, INDEX, Harness, open_first
from silc_bench.litdec.model import beam_search
from silc_bench.litdec.text import prompt_text
from silc_bench.metrics import text_answers

KIND_OF_ENTRY = {"classification": "classification", "captions": "captioning", "vqa": "vqa"}


@dataclass
class LitSetup:
    protocol: dict
    kind: str
    details: dict = field(default_factory=dict)


class _Item:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, item: dict) -> dict:
        return {"image": self.transform(item["image"]), "index": item["index"], "question": item.get("question")}


def open_lit_dataset(name: str, data_root, limit=None):
    entry = registry.dataset_entry(name)
    kind = entry.get("kind")
    if kind == "classification":
        from silc_bench.data.classification import open_split

        ds = open_split(entry, "test", data_root, limit)
    elif kind == "captions":
        from silc_bench.data.captions import KarpathyCaptions

        ds = KarpathyCaptions(entry, data_root, limit)
    elif kind == "vqa":
        from silc_bench.data.vqa import QuestionsDataset

        ds = QuestionsDataset(entry, data_root, limit)
    else:
        raise UserError(f"dataset {name!r} ({kind or 'segmentation'}) is not a lit-decoder dataset",
                        fix="use classification, captions or vqa datasets (silc-bench ls datasets)")
    ds.lit_kind = KIND_OF_ENTRY[kind]
    ds.spec = getattr(ds, "spec", None) or entry
    return ds


def decoding(protocol: dict) -> dict:
    """The decoding the protocol asks for, checked: greedy (batched, KV cache) or beam search."""
    method = protocol.get("decoding", "greedy")
    if method == "greedy":
        return {"method": "greedy", "kv_cache": True, "max_new_tokens": protocol["max_new_tokens"]}
    if method == "beam":
        return {"method": "beam", "beams": int(protocol.get("beams", 4)),
                "length_penalty": float(protocol.get("length_penalty", 0.0)), "max_new_tokens": protocol["max_new_tokens"]}
    raise UserError(f"unknown lit-decoder decoding {method!r}", fix="use --protocol decoding=greedy or decoding=beam")


class LitDecoderEval(Harness):
    model_loader = "litdec"

    def open_dataset(self, name, data_root, limit=None):
        entries = (self.task.get("dataset_entries") or {}).get(name) or [name]
        return open_first(entries, lambda entry: open_lit_dataset(entry, data_root, limit))

    def setup(self, model, dataset, protocol, device, cache=None):
        if dataset.lit_kind == "captioning":
            text_answers.java_or_error()  # fail before decoding, not after
        details = {"kind": dataset.lit_kind, "prompt": model.prompts.get(dataset.lit_kind),
                   "image_transform": ImageTransform(model.backbone.preprocess).describe(),
                   "decoding": decoding(protocol),
                   "scorer": {"classification": "exact match with the class's first name (lower-cased)",
                              "captioning": "CIDEr-D, pycocoevalcap PTB tokenizer + Cider (x100)",
                              "vqa": ("VQAv2 official accuracy" if dataset.spec.get("layout") == "vqav2"
                                      else "exact match (lower-cased)")}[dataset.lit_kind]}
        return LitSetup(protocol, dataset.lit_kind, details)

    @torch.inference_mode()
    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        codec, dec = model.codec, model.decoder
        texts, order, batch = [], [], []

        def flush():
            pixels = torch.stack([b["image"] for b in batch]).to(device)
            tokens = dec.image_tokens(pixels)
            prompts = [codec.encode(prompt_text(model.prompts, prepared.kind, b["question"])) for b in batch]
            p = prepared.protocol
            if p.get("decoding", "greedy") == "beam":
                out = beam_search(dec, tokens, prompts, bos=codec.bos, eos=codec.eos,
                                  max_new_tokens=int(p["max_new_tokens"]), beams=int(p.get("beams", 4)),
                                  length_penalty=float(p.get("length_penalty", 0.0)))
            else:
                out = dec.generate(tokens, prompts, bos=codec.bos, eos=codec.eos, pad=codec.pad,
                                   max_new_tokens=int(p["max_new_tokens"]))
            texts.extend(codec.decode(o) for o in out)
            order.extend(b["index"] for b in batch)
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        for item in iterate(dataset, list(indices), workers=workers, device=device,
                            transform=_Item(ImageTransform(model.backbone.preprocess))):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        return {EXAMPLES: {INDEX: torch.tensor(order, dtype=torch.long), "text": texts}}

    def finalize(self, dataset, merged, prepared):
        ex = merged.get(EXAMPLES) or {INDEX: torch.zeros(0, dtype=torch.long), "text": []}
        idx, texts = ex[INDEX].tolist(), ex["text"]
        if len(idx) != len(dataset):
            raise RuntimeError(f"lit-decoder finalize: {len(idx)} of {len(dataset)} examples decoded")
        kind = prepared.kind
        if kind == "classification":
            names = [dataset.classnames[dataset.labels[i]][0] for i in idx]
            acc = 100.0 * sum(text_answers.exact_match(t, n) for t, n in zip(texts, names)) / len(idx)
            metrics = {"score": acc, "accuracy": acc}
        elif kind == "captioning":
            refs = {i: [] for i in idx}
            for cap, i in zip(dataset.captions, dataset.caption_image):
                refs[i].append(cap)
            score, _ = text_answers.cider(dict(zip(idx, texts)), refs)
            metrics = {"score": score, "CIDEr": score}
        elif dataset.spec.get("layout") == "vqav2":
            acc = 100.0 * sum(text_answers.vqa_accuracy(t, dataset.answers[i]) for t, i in zip(texts, idx)) / len(idx)
            metrics = {"score": acc, "accuracy": acc}
        else:
            acc = 100.0 * sum(text_answers.exact_match(t, dataset.answers[i][0]) for t, i in zip(texts, idx)) / len(idx)
            metrics = {"score": acc, "accuracy": acc}
        metrics["num_examples"] = len(idx)
        samples = {str(i): t for i, t in list(zip(idx, texts))[:20]}  # a look at what was generated
        return metrics, {"generated_first_20": samples}
