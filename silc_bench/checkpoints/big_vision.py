"""big_vision two-tower `.npz` checkpoints (SigLIP; SILC releases): read, infer, convert, write.

Facts (from google-research/big_vision `big_vision/models/vit.py`, `models/proj/image_text/two_towers.py`,
`utils.py`, and open_clip `src/open_clip/convert.py`): flat `/`-joined keys, optionally prefixed
`params/`; "scan" layout stacks blocks as `.../encoderblock/...` with a leading depth axis; bfloat16
is stored as void `V2`.
Every conversion is strict: a missing or mis-shaped key is a UserError naming key and file.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file
from silc_bench.models.base import Tokenizer
from silc_bench.models.text import TextConfig
from silc_bench.models.two_tower import BigVisionModel, TwoTower, TwoTowerConfig
from silc_bench.models.vit import POSEMB_RESAMPLE_MODES, ViTConfig
from silc_bench.results.record import default_file_mode

PREFIX = "params/"
_BLOCK = re.compile(r"^(.*/)?encoderblock_(\d+)/(.*)$")
_FIX_REEXPORT = "pass a complete big_vision two-tower checkpoint (img/, txt/, t) or re-export it"


# ---------------------------------------------------------------- reading and writing arrays

_FIX_NOT_NPZ = ("pass a big_vision .npz checkpoint as released (a zip archive of .npy arrays); if the file is "
                "truncated or damaged, download it again; a torch/open_clip checkpoint loads as "
                "open_clip:ARCH:FILE, a transformers directory as hf:DIR")


def _not_npz_reason(path: Path) -> str:
    """Why a file that is not a zip archive cannot be a .npz, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an archive of named arrays"
    if head.startswith(b"PK"):
        return "it starts like a zip archive but is truncated or damaged (no zip directory at its end)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it is a Python pickle (pickles are never loaded: they can run code)"
    return f"it does not start with a zip header (first bytes: {head.hex()})"


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """bfloat16 bits (any 2-byte dtype) -> float32, exactly (bf16 is the top half of an f32)."""
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (what jnp.asarray(x, bfloat16) does)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded).astype(np.uint16)


def read_npz(path: str | Path, *, info: dict | None = None) -> dict[str, np.ndarray]:
    """Flat pyloop-layout float32 params without `params/`; `info` (if given) gets layout/dtype/prefix."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint file not found", path=path, fix="check the path of the big_vision .npz")
    if not zipfile.is_zipfile(path):
        # np.load would take anything that is neither zip nor .npy for a pickle and suggest unpickling it.
        raise UserError(f"{path.name} is not a valid .npz (zip) checkpoint: {_not_npz_reason(path)}", path=path,
                        fix=_FIX_NOT_NPZ)
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"{path.name} is not a valid .npz (zip) checkpoint: the zip archive is damaged "
                        f"({type(e).__name__})", path=path, fix=_FIX_NOT_NPZ) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path.name} is not a valid .npz (zip) checkpoint (a single .npy array?)", path=path,
                        fix=_FIX_NOT_NPZ)
    with npz:
        keys = list(npz.files)
        prefixed = any(k.startswith(PREFIX) for k in keys)
        if prefixed:  # keep params only (a training checkpoint may also hold optimizer state)
            keys = [k for k in keys if k.startswith(PREFIX)]
        raw: dict[str, np.ndarray] = {}
        dtypes: set[str] = set()
        for k in keys:
            try:
                a = npz[k]
            except ValueError as e:  # object arrays need pickle: refuse
                raise UserError(f"array {k!r} holds Python objects (pickled data), which are never loaded", path=path,
                                fix="re-export the checkpoint with numeric arrays only") from e
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise UserError(f"{path.name} is not a valid .npz (zip) checkpoint: member {k!r} is damaged "
                                f"({type(e).__name__})", path=path, fix=_FIX_NOT_NPZ) from e
            if not isinstance(a, np.ndarray):  # a zip member that is not a .npy array (e.g. a torch .pt zip)
                raise UserError(f"{path.name} is not a big_vision .npz checkpoint: member {k!r} is not a .npy array",
                                path=path, fix=_FIX_NOT_NPZ)
            if a.dtype.kind == "V" and a.dtype.itemsize == 2:
                dtypes.add("bfloat16")
                a = _bf16_to_f32(a)
            elif a.dtype.kind == "f":
                dtypes.add(str(a.dtype))
                a = a.astype(np.float32, copy=False)
            elif a.dtype.name == "bfloat16":  # ml_dtypes, if ever stored natively
                dtypes.add("bfloat16")
                a = _bf16_to_f32(a)
            raw[k[len(PREFIX):] if prefixed else k] = a
    params: dict[str, np.ndarray] = {}
    scan = False
    for k, a in raw.items():
        parts = k.split("/")
        if "encoderblock" in parts:  # scan layout: unstack the leading depth axis
            scan = True
            i = parts.index("encoderblock")
            for d in range(a.shape[0]):
                params["/".join(parts[:i] + [f"encoderblock_{d}"] + parts[i + 1:])] = np.ascontiguousarray(a[d])
        else:
            params[k] = a
    if info is not None:
        info.update(layout="scan" if scan else "pyloop", prefix=prefixed,
                    dtype="+".join(sorted(dtypes)) or "none")
    return params


def write_npz(params: dict[str, np.ndarray], path: str | Path, layout: str = "pyloop",
              prefix: bool = False, bf16: bool = False) -> None:
    """Write flat pyloop params as a big_vision .npz (atomically: temp file, then rename)."""
    if layout not in ("pyloop", "scan"):
        raise ValueError(f"layout must be 'pyloop' or 'scan', got {layout!r}")
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for k, a in params.items():
        a = np.asarray(a)
        m = _BLOCK.match(k)
        if layout == "scan" and m:
            stacks.setdefault(f"{m.group(1) or ''}encoderblock/{m.group(3)}", {})[int(m.group(2))] = a
        else:
            out[k] = a
    for k, by_depth in stacks.items():
        if sorted(by_depth) != list(range(len(by_depth))):
            raise ValueError(f"blocks of {k} are not numbered 0..{len(by_depth) - 1}: {sorted(by_depth)}")
        out[k] = np.stack([by_depth[i] for i in range(len(by_depth))])
    if bf16:
        out = {k: _f32_to_bf16_bits(a).view("V2") if a.dtype.kind == "f" else a for k, a in out.items()}
    if prefix:
        out = {PREFIX + k: a for k, a in out.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())  # as open() would, not mkstemp's 0o600
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **out)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- architecture inference

def _need(params: dict, key: str, path) -> np.ndarray:
    if key not in params:
        raise UserError(f"checkpoint is missing key {key!r}", path=path, fix=_FIX_REEXPORT)
    return params[key]


def _depth(params: dict, prefix: str, path) -> int:
    found = {int(m.group(2)) for k in params if k.startswith(prefix) and (m := _BLOCK.match(k))}
    if not found:
        raise UserError(f"checkpoint has no transformer blocks under {prefix!r}", path=path, fix=_FIX_REEXPORT)
    depth = max(found) + 1
    if len(found) != depth:
        missing = sorted(set(range(depth)) - found)
        raise UserError(f"checkpoint is missing key {prefix}encoderblock_{missing[0]}/...", path=path,
                        fix=_FIX_REEXPORT)
    return depth


def _block_facts(params: dict, prefix: str, path) -> tuple[int, int, int]:
    """(width, heads, mlp_dim) from block 0: heads come from the query kernel (D, H, hd)."""
    q = _need(params, f"{prefix}encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", path)
    mlp = _need(params, f"{prefix}encoderblock_0/MlpBlock_0/Dense_0/kernel", path)
    if q.ndim != 3 or q.shape[1] * q.shape[2] != q.shape[0]:
        raise UserError(f"key {prefix}encoderblock_0/MultiHeadDotProductAttention_0/query/kernel has shape "
                        f"{q.shape}, expected (D, heads, D // heads)", path=path, fix=_FIX_REEXPORT)
    return q.shape[0], q.shape[1], mlp.shape[1]


def _map_facts(params: dict, prefix: str, heads: int, mlp: int, path) -> tuple[int | None, int | None]:
    q = _need(params, f"{prefix}MAPHead_0/MultiHeadDotProductAttention_0/query/kernel", path)
    m = _need(params, f"{prefix}MAPHead_0/MlpBlock_0/Dense_0/kernel", path)
    return (None if q.shape[1] == heads else q.shape[1]), (None if m.shape[1] == mlp else m.shape[1])


def infer_config(params: dict[str, np.ndarray], path=None) -> TwoTowerConfig:
    """The architecture from the weights alone. Unknown top-level keys are ignored.

    Pooling: `MAPHead_0` -> "map", `cls` -> "tok", otherwise "gap" (gap/"0" cannot be told apart
    from weights; big_vision's default is gap).
    """
    kernel = _need(params, "img/embedding/kernel", path)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise UserError(f"key 'img/embedding/kernel' has shape {kernel.shape}, expected (p, p, 3, D)",
                        path=path, fix=_FIX_REEXPORT)
    width, heads, mlp = _block_facts(params, "img/Transformer/", path)
    n = _need(params, "img/pos_embedding", path).shape[1]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise UserError(f"img/pos_embedding has {n} positions, not a square grid (an old cls+posemb file?)",
                        path=path, fix=_FIX_REEXPORT)
    pool = "map" if any(k.startswith("img/MAPHead_0/") for k in params) else "tok" if "img/cls" in params else "gap"
    map_heads, map_mlp = _map_facts(params, "img/", heads, mlp, path) if pool == "map" else (None, None)
    img = ViTConfig(
        width=width, depth=_depth(params, "img/Transformer/", path), heads=heads, mlp_dim=mlp,
        patch_size=kernel.shape[0], grid=(g, g), pool_type=pool,
        out_dim=params["img/head/kernel"].shape[1] if "img/head/kernel" in params else None,
        rep_size=params["img/pre_logits/kernel"].shape[1] if "img/pre_logits/kernel" in params else None,
        map_heads=map_heads, map_mlp_dim=map_mlp,
    )
    vocab, twidth = _need(params, "txt/Embed_0/embedding", path).shape
    _, theads, tmlp = _block_facts(params, "txt/Encoder_0/", path)
    tpool = "map" if any(k.startswith("txt/MAPHead_0/") for k in params) else "last"
    tmap_heads, tmap_mlp = _map_facts(params, "txt/", theads, tmlp, path) if tpool == "map" else (None, None)
    txt = TextConfig(
        vocab_size=vocab, width=twidth, depth=_depth(params, "txt/Encoder_0/", path), heads=theads,
        mlp_dim=tmlp, length=_need(params, "txt/pos_embedding", path).shape[1], pool_type=tpool,
        out_dim=params["txt/head/kernel"].shape[1] if "txt/head/kernel" in params else None,
        map_heads=tmap_heads, map_mlp_dim=tmap_mlp,
    )
    _need(params, "t", path)
    return TwoTowerConfig(img=img, txt=txt, bias="b" in params)


# ---------------------------------------------------------------- big_vision <-> torch names

def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":  # HWIO -> OIHW
        return a.transpose(3, 2, 0, 1)
    if kind == "qkv":  # (D, H, hd) -> (H*hd, D)
        return a.reshape(a.shape[0], -1).T
    if kind == "out":  # (H, hd, D) -> (D, H*hd)
        return a.reshape(-1, a.shape[-1]).T
    if kind == "dense":
        return a.T
    return a.reshape(-1) if kind == "flat" else a


def _to_bv(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    if kind == "conv":
        return w.transpose(2, 3, 1, 0)
    if kind in ("qkv", "out", "dense"):
        return w.T.reshape(shape)
    return w.reshape(shape)


def _attn_specs(bv: str, pt: str, d: int, h: int) -> list:
    s = [(f"{bv}{n}/kernel", f"{pt}{n}.weight", "qkv", (d, h, d // h)) for n in ("query", "key", "value")]
    s += [(f"{bv}{n}/bias", f"{pt}{n}.bias", "flat", (h, d // h)) for n in ("query", "key", "value")]
    return s + [(f"{bv}out/kernel", f"{pt}out.weight", "out", (h, d // h, d)), (f"{bv}out/bias", f"{pt}out.bias", "copy", (d,))]


def _ln(bv: str, pt: str, d: int) -> list:
    return [(f"{bv}scale", f"{pt}weight", "copy", (d,)), (f"{bv}bias", f"{pt}bias", "copy", (d,))]


def _mlp(bv: str, pt: str, d: int, m: int) -> list:
    return [(f"{bv}Dense_0/kernel", f"{pt}fc1.weight", "dense", (d, m)), (f"{bv}Dense_0/bias", f"{pt}fc1.bias", "copy", (m,)),
            (f"{bv}Dense_1/kernel", f"{pt}fc2.weight", "dense", (m, d)), (f"{bv}Dense_1/bias", f"{pt}fc2.bias", "copy", (d,))]


def _dense(bv: str, pt: str, i: int, o: int) -> list:
    return [(f"{bv}kernel", f"{pt}weight", "dense", (i, o)), (f"{bv}bias", f"{pt}bias", "copy", (o,))]


def _encoder(bv: str, pt: str, d: int, depth: int, h: int, m: int) -> list:
    s = []
    for i in range(depth):
        b, p = f"{bv}encoderblock_{i}/", f"{pt}blocks.{i}."
        s += _ln(b + "LayerNorm_0/", p + "norm1.", d) + _attn_specs(b + "MultiHeadDotProductAttention_0/", p + "attn.", d, h)
        s += _ln(b + "LayerNorm_1/", p + "norm2.", d) + _mlp(b + "MlpBlock_0/", p + "mlp.", d, m)
    return s + _ln(f"{bv}encoder_norm/", f"{pt}encoder_norm.", d)


def _map_head(bv: str, pt: str, d: int, h: int, m: int) -> list:
    return ([(f"{bv}probe", f"{pt}probe", "copy", (1, 1, d))] + _attn_specs(f"{bv}MultiHeadDotProductAttention_0/", f"{pt}attn.", d, h)
            + _ln(f"{bv}LayerNorm_0/", f"{pt}norm.", d) + _mlp(f"{bv}MlpBlock_0/", f"{pt}mlp.", d, m))


def param_specs(config: TwoTowerConfig) -> list[tuple[str, str, str, tuple]]:
    """(big_vision key, torch state-dict key, conversion kind, big_vision shape) for every parameter."""
    c, d = config.img, config.img.width
    s = [("img/embedding/kernel", "img.patch_embed.weight", "conv", (c.patch_size, c.patch_size, 3, d)),
         ("img/embedding/bias", "img.patch_embed.bias", "copy", (d,)),
         ("img/pos_embedding", "img.pos_embedding", "copy", (1, c.grid[0] * c.grid[1], d))]
    if c.pool_type == "tok":
        s.append(("img/cls", "img.cls", "copy", (1, 1, d)))
    s += _encoder("img/Transformer/", "img.", d, c.depth, c.heads, c.mlp)
    if c.pool_type == "map":
        s += _map_head("img/MAPHead_0/", "img.map_head.", d, c.map_heads or c.heads, c.map_mlp_dim or c.mlp)
    if c.rep_size:
        s += _dense("img/pre_logits/", "img.pre_logits.", d, c.rep_size)
    if c.out_dim:
        s += _dense("img/head/", "img.head.", c.rep_size or d, c.out_dim)
    t, d = config.txt, config.txt.width
    s += [("txt/Embed_0/embedding", "txt.token_embedding.weight", "copy", (t.vocab_size, d)),
          ("txt/pos_embedding", "txt.pos_embedding", "copy", (1, t.length, d))]
    s += _encoder("txt/Encoder_0/", "txt.", d, t.depth, t.heads, t.mlp)
    if t.pool_type == "map":
        s += _map_head("txt/MAPHead_0/", "txt.map_head.", d, t.map_heads or t.heads, t.map_mlp_dim or t.mlp)
    if t.out_dim:
        s += _dense("txt/head/", "txt.head.", d, t.out_dim)
    s.append(("t", "t", "copy", (1,)))
    if config.bias:
        s.append(("b", "b", "copy", (1,)))
    return s


def params_to_state_dict(params: dict[str, np.ndarray], config: TwoTowerConfig, path=None,
                         ignored: list | None = None) -> dict[str, torch.Tensor]:
    """big_vision params -> TwoTower state dict; strict on every expected key and shape.

    Keys under img/ or txt/ that the architecture does not use are appended to `ignored`.
    """
    params = dict(params)
    extra_pos = params.pop("txt/Encoder_0/pos_embedding", None)  # old files added it twice; big_vision merges
    if extra_pos is not None and "txt/pos_embedding" in params:
        params["txt/pos_embedding"] = params["txt/pos_embedding"] + extra_pos
    sd: dict[str, torch.Tensor] = {}
    used = set()
    for bv, pt, kind, shape in param_specs(config):
        a = _need(params, bv, path)
        if tuple(a.shape) != tuple(shape):
            raise UserError(f"checkpoint key {bv!r} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                            f"for the architecture inferred from this file", path=path, fix=_FIX_REEXPORT)
        sd[pt] = torch.from_numpy(np.ascontiguousarray(_to_torch(kind, np.asarray(a, dtype=np.float32))))
        used.add(bv)
    unused = sorted(k for k in params if k.split("/")[0] in ("img", "txt") and k not in used)
    if unused:
        warnings.warn(f"{path}: ignoring {len(unused)} unexpected tower keys, e.g. {unused[:3]}")
    if ignored is not None:
        ignored.extend(unused)
    return sd


def state_dict_to_params(state_dict: dict[str, torch.Tensor], config: TwoTowerConfig) -> dict[str, np.ndarray]:
    """TwoTower state dict -> flat big_vision params (pyloop layout, float32); the inverse of the above."""
    params = {}
    for bv, pt, kind, shape in param_specs(config):
        if pt not in state_dict:
            raise KeyError(f"state dict is missing {pt!r}")
        w = state_dict[pt].detach().to("cpu", torch.float32).numpy()
        params[bv] = np.array(_to_bv(kind, w, shape), dtype=np.float32, order="C")  # a copy, not a view
    return params


# ---------------------------------------------------------------- model loading and saving

def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def _resolve_tokenizer(tokenizer, path: Path, config: TwoTowerConfig) -> Tokenizer:
    from silc_bench.tokenizers import make_tokenizer, parse_tokenizer_spec

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        base_dir = None
        if tokenizer is None:
            side = sidecar_path(path)
            fix = f"pass --tokenizer sentencepiece:FILE or write {side.name} holding {{\"tokenizer\": {{...}}}}"
            if not side.is_file():
                raise UserError("no tokenizer given for this big_vision checkpoint", path=path, fix=fix)
            try:
                tokenizer = json.loads(side.read_text())["tokenizer"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"sidecar has no readable \"tokenizer\" entry ({e!r})", path=side, fix=fix) from e
            base_dir = side.parent
        spec = parse_tokenizer_spec(tokenizer)
        defaults = {"context_length": config.txt.length} if spec.get("kind") == "sentencepiece" else {}
        tok = make_tokenizer(spec, base_dir=base_dir, **defaults)
    if tok.context_length != config.txt.length:
        raise UserError(f"tokenizer context_length {tok.context_length} differs from the checkpoint's text length "
                        f"{config.txt.length}", path=path, fix=f"set context_length to {config.txt.length}")
    vocab = getattr(tok, "vocab_size", None)
    if vocab is not None and vocab > config.txt.vocab_size:
        raise UserError(f"tokenizer vocabulary ({vocab}) is larger than the model's ({config.txt.vocab_size})",
                        path=path, fix="pass the tokenizer this checkpoint was trained with")
    return tok


def load_big_vision(path: str | Path, tokenizer=None, device="cpu", posemb_resample: str = "bilinear") -> BigVisionModel:
    """Load a big_vision two-tower .npz as a `BigVisionModel` (eval mode).

    `tokenizer`: a spec dict / "sentencepiece:FILE" string / Tokenizer; None reads `<path>.json`.
    """
    path = Path(path)
    if posemb_resample not in POSEMB_RESAMPLE_MODES:
        raise UserError(f"unknown posemb_resample {posemb_resample!r}", path=path,
                        fix=f"use one of {POSEMB_RESAMPLE_MODES}")
    info: dict = {}
    params = read_npz(path, info=info)
    config = infer_config(params, path)
    tok = _resolve_tokenizer(tokenizer, path, config)
    ignored: list = []
    sd = params_to_state_dict(params, config, path, ignored=ignored)
    with torch.device("meta"):
        tower = TwoTower(config, posemb_resample=posemb_resample)
    tower.load_state_dict(sd, strict=True, assign=True)
    model = BigVisionModel(tower.to(device).eval(), tok).eval()
    model.provenance = {
        "format": "big_vision",
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "layout": info["layout"],
        "dtype": info["dtype"],
        "params_prefix": info["prefix"],
        "config": asdict(config),
        "posemb_resample": posemb_resample,
        "ignored_keys": ignored,
    }
    return model


def save_big_vision(two_tower: TwoTower, path: str | Path, tokenizer=None, **write_opts) -> Path:
    """Write `two_tower` as a big_vision .npz (+ `<path>.json` sidecar when a tokenizer is given)."""
    path = Path(path)
    write_npz(state_dict_to_params(two_tower.state_dict(), two_tower.config), path, **write_opts)
    if tokenizer is not None:
        spec = tokenizer.spec() if hasattr(tokenizer, "spec") else dict(tokenizer)
        side = sidecar_path(path)
        fd, tmp = tempfile.mkstemp(dir=side.parent, prefix=f".{side.name}.", suffix=".tmp")
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump({"tokenizer": spec, "config": asdict(two_tower.config)}, f, indent=2)
        os.replace(tmp, side)
    return path
