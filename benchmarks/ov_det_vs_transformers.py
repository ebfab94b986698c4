"""ov-det evaluation against transformers' OWLv2 pipeline on the same model and images (one run).

Both sides score every class with the 7 OWL templates and keep scenic's detections (logits averaged
over templates, top 300 over patch x class); they differ in how they get there:
- transformers, as its OWLv2 docs use it: per image `Owlv2Processor(text=queries, images=image)`
  (pad to a square, resize), `Owlv2ForObjectDetection(**inputs)` with all C x 7 query texts, which
  runs the text tower for every image; then the mean over templates and the top 300 here.
- silc-bench: the ov-det harness's `evaluate` on the same model loaded through `hf:` (text
  embeddings once per run, images resized with padding in the data path, batches of images).
The model is a random-weight `Owlv2ForObjectDetection` saved with save_pretrained (the cost does not
depend on the weights): `--arch tiny` (width 192, 4 layers, 384 px; CPU-sized) or `--arch b16`
(OWLv2 B/16 sizes, 960 px; for GPUs). The script prints how far the two sides' top-300 scores differ
(their resize steps differ), then per-image times.

    python benchmarks/ov_det_vs_transformers.py [--arch tiny] [--images 4] [--classes 80] [--device cpu]

Last line: `speedup_vs_transformers=X` (X > 1: the harness is faster per image).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from silc_bench.checkpoints.owl import load_owl
from silc_bench.data.prompts import OWL_BEST_7
from silc_bench.detection.owl import top_k_detections
from silc_bench.harness import get_harness
from silc_bench.registry import task_spec

ARCHS = {
    "tiny": dict(vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                             image_size=384, patch_size=16),
                 text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2),
                 projection_dim=128),
    "b16": dict(vision=dict(image_size=960, patch_size=16), text=dict(), projection_dim=512),
}


def write_model(directory: Path, arch: str, words: set[str]) -> Path:
    """A random model and a CLIP BPE tokenizer whose merges spell each of `words` as one token
    (so every query fits OWL's 16-token text length)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection

    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for c in "abcdefghijklmnopqrstuvwxyz.":
        for tok in (c, c + "</w>"):
            vocab.setdefault(tok, len(vocab))
    for w in sorted(words):
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab[s] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    a = ARCHS[arch]
    text = dict(vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=0, **a["text"])
    torch.manual_seed(0)
    Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=a["vision"],
                                        projection_dim=a["projection_dim"])).eval().save_pretrained(directory)
    return directory


class Images(torch.utils.data.Dataset):
    def __init__(self, images, classnames):
        self.images, self.classnames = images, classnames
        self.federated, self.category_ids = False, list(range(1, len(classnames) + 1))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        im = self.images[i]
        return {"image": im, "index": i, "image_id": i + 1, "height": im.shape[1], "width": im.shape[2]}


@torch.inference_mode()
def transformers_loop(model, processor, images, queries, k=300, device="cpu"):
    out = []
    t0 = time.perf_counter()
    for im in images:
        inputs = processor(text=[queries], images=im.permute(1, 2, 0).numpy(), return_tensors="pt",
                           padding="max_length", max_length=16, truncation=True).to(device)
        r = model(**inputs)
        logits = r.logits[0].reshape(r.logits.shape[1], len(OWL_BEST_7), -1).mean(1)
        s, lab, _ = top_k_detections(logits, r.pred_boxes[0], k)
        out.append((s.cpu(), lab.cpu()))
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args(argv)
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 480, 640), dtype=np.uint8)) for _ in range(args.images)]
    names = ["".join(rng.choice(list("abcdefghij"), 5)) for _ in range(args.classes)]
    queries = [t.format(n) for n in names for t in OWL_BEST_7]  # class-major: logits reshape to [P, C, 7]
    with tempfile.TemporaryDirectory() as tmp:
        words = {w for q in queries for w in q.replace(".", " .").split()}
        directory = write_model(Path(tmp), args.arch, words)
        size = ARCHS[args.arch]["vision"]["image_size"]
        ref = Owlv2ForObjectDetection.from_pretrained(str(directory), use_safetensors=True).eval().to(args.device)
        from transformers import CLIPTokenizer

        processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": size, "width": size}),
                                   tokenizer=CLIPTokenizer.from_pretrained(str(directory)))
        det = load_owl(f"hf:{directory}", device=args.device)
        harness = get_harness(task_spec("ov-det"))
        dataset = Images(images, [[n] for n in names])
        protocol = {**harness.task["protocol"], "input_size": size}
        transformers_loop(ref, processor, images[:1], queries, device=args.device)  # warm-up
        t_hf, hf = transformers_loop(ref, processor, images, queries, device=args.device)

        t0 = time.perf_counter()
        prepared = harness.setup(det, dataset, protocol, args.device)
        bs = args.batch_size or harness.default_batch_size(det, prepared, args.device)
        harness.evaluate(det, dataset, prepared, [0], device=args.device, batch_size=bs)  # warm-up
        t0 = time.perf_counter()
        prepared = harness.setup(det, dataset, protocol, args.device)
        ours = harness.evaluate(det, dataset, prepared, range(len(images)), device=args.device, batch_size=bs)
        t_ours = time.perf_counter() - t0
    ex = ours["examples"]
    for i, (s, lab) in enumerate(hf):
        # the resize paths differ (transformers: pad 0.5, gaussian antialias + scipy zoom; scenic's
        # evaluator: bilinear, pad 0.0), so the scores agree only up to that; with random weights
        # many scores nearly tie, so labels are not compared
        print(f"image {i}: max |score difference| over the top 300: {float((ex['scores'][i] - s).abs().max()):.4f}")
    n = len(images)
    print(f"transformers OWLv2 pipeline: {t_hf / n * 1000:.1f} ms/image ({args.classes} classes x 7 templates)")
    print(f"silc-bench ov-det harness:   {t_ours / n * 1000:.1f} ms/image (batch {bs}, text embedded once)")
    print(f"speedup_vs_transformers={t_hf / t_ours:.3f}")


if __name__ == "__main__":
    main()
