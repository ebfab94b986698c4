"""The one model interface every harness talks to.

Harnesses call only what is defined here; they never reach into tower internals. Each checkpoint
format (big_vision, open_clip, hf) returns a subclass of `VisionLanguageModel`.
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass

import torch
from torch import nn

from silc_bench.errors import UserError


@dataclass(frozen=True)
class Preprocess:
    """How raw RGB images become the pixels a model expects.

    `resize`: "squash" resizes to `image_size` ignoring aspect ratio (big_vision / SigLIP);
    "shortest" resizes the short side and centre-crops (OpenAI CLIP / open_clip).
    Dense harnesses only use `normalize` (they do their own resizing and cropping).
    """

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bilinear"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """NCHW float images in [0, 1] -> the model's input range."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)


BIG_VISION_PREPROCESS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash", interpolation="bilinear")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Tokenizer(abc.ABC):
    """Text -> token ids of a fixed context length; `describe()` goes into every result record."""

    context_length: int

    @abc.abstractmethod
    def __call__(self, texts: list[str]) -> torch.Tensor:  # [B, context_length] int64
        ...

    @abc.abstractmethod
    def describe(self) -> dict:  # kind, file, sha256, settings
        ...


FINETUNE_SCOPES = ("qv", "attention+pos")
TOWERS = ("image", "text")


def resolve_blocks(blocks, depth: int) -> list[int]:
    """Block indices (None = all; negative from the end) -> sorted non-negative indices, checked."""
    if blocks is None:
        return list(range(depth))
    out = set()
    for b in blocks:
        i = int(b) + depth if int(b) < 0 else int(b)
        if not 0 <= i < depth:
            raise ValueError(f"block index {b} is out of range for a tower of {depth} blocks")
        out.add(i)
    return sorted(out)


def check_finetune_args(towers, scope) -> tuple[str, ...]:
    towers = tuple(towers)
    if not towers or set(towers) - set(TOWERS):
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {towers}")
    if scope not in FINETUNE_SCOPES:
        raise ValueError(f"unknown fine-tuning scope {scope!r}; choose one of {FINETUNE_SCOPES}")
    return towers


class DenseModeError(UserError, ValueError):
    """A dense mode the model does not offer: bad input (UserError), and a ValueError for callers."""


class VisionLanguageModel(nn.Module, abc.ABC):
    """A two-tower model as harnesses see it.

    Embeddings are returned un-normalised. `dense_features` is in the same space as
    `encode_image`, so cosine(dense patch, text) is meaningful. Dense modes are named strings
    (`dense_modes`); every result records the one used.
    """

    tokenizer: Tokenizer
    preprocess: Preprocess
    patch_size: int
    dense_modes: tuple[str, ...] = ()
    default_dense_mode: str = ""

    def __init__(self):
        super().__init__()
        # Filled by the loader: format, source path or name, sha256, architecture facts.
        self.provenance: dict = {}

    @abc.abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, D]
        ...

    @abc.abstractmethod
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:  # [B, D]
        ...

    @abc.abstractmethod
    def dense_features(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:  # [B, h, w, D]
        ...

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_image_pre_logits(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, W]
        """The image tower's representation before its final projection (big_vision's
        `img/pre_logits`, what few-shot probes read). Formats that cannot expose it raise
        NotImplementedError; the few-shot harness then uses `encode_image` and records so."""
        raise NotImplementedError(f"{type(self).__name__} does not expose pre-logits")

    def dense_features_with_intermediates(
        self, pixels: torch.Tensor, mode: str | None = None, blocks: tuple[int, ...] | None = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`dense_features` plus image-tower patch tokens after some blocks, from one forward pass.

        -> (dense [B, h, w, D], {block: [B, h, w, W]}). A block's tokens are the residual stream
        right after that block (no final norm; prefix tokens dropped), as CAT-Seg's decoder
        guidance hooks read them. `blocks` index the tower's blocks from 0 (negative from the end;
        keys are the non-negative index); None = every block. Differentiable: trainers call it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not offer intermediate block outputs")

    def detection_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """What an OWL-ViT detector reads: every image-tower token after the tower's final
        LayerNorm, before any pooling or projection.

        -> (patch tokens [B, h, w, W], the image's global token [B, W] or None, its kind): kind
        "cls" (the class token, CLIP-style), "map" (the MAP head's pooled output before
        pre-logits / head, SigLIP-style: these towers have no class token) or "none".
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its image tokens for detection")

    def qv_parameters(self, towers: tuple[str, ...] = ("image", "text"),
                      scope: str = "qv") -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs, names as in `self.named_parameters()`, that a fine-tune trains.

        scope "qv": query and value projection weights and biases of every transformer block of
        the chosen towers ("image", "text"); pooling heads (MAP, attention pool) are not blocks.
        scope "attention+pos": every attention parameter of those blocks plus the towers'
        position embeddings. Formats whose q/k/v live in one fused tensor split it into three
        parameters on first call (outputs unchanged); see each format's implementation.
        """
        raise NotImplementedError(f"{type(self).__name__} does not name its attention parameters")

    @property
    @abc.abstractmethod
    def logit_scale(self) -> float | None:
        ...

    @property
    @abc.abstractmethod
    def logit_bias(self) -> float | None:
        ...

    def check_dense_mode(self, mode: str | None) -> str:
        mode = mode or self.default_dense_mode
        if mode not in self.dense_modes:
            offered = ", ".join(self.dense_modes) or "none (this model has no dense path)"
            example = self.dense_modes[0] if self.dense_modes else "NAME"
            raise DenseModeError(
                f"dense mode {mode!r} is not offered by this model ({type(self).__name__}); offered: {offered}",
                fix=f"pass one of the offered modes with --dense-mode NAME or --protocol dense_mode=NAME "
                    f"(e.g. --dense-mode {example}), or leave both out for the default "
                    f"({self.default_dense_mode or 'none'})")
        return mode

    def describe(self) -> dict:
        """Everything a result record needs to say which model produced it."""
        return {
            **self.provenance,
            "tokenizer": self.tokenizer.describe(),
            "preprocess": self.preprocess.to_dict(),
            "patch_size": self.patch_size,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
        }


def image_token_width(model: VisionLanguageModel) -> int:
    """The width of `model.detection_tokens` (what heads on the image tokens are sized by), from
    one forward of a one-patch image."""
    p = model.patch_size
    with torch.inference_mode():
        dev = next(model.parameters()).device
        return int(model.detection_tokens(torch.zeros(1, 3, p, p, device=dev))[0].shape[-1])
