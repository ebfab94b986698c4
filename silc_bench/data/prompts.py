"""Prompt templates for zero-shot classification / segmentation text embeddings.

Templates are data: a result records the set's name and `prompt_set_hash`, so a silently edited
template list shows up as a different hash.
"""
from __future__ import annotations

import hashlib
import json

from silc_bench.errors import UserError

# The 80 templates of CLIP's notebook "Prompt_Engineering_for_ImageNet" (openai/CLIP), in its
# order; identical to open_clip's `zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES` (tested).
OPENAI_IMAGENET_80 = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

# TCL's evaluation set (kakaobrain/tcl configs/eval.yml `template: custom`, datasets/templates.py
# at bc2b551): its 7-template "sub_imagenet_template" (note "a bad photo of a {}." where CLIP's
# 7-template selection has "the") plus two plural-ish prompts.
TCL_9 = [
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
]

A_PHOTO_OF = ["a photo of a {}."]

# big_vision's zero-shot classifier default, `prompt_templates="clip_paper"`: the 80 CLIP templates
# plus the bare class name (google-research/big_vision evaluators/proj/image_text/prompt_engineering.py).
CLIP_PAPER_81 = OPENAI_IMAGENET_80 + ["{}"]

# The toy world's own set (silc_bench/data/toyworld.py): worded as its captions are, with only
# words its 256-piece tokenizer was trained on (the 80 templates' words are split into letters).
TOYWORLD = ["{}.", "a {}.", "a photo of a {}.", "a picture of a {}."]

# OWL-ViT / OWLv2 evaluation queries: scenic's `CLIP_BEST_PROMPT_TEMPLATES` (owl_vit/preprocessing/
# label_ops.py), no bare "{}"; the evaluator averages the class *logits* over them.
OWL_BEST_7 = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

TEMPLATE_SETS: dict[str, list[str]] = {
    "openai_imagenet_80": OPENAI_IMAGENET_80,
    "clip_paper": CLIP_PAPER_81,
    "class_name_only": ["{}"],
    "tcl_9": TCL_9,
    "a_photo_of": A_PHOTO_OF,
    "toyworld": TOYWORLD,
    "owl_best_7": OWL_BEST_7,
}


def get_templates(name: str) -> list[str]:
    """A copy of the named template set (each template has one `{}` for the class name)."""
    if name not in TEMPLATE_SETS:
        raise UserError(
            f"unknown prompt template set {name!r}",
            fix=f"use one of: {', '.join(TEMPLATE_SETS)} (protocol key `templates`)",
        )
    return list(TEMPLATE_SETS[name])


def prompt_set_hash(templates: list[str]) -> str:
    """sha256 of the ordered template list (order matters only for reproducibility of floats)."""
    blob = json.dumps(list(templates), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def canonicalize_text(text: str, keep: str = "") -> str:
    """big_vision's `prompt_engineering.canonicalize_text` rule: `_` -> space, ASCII punctuation
    removed (except the characters in `keep`: "{}" in templates, "," in class names with
    aliases), lowercased, whitespace collapsed and stripped. open_clip's SigLIP tokenizer applies
    the same rule ("canonicalize")."""
    import string

    drop = "".join(c for c in string.punctuation if c not in keep)
    text = text.replace("_", " ").translate(str.maketrans("", "", drop)).lower()
    return " ".join(text.split())


def owl_canonicalize(name: str) -> str:
    """scenic's `_canonicalize_string` for detection class names: lowercase, every character outside
    [a-z0-9-# ] -> space (so "_", "(" and ")" too), runs of spaces and of dashes collapsed, stripped."""
    import re

    text = re.sub(r"[^a-z0-9\-# ]", " ", name.lower())
    text = re.sub(r" +", " ", re.sub(r"-+", "-", text))
    return text.strip()
