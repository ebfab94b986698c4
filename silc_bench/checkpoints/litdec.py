"""A trained LiT-Decoder: `litdec.safetensors` (decoder weights) + `litdec.json` (the backbone spec,
decoder sizes, tokenizer file and sha256, task prompts, training recipe). The backbone loads through
`load_model` from the spec recorded; its checkpoint is never written."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file

META_FILE, WEIGHTS_FILE = "litdec.json", "litdec.safetensors"


def save_litdec(model, out_dir, *, backbone_spec: str, backbone_sha256, codec, prompts: dict, training: dict) -> Path:
    from safetensors.torch import save

    from silc_bench.results.record import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    atomic_write_bytes(out / WEIGHTS_FILE, save(state))
    meta = {"method": "lit-decoder", "backbone": backbone_spec, "backbone_sha256": backbone_sha256,
            "decoder": model.config.to_dict(), "image_width": model.image_proj.in_features,
            "tokenizer": codec.describe(), "prompts": prompts, "training": training,
            "weights_sha256": sha256_file(out / WEIGHTS_FILE)}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1, sort_keys=True))
    return out / META_FILE


class LoadedLitDecoder(torch.nn.Module):
    """What the lit-decoder harness runs: the decoder, its codec and prompts, and a description."""

    def __init__(self, decoder, codec, prompts: dict, meta: dict):
        super().__init__()
        self.decoder, self.codec, self.prompts = decoder, codec, prompts
        self.backbone = decoder.backbone
        self.provenance = {"format": "lit-decoder", "weights_sha256": meta.get("weights_sha256")}
        self._meta = meta

    def describe(self) -> dict:
        m = self._meta
        return {"method": "lit-decoder", "decoder": m["decoder"], "tokenizer": self.codec.describe(),
                "prompts": self.prompts, "training": m.get("training"),
                "backbone": {k: self.backbone.provenance.get(k) for k in ("spec", "format", "sha256")}}


def load_litdec(spec: str, *, checkpoint_dir=None, tokenizer=None, device="cpu", **_) -> LoadedLitDecoder:
    from safetensors.torch import load_file

    from silc_bench.checkpoints import load_head_weights, load_model
    from silc_bench.litdec.model import DecoderConfig, LitDecoder
    from silc_bench.litdec.text import TextCodec
    from silc_bench.litdec.train import tokenizer_path

    directory = Path(spec)
    if not (directory / META_FILE).is_file():
        raise UserError(f"{spec!r} is not a trained LiT-Decoder folder (no {META_FILE})", path=directory / META_FILE,
                        fix="pass the --out folder of `silc-bench train lit-decoder`")
    try:
        meta = json.loads((directory / META_FILE).read_text())
        backbone_spec, dec = meta["backbone"], meta["decoder"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {directory / META_FILE}: {e}", path=directory / META_FILE,
                        fix="re-run the training's export (silc-bench train lit-decoder ... --resume)") from e
    tok = meta["tokenizer"]
    codec = TextCodec(tokenizer_path(tok["file"]), tok.get("lowercase", True))
    if codec.describe()["sha256"] != tok.get("sha256"):
        raise UserError("the decoder's tokenizer file differs from the one it was trained with", path=codec.file,
                        fix="restore the sentencepiece model recorded in litdec.json")
    backbone = load_model(backbone_spec, checkpoint_dir=checkpoint_dir, device=device)
    decoder = LitDecoder(backbone, DecoderConfig.from_dict(dec), image_width=meta["image_width"])
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = load_head_weights(decoder, state)
    if missing or unexpected:
        raise UserError(f"{directory / WEIGHTS_FILE} does not fit {META_FILE}: missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}", path=directory / WEIGHTS_FILE, fix="use the files written together")
    out = LoadedLitDecoder(decoder.to(device).eval(), codec, meta["prompts"], meta)
    out.provenance["spec"] = spec
    return out.eval()
