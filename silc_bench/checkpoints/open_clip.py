"""open_clip models behind the common interface, with the MaskCLIP dense path (Zhou et al., ECCV 2022,
github.com/chongzhou96/MaskCLIP: the last block with each token attending only to itself).

Embeddings come from open_clip's own `encode_image` / `encode_text(normalize=False)` at the
native input size. Dense features (and embeddings at other input sizes) run the tower's own
modules with position embeddings interpolated here, bicubic with the class position kept, so
every input size works without rebuilding the model.

Towers: open_clip's `VisionTransformer` ("maskclip", "tokens") and timm `VisionTransformer`
trunks with a MAP pool, as open_clip's SigLIP models use ("map_value", "map_value_no_mlp",
"tokens"). Other towers (ResNet, ...) still give embeddings; dense features raise ValueError.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file, sha256_json
from silc_bench.models.base import OPENAI_MEAN, OPENAI_STD, Preprocess, Tokenizer, VisionLanguageModel

VIT_MODES = ("maskclip", "tokens")
TIMM_MAP_MODES = ("map_value", "map_value_no_mlp", "tokens")
# Plain bicubic (PyTorch's a=-0.75 kernel) as transformers does; open_clip's and timm's
# checkpoint-resizing helpers use antialias=True, which is a different (a=-0.5) kernel.
POS_INTERP = dict(mode="bicubic", align_corners=False, antialias=False)


def interpolate_pos_embed(pos: torch.Tensor, old_grid, new_grid, num_prefix: int,
                          antialias: bool = POS_INTERP["antialias"]) -> torch.Tensor:
    """[P+N, D] or [1, P+N, D] position table resized to `new_grid`; the P prefix rows are kept."""
    squeeze = pos.ndim == 2
    table = pos if squeeze else pos[0]
    prefix, grid = table[:num_prefix], table[num_prefix:]
    oh, ow = old_grid
    if grid.shape[0] != oh * ow:
        raise ValueError(f"position table has {grid.shape[0]} grid rows, expected {oh}x{ow}")
    if tuple(new_grid) != (oh, ow):
        dim = grid.shape[-1]
        g = grid.float().reshape(1, oh, ow, dim).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=tuple(new_grid), mode=POS_INTERP["mode"],
                          align_corners=POS_INTERP["align_corners"], antialias=antialias)
        grid = g.permute(0, 2, 3, 1).reshape(-1, dim).to(table.dtype)
    out = torch.cat([prefix, grid], dim=0)
    return out if squeeze else out[None]


def mha_value(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """out_proj(v_proj(x)): what an nn.MultiheadAttention outputs when a query sees only key x."""
    d = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight[2 * d:]
    else:
        w = mha.v_proj_weight
    b = mha.in_proj_bias[2 * d:] if mha.in_proj_bias is not None else None
    return mha.out_proj(F.linear(x, w, b))


class OpenClipTokenizer(Tokenizer):
    """An open_clip tokenizer (SimpleTokenizer, HFTokenizer, SigLipTokenizer) as a silc_bench Tokenizer."""

    def __init__(self, tok, arch: str):
        self._tok = tok
        self.arch = arch
        self.context_length = int(tok.context_length)
        self._vocab_sha: str | None = None

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self._tok(list(texts), context_length=self.context_length).long()

    def _vocab(self) -> dict | None:
        if hasattr(self._tok, "encoder"):  # SimpleTokenizer: BPE token -> id
            return self._tok.encoder
        inner = getattr(self._tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer
        return inner.get_vocab() if inner is not None and hasattr(inner, "get_vocab") else None

    def describe(self) -> dict:
        if self._vocab_sha is None:
            vocab = self._vocab()
            self._vocab_sha = sha256_json(vocab) if vocab is not None else ""
        return {"kind": "open_clip", "arch": self.arch, "class": type(self._tok).__name__,
                "context_length": self.context_length, "vocab_sha256": self._vocab_sha or None}


def _tower_kind(visual: nn.Module) -> str:
    from open_clip.transformer import VisionTransformer as OCViT
    if isinstance(visual, OCViT):
        return "vit"
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        if isinstance(trunk, TimmViT) and getattr(trunk, "pos_embed", None) is not None:
            return "timm_map" if getattr(trunk, "attn_pool", None) is not None else "timm_vit"
    return "unsupported"


def _preprocess_of(model: nn.Module) -> Preprocess:
    import open_clip
    cfg = dict(open_clip.get_model_preprocess_cfg(model) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return Preprocess(
        image_size=size,
        mean=tuple(float(m) for m in cfg.get("mean", OPENAI_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", OPENAI_STD)),
        resize=cfg.get("resize_mode", "shortest"),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


class OpenClipModel(VisionLanguageModel):
    """An open_clip CLIP / CustomTextCLIP model as a `VisionLanguageModel`."""

    def __init__(self, model: nn.Module, arch: str, tokenizer: Tokenizer, provenance: dict | None = None):
        super().__init__()
        self.model = model.eval()
        self.arch = arch
        self.tokenizer = tokenizer
        self.preprocess = _preprocess_of(model)
        self.tower = _tower_kind(model.visual)
        if self.tower == "vit":
            ps = model.visual.patch_size
            self.dense_modes, self.default_dense_mode = VIT_MODES, "maskclip"
        elif self.tower in ("timm_map", "timm_vit"):
            ps = model.visual.trunk.patch_embed.patch_size
            self.dense_modes = TIMM_MAP_MODES if self.tower == "timm_map" else ("tokens",)
            self.default_dense_mode = self.dense_modes[0]
        else:
            # No patch grid (e.g. ResNet): 0 says so; embeddings still work, dense features raise.
            ps, self.dense_modes, self.default_dense_mode = 0, (), ""
        ps = tuple(ps) if isinstance(ps, (tuple, list)) else (int(ps), int(ps))
        if ps[0] != ps[1]:
            raise ValueError(f"non-square patches {ps} are not supported")
        self.patch_size = int(ps[0])
        self._pos_cache: dict = {}
        self.provenance = {"format": "open_clip", "arch": arch, "weights": None, "sha256": None,
                           **(provenance or {}), "visual_tower": self.tower,
                           "pos_embed_interpolation": dict(POS_INTERP)}

    @classmethod
    def from_module(cls, model: nn.Module, arch: str, tokenizer=None, provenance: dict | None = None):
        """Wrap an already-built open_clip model (tests, or models built in memory).

        `tokenizer`: an open_clip tokenizer; by default `open_clip.get_tokenizer(arch)` at the
        model's context length (an unregistered arch gets open_clip's SimpleTokenizer).
        """
        if tokenizer is None:
            tokenizer = _open_clip_tokenizer(arch, getattr(model, "context_length", None))
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = OpenClipTokenizer(tokenizer, arch)
        return cls(model, arch, tokenizer, provenance)

    # ---- embeddings -------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.model.visual.parameters()).dtype

    def _native_grid(self) -> tuple[int, int]:
        v = self.model.visual
        if self.tower == "vit":
            return tuple(v.grid_size)
        return tuple(v.trunk.patch_embed.grid_size)

    def _native_pixels(self) -> tuple[int, int]:
        v = self.model.visual
        size = v.image_size if self.tower == "vit" else v.trunk.patch_embed.img_size
        return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._dtype())
        if self.tower == "unsupported":
            return self.model.encode_image(pixels, normalize=False)
        if tuple(pixels.shape[-2:]) == self._native_pixels():
            return self.model.encode_image(pixels, normalize=False)
        tokens = self._encoder_tokens(pixels, maskclip=False)
        v = self.model.visual
        if self.tower == "vit":
            pooled, _ = v._pool(tokens)
            return pooled @ v.proj if v.proj is not None else pooled
        return v.head(v.trunk.forward_head(tokens))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids, normalize=False)

    def encode_image_pre_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled token before `proj` (open_clip ViT) or before `head` (timm towers)."""
        if self.tower == "unsupported":
            raise NotImplementedError(f"{self.arch}: no pre-logits for this tower")
        tokens = self._encoder_tokens(pixels.to(self._dtype()), maskclip=False)
        v = self.model.visual
        if self.tower == "vit":
            return v._pool(tokens)[0]
        return v.trunk.forward_head(tokens)

    @property
    def logit_scale(self) -> float | None:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        b = getattr(self.model, "logit_bias", None)
        return None if b is None else float(b.detach().reshape(-1)[0])

    # ---- shared tower pieces ----------------------------------------------------------------
    def _pos_table(self, table: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
        """Position table for `grid`; interpolated tables are cached while no gradient is needed."""
        if grid == self._native_grid():
            return table
        if torch.is_grad_enabled() and table.requires_grad:
            return interpolate_pos_embed(table, self._native_grid(), grid, num_prefix)
        key = (grid, table.device, table.dtype, table.data_ptr(), table._version)
        hit = self._pos_cache.get(grid)
        if hit is None or hit[0] != key:
            hit = (key, interpolate_pos_embed(table.detach(), self._native_grid(), grid, num_prefix))
            self._pos_cache[grid] = hit
        return hit[1]

    def _encoder_tokens(self, pixels: torch.Tensor, maskclip: bool) -> torch.Tensor:
        """All tokens after the tower's blocks (before ln_post / final norm handled by callers)."""
        if self.tower == "vit":
            return self._vit_tokens(pixels, maskclip)
        if self.tower in ("timm_map", "timm_vit"):
            return self._timm_tokens(pixels)
        raise ValueError(self._unsupported_message())

    # ---- open_clip VisionTransformer --------------------------------------------------------
    def _vit_tokens(self, pixels: torch.Tensor, maskclip: bool, inter: dict | None = None) -> torch.Tensor:
        """`inter`: {block index: None} to fill with the (batch-first, all-token) output of those blocks."""
        v = self.model.visual
        x = v.conv1(pixels)  # [B, D, gh, gw]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls_tok, x], dim=1)
        x = x + self._pos_table(v.positional_embedding, grid, 1).to(x.dtype)
        # patch dropout is skipped on purpose: dense outputs need every token (it is off in eval).
        x = v.ln_pre(x)
        blocks = list(v.transformer.resblocks)
        run = blocks[:-1] if maskclip else blocks
        batch_first = getattr(v.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        inter = {} if inter is None else inter
        for i, blk in enumerate(run):
            x = blk(x)
            if i in inter:
                inter[i] = x if batch_first else x.transpose(0, 1)
        if maskclip and len(blocks) - 1 in inter:  # the plain last block, beside the MaskCLIP one
            y = blocks[-1](x)
            inter[len(blocks) - 1] = y if batch_first else y.transpose(0, 1)
        if not batch_first:
            x = x.transpose(0, 1)
        if maskclip:
            x = _maskclip_block(blocks[-1], x)
        return x

    def _vit_dense(self, pixels: torch.Tensor, mode: str, inter: dict | None = None) -> torch.Tensor:
        v = self.model.visual
        if v.attn_pool is not None:
            raise ValueError("open_clip towers with an attentional pooler (CoCa) have no dense path here")
        x = self._vit_tokens(pixels, maskclip=(mode == "maskclip"), inter=inter)[:, 1:]
        x = v.ln_post(x)
        return x @ v.proj if v.proj is not None else x

    # ---- timm VisionTransformer trunk (open_clip SigLIP) ------------------------------------
    def _timm_tokens(self, pixels: torch.Tensor, inter: dict | None = None) -> torch.Tensor:
        t = self.model.visual.trunk
        x = t.patch_embed.proj(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = t.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = [tok.expand(x.shape[0], -1, -1) for tok in (t.cls_token, t.reg_token) if tok is not None]
        n_pos_prefix = 0 if t.no_embed_class else t.num_prefix_tokens
        pos = self._pos_table(t.pos_embed, grid, n_pos_prefix).to(x.dtype)
        if t.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        x = t.norm_pre(t.pos_drop(x))
        if not inter:
            x = t.blocks(x)
        else:
            for i, blk in enumerate(t.blocks):
                x = blk(x)
                if i in inter:
                    inter[i] = x
        return t.norm(x)

    def _timm_dense(self, pixels: torch.Tensor, mode: str, inter: dict | None = None) -> torch.Tensor:
        v = self.model.visual
        t = v.trunk
        x = self._timm_tokens(pixels, inter)[:, t.num_prefix_tokens:]
        if mode in ("map_value", "map_value_no_mlp"):
            pool = t.attn_pool
            if getattr(pool, "pos_embed", None) is not None:
                raise ValueError("MAP pools with their own position embedding are not supported")
            e = pool.kv.out_features // 2
            x = pool.proj(F.linear(x, pool.kv.weight[e:], None if pool.kv.bias is None else pool.kv.bias[e:]))
            if mode == "map_value" and pool.mlp is not None:
                x = x + pool.mlp(pool.norm(x))
        return v.head(t.head(t.fc_norm(x)))

    def detection_tokens(self, pixels: torch.Tensor):
        """open_clip ViT: `ln_post` on every token (OWL-ViT's `vision_return_map`); timm trunks:
        tokens after the trunk's final norm, and as the global token the MAP pool if the trunk
        pools that way (what its embedding is made of), else its class token."""
        pixels = pixels.to(self._dtype())
        v = self.model.visual
        if self.tower == "vit":
            x = v.ln_post(self._vit_tokens(pixels, maskclip=False))
            prefix, glob, kind = 1, x[:, 0], "cls"
        elif self.tower in ("timm_map", "timm_vit"):
            t = v.trunk
            x = self._timm_tokens(pixels)
            prefix = t.num_prefix_tokens
            if getattr(t, "attn_pool", None) is not None:  # the tower's own summary, class token or not
                glob, kind = t.pool(x), "map"  # timm's own rule for prefix tokens
            elif t.cls_token is not None:
                glob, kind = x[:, 0], "cls"
            else:
                glob, kind = None, "none"
        else:
            raise ValueError(self._unsupported_message())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        return x[:, prefix:].reshape(x.shape[0], gh, gw, -1), glob, kind

    # ---- dense ------------------------------------------------------------------------------
    def _unsupported_message(self) -> str:
        return (f"dense features are not supported for the open_clip visual tower "
                f"{type(self.model.visual).__name__} of {self.arch!r}: only open_clip VisionTransformer "
                f"and timm VisionTransformer trunks are (ResNet towers are not)")

    def dense_features(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        if self.tower == "unsupported":
            raise ValueError(self._unsupported_message())
        mode = self.check_dense_mode(mode)
        pixels = pixels.to(self._dtype())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        out = self._vit_dense(pixels, mode) if self.tower == "vit" else self._timm_dense(pixels, mode)
        return out.reshape(out.shape[0], gh, gw, out.shape[-1])

    def _blocks(self, tower: str) -> list[nn.Module]:
        """The transformer blocks of a tower (image: ViT resblocks / timm blocks; text: resblocks)."""
        if tower == "image":
            if self.tower == "vit":
                return list(self.model.visual.transformer.resblocks)
            if self.tower in ("timm_map", "timm_vit"):
                return list(self.model.visual.trunk.blocks)
            raise ValueError(self._unsupported_message())
        text = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps its text tower in .text
        transformer = getattr(text, "transformer", None)
        if transformer is None or not hasattr(transformer, "resblocks"):
            raise NotImplementedError(f"the text tower of {self.arch!r} ({type(text).__name__}) has no open_clip "
                                      f"transformer blocks to fine-tune")
        return list(transformer.resblocks)

    def dense_features_with_intermediates(self, pixels: torch.Tensor, mode: str | None = None, blocks=()):
        from silc_bench.models.base import resolve_blocks

        if self.tower == "unsupported":
            raise ValueError(self._unsupported_message())
        mode = self.check_dense_mode(mode)
        pixels = pixels.to(self._dtype())
        gh, gw = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        inter = dict.fromkeys(resolve_blocks(blocks, len(self._blocks("image"))))
        if self.tower == "vit":
            out, prefix = self._vit_dense(pixels, mode, inter), 1
        else:
            out, prefix = self._timm_dense(pixels, mode, inter), self.model.visual.trunk.num_prefix_tokens
        inter = {i: x[:, prefix:].reshape(x.shape[0], gh, gw, -1) for i, x in inter.items()}
        return out.reshape(out.shape[0], gh, gw, out.shape[-1]), inter

    def qv_parameters(self, towers=("image", "text"), scope: str = "qv") -> list[tuple[str, nn.Parameter]]:
        """open_clip fuses q/k/v into one tensor (nn.MultiheadAttention / open_clip Attention:
        `in_proj_weight` [3D, D] + `in_proj_bias`; timm: `qkv.weight` / `qkv.bias`). For scope "qv"
        each fused tensor is reparametrised on first call (torch.nn.utils.parametrize, outputs
        unchanged) as cat(original0, original1, original2) = (q, k, v), so q and v are parameters
        of their own: `...attn.parametrizations.in_proj_weight.original0` is q, `original2` is v
        (timm: `...attn.qkv.parametrizations.weight.original0/2`). A gradient mask would not do:
        AdamW's decoupled weight decay would still move the frozen k rows.
        scope "attention+pos": every parameter of the blocks' attention + the position tables."""
        from silc_bench.models.base import check_finetune_args

        towers = check_finetune_args(towers, scope)
        chosen: list[nn.Parameter] = []
        for tower in towers:
            if scope != "qv":
                chosen += self._position_tables(tower)
            for blk in self._blocks(tower):
                attn = blk.attn
                if scope != "qv":
                    chosen += list(attn.parameters())
                    continue
                if hasattr(attn, "qkv"):  # timm Attention
                    fused = [(attn.qkv, "weight"), (attn.qkv, "bias")]
                elif getattr(attn, "in_proj_weight", None) is not None:
                    fused = [(attn, "in_proj_weight"), (attn, "in_proj_bias")]
                else:
                    raise NotImplementedError(f"attention {type(attn).__name__} of {self.arch!r} has no fused "
                                              f"in_proj_weight / qkv to split")
                for module, attr in fused:
                    originals = _split_qkv(module, attr)
                    if originals is not None:
                        chosen += [originals[0], originals[2]]
        names = {id(p): n for n, p in self.named_parameters()}  # after splitting: the new names
        return [(names[id(p)], p) for p in chosen]

    def _position_tables(self, tower: str) -> list[nn.Parameter]:
        if tower == "image":
            v = self.model.visual
            p = v.positional_embedding if self.tower == "vit" else getattr(getattr(v, "trunk", None), "pos_embed", None)
        else:
            p = getattr(getattr(self.model, "text", self.model), "positional_embedding", None)
        return [p] if isinstance(p, nn.Parameter) else []


class _SplitQKV(nn.Module):
    """Parametrisation: a fused [3D, ...] q/k/v tensor held as three tensors (q, k, v)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([q, k, v], dim=0)

    def right_inverse(self, fused: torch.Tensor):
        return tuple(t.clone() for t in fused.chunk(3, dim=0))


def _is_split(module: nn.Module, attr: str) -> bool:
    from torch.nn.utils import parametrize
    return parametrize.is_parametrized(module, attr)


def _split_qkv(module: nn.Module, attr: str):
    """(q, k, v) parameters of `module.attr` (splitting it on first call); None if it is None (no bias)."""
    from torch.nn.utils import parametrize

    if not _is_split(module, attr):
        if getattr(module, attr, None) is None:
            return None
        requires_grad = getattr(module, attr).requires_grad
        parametrize.register_parametrization(module, attr, _SplitQKV())
        for p in module.parametrizations[attr].parameters():
            p.requires_grad_(requires_grad)
    originals = module.parametrizations[attr]
    return originals.original0, originals.original1, originals.original2



def _maskclip_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block with each token attending only to itself (MaskCLIP), on [B, L, D] tokens."""
    h = blk.ln_1(x)
    attn = blk.attn
    if isinstance(attn, nn.MultiheadAttention):  # ResidualAttentionBlock
        a = mha_value(attn, h)
        a = blk.ls_1(a)
    else:  # CustomResidualAttentionBlock with open_clip's Attention
        d = attn.in_proj_weight.shape[1]
        bias = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        a = F.linear(h, attn.in_proj_weight[2 * d:], bias)
        if attn.head_scale is not None:
            b, l, _ = a.shape
            a = (a.view(b, l, attn.num_heads, -1) * attn.head_scale.view(1, 1, attn.num_heads, 1)).reshape(b, l, -1)
        a = attn.out_proj(attn.ln_inner(a))
        a = blk.ls_1(blk.ln_attn(a))
    x = x + a
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _open_clip_tokenizer(arch: str, context_length: int | None):
    import open_clip
    try:
        return open_clip.get_tokenizer(arch, context_length=context_length)
    except Exception as e:  # SigLIP / HF tokenizers are fetched from a hub, which may be unreachable
        raise UserError(
            f"could not build the open_clip tokenizer for {arch!r}: {type(e).__name__}: {e}",
            fix="download the tokenizer files on a machine with network access and use a "
                "'local-dir:' model directory that contains them") from e


RANDOM_INIT = "random-init"  # `open_clip:ARCH:random-init`: the explicit opt-in to untrained weights


def local_dir_weights(folder: Path) -> Path | None:
    """The weights file open_clip reads from a `local-dir:` folder (its own choice where it exposes
    it: `open_clip.factory._find_checkpoint_in_dir`; else the same preference order)."""
    import open_clip.factory as factory

    finder = getattr(factory, "_find_checkpoint_in_dir", None)
    if finder is not None:
        found = finder(Path(folder))
        return Path(found) if found else None
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pth")],
                   key=lambda f: (f.suffix != ".safetensors", f.name))
    return files[0] if files else None


def load_open_clip(arch: str, weights: str | Path | None = None, device: str | torch.device = "cpu",
                   random_init: bool = False) -> OpenClipModel:
    """Build open_clip architecture `arch` and load `weights` (a local file, or an open_clip pretrained tag).

    Files are read by open_clip's loader with `weights_only=True` (torch.load), safetensors, or
    numpy without pickle (.npz big_vision files); nothing is unpickled. `arch` may also be
    'local-dir:/path' (config + weights in one directory), in which case `weights` is ignored.

    No weights is refused: open_clip would build the architecture with random weights and every
    number measured on it would look like a real model's. Random weights need an explicit opt-in,
    `random_init=True` or weights="random-init" (the spec `open_clip:ARCH:random-init`); the
    model's provenance then says `random_init: True`, and so does every record made with it.
    """
    import open_clip

    sha = None
    tag = None
    path = None
    own_scheme = str(arch).startswith(("local-dir:", "hf-hub:"))
    if not own_scheme and open_clip.get_model_config(str(arch).replace("/", "-")) is None:
        raise UserError(f"unknown open_clip architecture {arch!r}",
                        fix="use a name from open_clip.list_models(), register a config JSON with "
                            "open_clip.add_model_config, or pass 'local-dir:<directory>'")
    if weights is not None and str(weights) == RANDOM_INIT:
        weights, random_init = None, True
    if random_init and (weights is not None or own_scheme):
        raise UserError(f"open_clip model {arch!r}: random initialisation was asked for together with weights "
                        f"({weights if weights is not None else arch})",
                        fix=f"pass either weights (open_clip:ARCH:/path/weights.pt) or open_clip:ARCH:{RANDOM_INIT}, "
                            f"not both")
    if weights is None and not own_scheme and not random_init:
        tags = open_clip.list_pretrained_tags_by_model(str(arch).replace("/", "-"))
        raise UserError(
            f"no pretrained weights given for open_clip model {arch!r}: it would be evaluated with random "
            f"weights and its numbers reported as if measured on a trained model",
            fix=f"pass a weights file, open_clip:{arch}:/path/weights.pt (.pt / .bin / .safetensors), or a "
                f"pretrained tag already in open_clip's cache, open_clip:{arch}:TAG"
                + (f" (tags of {arch}: {', '.join(tags)})" if tags else "")
                + f"; to evaluate random weights on purpose, pass open_clip:{arch}:{RANDOM_INIT}")
    if weights is not None and not own_scheme:
        weights = str(weights)
        if open_clip.get_pretrained_cfg(str(arch).replace("/", "-"), weights):
            tag = weights
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                tags = open_clip.list_pretrained_tags_by_model(str(arch).replace("/", "-"))
                raise UserError(f"open_clip weights file {path} does not exist (and {weights!r} is not a "
                                f"pretrained tag of {arch!r})", path=path,
                                fix=f"pass an existing weights file, or one of the tags {tags}")
            sha = sha256_file(path)
    elif str(arch).startswith("local-dir:"):
        local = Path(str(arch)[len("local-dir:"):]).expanduser()
        if not local.is_dir():
            raise UserError(f"open_clip model directory {local} does not exist", path=local,
                            fix="pass 'local-dir:' followed by a directory holding open_clip_config.json and weights")
        path = local_dir_weights(local)
        if path is not None:  # the file open_clip will load: its hash names the record and keys the caches
            sha = sha256_file(path)
    try:
        model = open_clip.create_model(
            arch, pretrained=str(path) if path is not None and not own_scheme else tag, device=device,
            weights_only=True)
    except UserError:
        raise
    except Exception as e:
        msg = f"could not build open_clip model {arch!r}: {type(e).__name__}: {e}"
        if tag is not None:
            raise UserError(msg, fix=f"the pretrained tag {tag!r} needs a download, which is not available "
                                     f"here: download the weights file elsewhere and pass its local path") from e
        if path is not None:
            raise UserError(msg, path=path, fix="pass an open_clip checkpoint of this architecture saved as "
                                                ".safetensors or a torch state dict (loaded with weights_only)") from e
        raise UserError(msg, fix="use one of open_clip.list_models() (a registered architecture) "
                                 "or 'local-dir:<directory>'") from e
    provenance = {"weights": str(path) if path is not None else tag, "sha256": sha, "random_init": bool(random_init)}
    return OpenClipModel.from_module(model, str(arch), provenance=provenance)
