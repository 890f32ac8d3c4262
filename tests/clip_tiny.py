"""A tiny open_clip model for tests: built from a config, random weights saved to a file.

``write_tiny_clip(folder)`` writes ``pairsift-tiny-clip.json`` (the architecture, which the
``clip_score`` stage registers with open_clip in every process that loads it) and
``pairsift-tiny-clip.pt`` (``torch.save`` of the state dict, loaded through open_clip's
``pretrained=<file>`` path).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NAME = "pairsift-tiny-clip"


def write_tiny_clip(folder) -> tuple[str, str]:
    """(config path, weights path) of the tiny model, made in ``folder``."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config, weights = folder / f"{NAME}.json", folder / f"{NAME}.pt"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), weights)
    return str(config), str(weights)


def plain_scores(config: str, weights: str, pairs: list[tuple[bytes, str]]) -> list[float]:
    """Scores of (image bytes, caption) pairs the plain open_clip way, one pair at a time, the
    image decoded as open_clip_train's loader feeds training (``pilrgb``: RGB first)."""
    import open_clip
    import torch
    from PIL import Image

    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(NAME)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    try:
        with torch.no_grad():
            for data, caption in pairs:
                rgb = Image.open(io.BytesIO(data)).convert("RGB")
                image = model.encode_image(preprocess(rgb).unsqueeze(0), normalize=True)
                text = model.encode_text(tokenizer([caption]), normalize=True)
                out.append(float((image * text).sum()))
    finally:
        torch.set_num_threads(threads)
    return out


def put_in_hf_cache(hub_cache, repo: str, files: dict) -> Path:
    """Put ``files`` (name -> bytes, or the path of a file to link) into a Hugging Face Hub
    cache folder (``HF_HOME/hub``) as repo ``repo``'s main revision, the layout
    ``hf_hub_download`` finds offline. Returns the snapshot folder."""
    import os

    root = Path(hub_cache) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(snap.name)
    for name, payload in files.items():
        target = snap / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(payload, bytes):
            target.write_bytes(payload)
        else:
            os.symlink(os.path.abspath(payload), target)
    return snap
