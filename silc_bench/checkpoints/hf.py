"""transformers SigLIP / CLIP `save_pretrained` directories behind the common interface.

Weights load from safetensors only (`use_safetensors=True`, local files only, no remote code).
Embeddings are `get_image_features` / `get_text_features`. Dense modes (MAP values: the SILC paper,
arXiv 2310.13355, "grounding emerges in the values of the MAP head"; MaskCLIP: github.com/chongzhou96/MaskCLIP):
SigLIP "map_value" (the MAP head's value path applied to each token alone, + its MLP residual),
"map_value_no_mlp", "tokens"; CLIP "maskclip" (last block with self-only attention) and "tokens".
At input sizes other than the native one, position embeddings come from transformers'
`interpolate_pos_encoding=True` (bicubic, align_corners=False, no antialias, class position kept).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_dir, sha256_file, sha256_json
from silc_bench.models.base import OPENAI_MEAN, OPENAI_STD, Preprocess, Tokenizer, VisionLanguageModel

FAMILIES = {
    # model_type -> (transformers class name, dense modes (first = default), family preprocess defaults)
    "siglip": ("SiglipModel", ("map_value", "map_value_no_mlp", "tokens"),
               dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="squash", interpolation="bicubic")),
    "clip": ("CLIPModel", ("maskclip", "tokens"),
             dict(mean=OPENAI_MEAN, std=OPENAI_STD, resize="shortest", interpolation="bicubic")),
    # A released OWLv2 detector: its CLIP backbone is the model; the detection heads ride along
    # (`owl_heads`) for silc_bench/checkpoints/owl.py. Its processor resizes with padding (ov-det does).
    "owlv2": ("Owlv2ForObjectDetection", ("tokens",),
              dict(mean=OPENAI_MEAN, std=OPENAI_STD, resize="squash", interpolation="bilinear")),
}
OWL_HEAD_PREFIXES = ("class_head.", "box_head.", "objectness_head.", "layer_norm.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json")
POS_INTERP = "transformers interpolate_pos_encoding (bicubic, align_corners=False, antialias=False)"
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _mha_value(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """out_proj(v_proj(x)): an nn.MultiheadAttention whose query sees only key x."""
    d = mha.embed_dim
    w = mha.in_proj_weight[2 * d:] if mha._qkv_same_embed_dim else mha.v_proj_weight
    b = mha.in_proj_bias[2 * d:] if mha.in_proj_bias is not None else None
    return mha.out_proj(F.linear(x, w, b))


def _layer_out(out) -> torch.Tensor:
    """Encoder layers return a tensor in transformers 5.x and a tuple in 4.x."""
    return out[0] if isinstance(out, tuple) else out


def _maskclip_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder layer with each token attending only to itself (MaskCLIP)."""
    x = x + layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x)))
    return x + layer.mlp(layer.layer_norm2(x))


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4.x and an output object in 5.x."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"unexpected features output {type(out).__name__} without pooler_output")
    return pooled


class HFTokenizer(Tokenizer):
    """A transformers tokenizer padded to the text tower's full length (as SigLIP and CLIP were trained)."""

    def __init__(self, tok, directory: Path, context_length: int):
        self._tok = tok
        self.directory = Path(directory)
        self.context_length = int(context_length)
        files = {n: sha256_file(self.directory / n) for n in TOKENIZER_FILES if (self.directory / n).is_file()}
        self._files_sha = sha256_json(files)
        self._files = sorted(files)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self._tok(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                        return_tensors="pt")
        return enc["input_ids"].long()

    def describe(self) -> dict:
        return {"kind": "hf", "class": type(self._tok).__name__, "path": str(self.directory),
                "files": self._files, "sha256": self._files_sha, "context_length": self.context_length,
                "padding": "max_length"}


def _preprocess(directory: Path, model_type: str, native: int) -> Preprocess:
    """preprocessor_config.json if present, else the family's transformers image-processor defaults."""
    d = dict(FAMILIES[model_type][2])
    size = (native, native)
    path = directory / "preprocessor_config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path.name}: {e}", path=path, fix="restore the file or delete it") from e
        if cfg.get("image_mean") is not None:
            d["mean"] = tuple(float(x) for x in cfg["image_mean"])
        if cfg.get("image_std") is not None:
            d["std"] = tuple(float(x) for x in cfg["image_std"])
        r = cfg.get("resample")
        if r is not None:
            d["interpolation"] = _PIL_RESAMPLE.get(r, str(r).lower()) if not isinstance(r, str) else r.lower()
        s = cfg.get("size")
        crop = cfg.get("crop_size")
        if isinstance(s, dict) and "shortest_edge" in s:
            d["resize"] = "shortest"
            c = crop if isinstance(crop, dict) else {"height": s["shortest_edge"], "width": s["shortest_edge"]}
            size = (int(c["height"]), int(c["width"])) if isinstance(c, dict) else (int(c), int(c))
        elif isinstance(s, dict) and "height" in s:
            d["resize"] = "squash"
            size = (int(s["height"]), int(s["width"]))
        elif isinstance(s, int):
            size = (s, s)
    return Preprocess(image_size=size, **d)


class HFModel(VisionLanguageModel):
    """A transformers SiglipModel, CLIPModel or OWLv2's CLIP backbone as a `VisionLanguageModel`."""

    def __init__(self, model: nn.Module, model_type: str, tokenizer: Tokenizer, preprocess: Preprocess,
                 provenance: dict | None = None):
        super().__init__()
        if model_type not in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is not one of {sorted(FAMILIES)}")
        self.model = model.eval()
        self.model_type = model_type
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        vc = model.config.vision_config
        self.patch_size = int(vc.patch_size)
        self.native_size = int(vc.image_size)
        self.dense_modes = FAMILIES[model_type][1]
        self.default_dense_mode = self.dense_modes[0]
        self.provenance = {"format": "hf", "model_type": model_type, **(provenance or {}),
                           "pos_embed_interpolation": POS_INTERP}
        self.owl_heads: dict | None = None  # OWLv2 only: {"state_dict", "layer_norm_eps"} (not a submodule)

    def _interp(self, pixels: torch.Tensor) -> bool:
        return tuple(pixels.shape[-2:]) != (self.native_size, self.native_size)

    def _dtype(self) -> torch.dtype:
        return next(self.model.vision_model.parameters()).dtype

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._dtype())
        return _features(self.model.get_image_features(pixel_values=pixels,
                                                        interpolate_pos_encoding=self._interp(pixels)))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=token_ids))

    @property
    def logit_scale(self) -> float | None:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        b = getattr(self.model, "logit_bias", None)
        return None if b is None else float(b.detach().reshape(-1)[0])

    def dense_features(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = self.check_dense_mode(mode)
        pixels = pixels.to(self._dtype())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        out = self._siglip_dense(pixels, mode) if self.model_type == "siglip" else self._clip_dense(pixels, mode)
        return out.reshape(out.shape[0], gh, gw, out.shape[-1])

    def detection_tokens(self, pixels: torch.Tensor):
        """CLIP / OWLv2: `post_layernorm` on every token (as OWLv2's image embedder); SigLIP's
        `last_hidden_state` is already post-LN, and its MAP head gives the global token."""
        pixels = pixels.to(self._dtype())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        vm = self.model.vision_model
        x = vm(pixel_values=pixels, interpolate_pos_encoding=self._interp(pixels)).last_hidden_state
        if self.model_type == "siglip":
            head = getattr(vm, "head", None)
            return x.reshape(x.shape[0], gh, gw, -1), (None if head is None else head(x)), \
                ("none" if head is None else "map")
        x = vm.post_layernorm(x)
        return x[:, 1:].reshape(x.shape[0], gh, gw, -1), x[:, 0], "cls"

    def _siglip_dense(self, pixels: torch.Tensor, mode: str) -> torch.Tensor:
        vm = self.model.vision_model
        x = vm(pixel_values=pixels, interpolate_pos_encoding=self._interp(pixels)).last_hidden_state  # post-LN
        return self._siglip_head(x, mode)

    def _siglip_head(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Post-LN tokens -> dense embeddings of `mode` (see the module docstring)."""
        vm = self.model.vision_model
        if mode == "tokens":
            return x
        head = getattr(vm, "head", None)
        if head is None:
            raise ValueError("this SigLIP vision tower has no MAP head (vision_use_head=False): use 'tokens'")
        e = _mha_value(head.attention, x)
        return e + head.mlp(head.layernorm(e)) if mode == "map_value" else e

    def _clip_dense(self, pixels: torch.Tensor, mode: str) -> torch.Tensor:
        vm = self.model.vision_model
        interp = self._interp(pixels)
        if mode == "tokens":
            x = vm(pixel_values=pixels, interpolate_pos_encoding=interp).last_hidden_state
        else:  # maskclip
            x = vm.pre_layrnorm(vm.embeddings(pixels, interpolate_pos_encoding=interp))
            layers = vm.encoder.layers
            for layer in layers[:-1]:
                x = layer(x, None)
            x = _maskclip_layer(layers[-1], x)
        return self.model.visual_projection(vm.post_layernorm(x[:, 1:]))

    def dense_features_with_intermediates(self, pixels: torch.Tensor, mode: str | None = None, blocks=()):
        """Runs the encoder layers one by one (the same modules `dense_features` runs) to keep the
        hidden states after `blocks`; CLIP's class token is dropped from them."""
        from silc_bench.models.base import resolve_blocks

        mode = self.check_dense_mode(mode)
        if self.model_type not in ("clip", "siglip"):
            raise NotImplementedError(f"intermediate block outputs are not offered for hf {self.model_type}")
        pixels = pixels.to(self._dtype())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        vm = self.model.vision_model
        layers = vm.encoder.layers
        inter = dict.fromkeys(resolve_blocks(blocks, len(layers)))
        x = vm.embeddings(pixels, interpolate_pos_encoding=self._interp(pixels))
        clip = self.model_type == "clip"
        if clip:
            x = vm.pre_layrnorm(x)
        maskclip = mode == "maskclip"
        for i, layer in enumerate(layers[:-1] if maskclip else layers):
            x = _layer_out(layer(x, None))
            if i in inter:
                inter[i] = x
        if maskclip:
            if len(layers) - 1 in inter:
                inter[len(layers) - 1] = _layer_out(layers[-1](x, None))
            x = _maskclip_layer(layers[-1], x)
        if clip:
            out = self.model.visual_projection(vm.post_layernorm(x[:, 1:]))
        else:
            out = self._siglip_head(vm.post_layernorm(x), mode)
        prefix = 1 if clip else 0
        inter = {i: t[:, prefix:].reshape(t.shape[0], gh, gw, -1) for i, t in inter.items()}
        return out.reshape(out.shape[0], gh, gw, out.shape[-1]), inter

    def _tower(self, tower: str):
        return self.model.vision_model if tower == "image" else self.model.text_model

    def qv_parameters(self, towers=("image", "text"), scope: str = "qv") -> list[tuple[str, nn.Parameter]]:
        """`self_attn.q_proj` / `v_proj` weights and biases of every encoder layer. scope
        "attention+pos": all of `self_attn` plus `embeddings.position_embedding`. SigLIP's MAP
        head attention is pooling, not a block, and is never included."""
        from silc_bench.models.base import check_finetune_args

        towers = check_finetune_args(towers, scope)
        chosen: list[nn.Parameter] = []
        for tower in towers:
            tm = self._tower(tower)
            if scope != "qv":
                chosen += list(tm.embeddings.position_embedding.parameters())
            for layer in tm.encoder.layers:
                attn = layer.self_attn
                mods = (attn.q_proj, attn.v_proj) if scope == "qv" else (attn,)
                chosen += [p for m in mods for p in m.parameters()]
        names = {id(p): n for n, p in self.named_parameters()}
        return [(names[id(p)], p) for p in chosen]


def load_hf(directory: str | Path, device: str | torch.device = "cpu") -> HFModel:
    """Load a transformers `save_pretrained` directory of a SiglipModel or CLIPModel (+ its tokenizer)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"hf checkpoint directory {directory} does not exist", path=directory,
                        fix="pass the directory written by transformers' save_pretrained")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"hf checkpoint directory {directory} has no config.json", path=cfg_path,
                        fix="pass a directory written by SiglipModel/CLIPModel.save_pretrained")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}", path=cfg_path, fix="restore config.json") from e
    if model_type not in FAMILIES:
        raise UserError(f"unsupported hf model_type {model_type!r} in {cfg_path}", path=cfg_path,
                        fix=f"silc-bench loads model_type {sorted(FAMILIES)} (SiglipModel, CLIPModel, "
                            f"Owlv2ForObjectDetection) saved whole, "
                            f"not a single tower")
    if not any((directory / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (directory / n).is_file()]
        raise UserError(f"hf checkpoint directory {directory} has no model.safetensors"
                        + (f" (only {pickled[0]}, which would need unpickling)" if pickled else ""),
                        path=directory / "model.safetensors",
                        fix="save the model with save_pretrained(safe_serialization=True) or convert the "
                            "weights to safetensors")

    vocab_files = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
    if not any((directory / n).is_file() for n in vocab_files):
        # AutoTokenizer would otherwise build an empty default tokenizer from config.json without complaint.
        raise UserError(f"hf checkpoint directory {directory} has no tokenizer files ({', '.join(vocab_files)})",
                        path=directory, fix="save the model's tokenizer into it with tokenizer.save_pretrained")

    import transformers
    cls = getattr(transformers, FAMILIES[model_type][0])
    try:
        model, info = cls.from_pretrained(str(directory), use_safetensors=True, local_files_only=True,
                                          trust_remote_code=False, dtype=torch.float32, output_loading_info=True,
                                          ignore_mismatched_sizes=True)  # reported in `info`, refused below
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"cannot load {FAMILIES[model_type][0]} from {directory}: {type(e).__name__}: {e}",
                        path=directory, fix="check that the weights match config.json") from e
    # transformers fills missing weights with random values and only warns: refuse instead.
    missing = sorted(info.get("missing_keys") or [])
    missing += sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise UserError(f"{directory / 'model.safetensors'} lacks (or mis-shapes) {len(missing)} weights of "
                        f"{FAMILIES[model_type][0]}: {', '.join(missing[:8])}", path=directory / "model.safetensors",
                        fix="use the weights saved together with this config.json")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=False)
    except ImportError as e:
        raise UserError(f"the tokenizer in {directory} needs a missing library: {e}", path=directory,
                        fix="install it (SigLIP's sentencepiece tokenizer needs `pip install protobuf`)") from e
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer from {directory}: {type(e).__name__}: {e}", path=directory,
                        fix="save the matching tokenizer into the directory with tokenizer.save_pretrained") from e
    owl_heads = None
    if model_type == "owlv2":
        owl_heads = {"state_dict": {k: v for k, v in model.state_dict().items() if k.startswith(OWL_HEAD_PREFIXES)},
                     "layer_norm_eps": float(model.config.vision_config.layer_norm_eps)}
        model = model.owlv2
    ctx = int(model.config.text_config.max_position_embeddings)
    tokenizer = HFTokenizer(tok, directory, ctx)
    preprocess = _preprocess(directory, model_type, int(model.config.vision_config.image_size))
    provenance = {"path": str(directory), "sha256": sha256_dir(directory)}
    out = HFModel(model.to(device), model_type, tokenizer, preprocess, provenance)
    out.owl_heads = owl_heads
    return out
