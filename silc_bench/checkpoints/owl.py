"""`--model` for ov-det: an OWL detector (backbone + detection heads).

Specs:
- `hf:DIR`, a transformers `Owlv2ForObjectDetection.save_pretrained` directory: the released OWLv2
  heads on its CLIP backbone (weights as saved; no conversion step).
- a directory written by `silc-bench train owl-det` (`owl_detector.json` + `heads.safetensors`):
  heads trained on a named backbone spec, loaded through `load_model`.
- `untrained:SPEC`: fresh heads on any `load_model` spec, for smoke tests and timing only: records
  say `heads: untrained` and the numbers mean nothing.
"""
from __future__ import annotations

import json
from pathlib import Path


from silc_bench.checkpoints import load_head_weights, load_model
from silc_bench.detection.owl import OwlDetector
from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file

DETECTOR_FILE, HEADS_FILE = "owl_detector.json", "heads.safetensors"


def from_hf_owlv2(backbone) -> OwlDetector:
    """The released heads of an OWLv2 `hf:` checkpoint on its own backbone."""
    heads = backbone.owl_heads
    state = heads["state_dict"]
    det = OwlDetector(backbone, width=state["layer_norm.weight"].shape[0],
                      embed_dim=state["class_head.dense0.weight"].shape[0], merge="mul-ln",
                      layer_norm_eps=heads["layer_norm_eps"], objectness="objectness_head.dense0.weight" in state)
    missing, unexpected = load_head_weights(det, state)
    if missing or unexpected:
        raise RuntimeError(f"OWLv2 head weights do not fit: missing {missing}, unexpected {unexpected}")
    det.provenance = {"heads": "released (hf Owlv2ForObjectDetection)"}
    return det.to(next(backbone.parameters()).device)


def save_detector(det: OwlDetector, directory, backbone_spec: str, backbone_weights=(),
                  extra: dict | None = None) -> Path:
    """Heads (+ the fine-tuned backbone weights named in `backbone_weights`) as safetensors, and
    how to rebuild the detector; the backbone checkpoint itself is never written. Both atomic."""
    from safetensors.torch import save

    from silc_bench.results.record import atomic_write_bytes, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keep = set(backbone_weights)
    state = {k: v.detach().cpu().contiguous() for k, v in det.state_dict().items()
             if not k.startswith("backbone.") or k in keep}
    atomic_write_bytes(directory / HEADS_FILE, save(state))
    meta = {"backbone": backbone_spec, "merge": det.merge, "width": det.width, "embed_dim": det.embed_dim,
            "objectness_head": det.objectness_head is not None,
            "layer_norm_eps": None if det.layer_norm is None else det.layer_norm.eps,
            "heads_sha256": sha256_file(directory / HEADS_FILE), **(extra or {})}
    atomic_write_text(directory / DETECTOR_FILE, json.dumps(meta, indent=1, sort_keys=True))
    return directory


def load_owl(spec: str, *, checkpoint_dir=None, tokenizer=None, device="cpu", **options) -> OwlDetector:
    spec = str(spec)
    if spec.startswith("untrained:"):
        backbone = load_model(spec[len("untrained:"):], checkpoint_dir=checkpoint_dir, tokenizer=tokenizer,
                              device=device, **options)
        det = OwlDetector.for_backbone(backbone)
        det.provenance = {"heads": "untrained"}
    elif Path(spec).is_dir() and (Path(spec) / DETECTOR_FILE).is_file():
        from safetensors.torch import load_file

        directory = Path(spec)
        try:
            meta = json.loads((directory / DETECTOR_FILE).read_text())
            backbone_spec = meta["backbone"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot read {directory / DETECTOR_FILE}: {e}", path=directory / DETECTOR_FILE,
                            fix="re-run silc-bench train owl-det, which writes it") from e
        if not (directory / HEADS_FILE).is_file():
            raise UserError(f"{directory} has no {HEADS_FILE}", path=directory / HEADS_FILE,
                            fix="re-run silc-bench train owl-det (or --resume it) to write the heads")
        backbone = load_model(backbone_spec, checkpoint_dir=checkpoint_dir, tokenizer=tokenizer, device=device)
        if meta.get("finetune", "none") != "none":  # name the tuned weights as the trainer did (split q/k/v)
            backbone.qv_parameters(("image",), meta["finetune"])
        det = OwlDetector(backbone, width=meta["width"], embed_dim=meta["embed_dim"], merge=meta["merge"],
                          layer_norm_eps=meta.get("layer_norm_eps") or 1e-6, objectness=meta["objectness_head"])
        state = load_file(str(directory / HEADS_FILE))
        missing, unexpected = load_head_weights(det, state)
        if missing or unexpected:
            raise UserError(f"{directory / HEADS_FILE} does not fit {DETECTOR_FILE}: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}", path=directory / HEADS_FILE,
                            fix="use the heads file written together with this owl_detector.json")
        det.provenance = {"heads": "trained", "heads_sha256": sha256_file(directory / HEADS_FILE),
                          "finetune": meta.get("finetune", "none"), "training": meta.get("training")}
        det = det.to(device)
    else:
        backbone = load_model(spec, checkpoint_dir=checkpoint_dir, tokenizer=tokenizer, device=device, **options)
        if getattr(backbone, "owl_heads", None) is None:
            raise UserError(f"model {spec!r} has no detection heads",
                            fix="pass a directory written by `silc-bench train owl-det`, an hf: OWLv2 directory, "
                                "or untrained:SPEC for a timing run with fresh heads")
        det = from_hf_owlv2(backbone)
    det.provenance["spec"] = spec
    return det.eval()
