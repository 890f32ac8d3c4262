"""open_clip models for the ``clip_score`` stage: naming, the weights-cache check, loading,
and ``pairsift models pull``.

A model is named the way open_clip names it, plus one pairsift addition:

* ``model``: a built-in architecture (``ViT-B-32``, ``ViT-L-14``, ...), ``hf-hub:org/repo``
  (config and weights from a Hugging Face Hub repo, ``pretrained`` left empty),
  ``local-dir:/path`` (a folder with ``open_clip_config.json`` and weights), or **a path to an
  open_clip model config JSON** (``{"embed_dim", "vision_cfg", "text_cfg"}``): it is
  registered with ``open_clip.add_model_config`` in every process that loads it, and its
  file name without ``.json`` becomes the architecture's name.
* ``pretrained``: one of open_clip's tags for that architecture (``laion2b_s34b_b79k``,
  ``openai``, ...), ``hf-hub:org/repo`` or ``hf-hub:org/repo/file.safetensors`` (a weights
  file on the Hub, loaded into ``model``'s architecture), a local checkpoint file, or
  ``random`` (random weights: for benchmarks only).

Everything is downloaded and loaded by open_clip itself (``create_model_and_transforms``,
``get_tokenizer``, ``download_pretrained``), into the Hugging Face cache (``HF_HOME``) or, for
the few tags that only have a URL, ``~/.cache/clip``.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import numpy as np

from pairsift.pipeline.errors import ConfigError

#: The configuration key errors name by default (the parrot stage passes ``parrot.clip``).
WHERE = "clip_score"
RANDOM = "random"
HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"
_URL_CACHE = "~/.cache/clip"  # where open_clip's download_pretrained_from_url puts files


def is_config_file(model: str) -> bool:
    return model.endswith(".json")


def has_schema(model: str) -> bool:
    return model.startswith((HF_HUB, LOCAL_DIR))


def arch_name(model: str) -> str:
    """The name open_clip knows the architecture by (``ViT-B/32`` -> ``ViT-B-32``; a config
    file -> its stem)."""
    if is_config_file(model):
        return Path(model).stem
    if has_schema(model):
        return model
    return model.replace("/", "-")


def register(model: str) -> str:
    """Make ``model`` known to open_clip in this process; return the name to create it by."""
    if is_config_file(model):
        import open_clip

        name = arch_name(model)
        if name not in open_clip.list_models() or open_clip.get_model_config(name) != read_config_file(model):
            open_clip.add_model_config(model)
        return name
    return arch_name(model)


def read_config_file(path: str, where: str = WHERE) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{where}.model: model config file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}.model: cannot read model config {path}: {e}") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ConfigError(f"{where}.model: {path} is not an open_clip model config "
                          f"(needs embed_dim, vision_cfg and text_cfg)")
    return cfg


def model_config(model: str, where: str = WHERE) -> dict:
    """The architecture config of ``model`` (for ``hf-hub:`` read from the Hub cache)."""
    if is_config_file(model):
        return read_config_file(model, where)
    import open_clip

    cfg = open_clip.get_model_config(arch_name(model))
    if cfg is None:
        raise ConfigError(f"{where}.model: no open_clip model config for {model!r}")
    return cfg


def embed_dim(model: str, where: str = WHERE) -> int:
    return int(model_config(model, where)["embed_dim"])


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """Where a (model, pretrained) pair's files come from."""

    model: str
    pretrained: str | None
    hub_files: tuple[tuple[str, str | None], ...] = ()  # (repo, file name; None: open_clip's default)
    url: str = ""  # for tags with no Hub copy
    local_file: str = ""

    @property
    def label(self) -> str:
        if self.pretrained is None:
            return f"model {self.model!r}"
        return f"model {self.model!r} with pretrained {self.pretrained!r}"

    @property
    def pull_name(self) -> str:
        return self.model if self.pretrained is None else f"{self.model}:{self.pretrained}"


def _hub_weight_names(filename: str | None) -> tuple[str, ...]:
    """open_clip's file choice on the Hub: the safetensors copy first where there is one."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def split_hub(ref: str, where: str = WHERE) -> tuple[str, str | None]:
    """``org/repo`` -> (``org/repo``, None); ``org/repo/dir/file`` -> (``org/repo``, ``dir/file``)."""
    parts = ref.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"{where}.pretrained: {HF_HUB}{ref} is not hf-hub:org/repo[/file]")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def resolve(model: str, pretrained: str | None, where: str = WHERE) -> Weights:
    """Check the names (without touching the network) and say which files they need.

    Raises :class:`ConfigError` naming the key for unknown architectures, tags and files.
    A config file with a checkpoint file is checked without importing open_clip (torch)."""
    if is_config_file(model):
        read_config_file(model, where)
        if pretrained and (pretrained == RANDOM or os.path.isfile(pretrained)):
            return Weights(model, pretrained, local_file="" if pretrained == RANDOM else pretrained)
    import open_clip

    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR):])
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"{where}.model: {model}: no open_clip_config.json in {folder}")
    elif not model.startswith(HF_HUB) and not is_config_file(model) and arch_name(model) not in open_clip.list_models():
        close = difflib.get_close_matches(arch_name(model), open_clip.list_models(), n=5)
        raise ConfigError(f"{where}.model: unknown open_clip model {model!r}"
                          + (f"; did you mean {', '.join(close)}?" if close else "")
                          + " (or give the path of a model config .json)")

    if has_schema(model):
        if pretrained not in (None, ""):
            raise ConfigError(f"{where}.pretrained: must be empty when model is {model!r} "
                              f"(the weights come from there)")
        if model.startswith(HF_HUB):
            repo, _ = split_hub(model[len(HF_HUB):], where)
            return Weights(model, None, hub_files=((repo, "open_clip_config.json"), (repo, None)))
        return Weights(model, None)

    if not pretrained:
        raise ConfigError(f"{where}.pretrained: {model!r} needs weights: an open_clip tag "
                          f"({', '.join(open_clip.list_pretrained_tags_by_model(arch_name(model))) or 'none known'}), "
                          f"hf-hub:org/repo, a checkpoint file, or 'random'")
    if pretrained == RANDOM:
        return Weights(model, pretrained)
    if pretrained.startswith(HF_HUB):
        repo, filename = split_hub(pretrained[len(HF_HUB):], where)
        return Weights(model, pretrained, hub_files=((repo, filename),))
    cfg = open_clip.get_pretrained_cfg(arch_name(model), pretrained)
    if cfg:
        if "file" in cfg:
            return Weights(model, pretrained, local_file=cfg["file"])
        from open_clip.pretrained import has_hf_hub

        if cfg.get("hf_hub") and has_hf_hub():
            repo, filename = os.path.split(cfg["hf_hub"])
            return Weights(model, pretrained, hub_files=((repo, filename or None),))
        return Weights(model, pretrained, url=cfg.get("url", ""))
    if os.path.isfile(pretrained):
        return Weights(model, pretrained, local_file=pretrained)
    tags = open_clip.list_pretrained_tags_by_model(arch_name(model))
    raise ConfigError(f"{where}.pretrained: {pretrained!r} is neither a checkpoint file nor an open_clip tag "
                      f"of {model!r}" + (f" (its tags: {', '.join(tags)})" if tags else ""))


def cached_files(w: Weights) -> list[str] | None:
    """The local files ``w`` needs if they are all present, else None. No network."""
    if w.local_file:
        return [w.local_file] if os.path.isfile(w.local_file) else None
    out = []
    if w.hub_files:
        from huggingface_hub import try_to_load_from_cache

        for repo, filename in w.hub_files:
            hits = [try_to_load_from_cache(repo, n) for n in _hub_weight_names(filename)]
            hit = next((h for h in hits if isinstance(h, str) and os.path.isfile(h)), None)
            if hit is None:
                return None
            out.append(hit)
    if w.url:
        target = os.path.join(os.path.expanduser(_URL_CACHE), os.path.basename(w.url))
        if not os.path.isfile(target):
            return None
        out.append(target)
    return out


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def fetch(w: Weights) -> list[str]:
    """Download what ``w`` needs into the cache with open_clip's own downloaders (which
    prefer a safetensors copy where the Hub has one)."""
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf

    out = [download_pretrained_from_hf(repo, filename=filename) for repo, filename in w.hub_files]
    if w.url:
        out.append(download_pretrained({"url": w.url}))
    return out


def unreachable(w: Weights) -> str | None:
    """Why the hosts ``w`` downloads from cannot be reached (a quick TCP connect: the Hub
    client retries for minutes on a machine without network), or None. Behind a proxy the
    client's own attempt decides."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    from huggingface_hub import constants

    urls = ([constants.ENDPOINT] if w.hub_files else []) + ([w.url] if w.url else [])
    for url in urls:
        u = urlparse(url)
        try:
            socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=10).close()
        except OSError as e:
            return f"cannot reach {u.hostname}: {e}"
    return None


def ensure_weights(w: Weights, where: str = WHERE) -> list[str]:
    """Preflight: the weights are cached, or fetched now; else a ConfigError naming the model
    and both fixes."""
    if w.pretrained == RANDOM:
        return []
    if w.local_file and not os.path.isfile(w.local_file):
        raise ConfigError(f"{where}.pretrained: checkpoint file not found: {w.local_file}")
    files = cached_files(w)
    if files is not None:
        return files
    source = ", ".join(f"Hugging Face Hub {repo}" for repo, _ in w.hub_files) or w.url
    if offline():
        why = "this machine is offline (HF_HUB_OFFLINE is set)"
    else:
        why = unreachable(w)
        if why is None:
            try:
                return fetch(w)
            except Exception as e:  # noqa: BLE001 - any download failure is the same advice
                why = f"fetching failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    from huggingface_hub import constants

    raise ConfigError(
        f"{where}: the weights of {w.label} ({source}) are not in the local cache and cannot be "
        f"fetched: {why}. Either fetch them into the cache on a connected machine with "
        f"`pairsift models pull {w.pull_name}` (and copy the cache, {constants.HF_HUB_CACHE}, to this "
        f"machine or set HF_HOME to a copy of it), or point `pretrained` at a local checkpoint file "
        f"(pretrained: /path/to/open_clip_model.safetensors).")


def check_tokenizer_files(model: str, where: str = WHERE) -> None:
    """Architectures with a Hugging Face text tower or tokenizer need its files too."""
    text_cfg = model_config(model, where).get("text_cfg", {})
    repos = {text_cfg.get("hf_tokenizer_name") or "", text_cfg.get("hf_model_name") or ""} - {""}
    if not repos or not offline():
        return
    from huggingface_hub import try_to_load_from_cache

    for repo in sorted(repos):
        if not any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("config.json", "tokenizer_config.json")):
            raise ConfigError(
                f"{where}: {model!r} needs the Hugging Face files of {repo} (text tower / tokenizer), "
                f"which are not cached and this machine is offline. Fetch them on a connected machine "
                f"with `pairsift models pull {model}:<pretrained>` and copy the cache here.")


# --------------------------------------------------------------------------- loading


def _tag_config(arch: str, pretrained: str | None) -> dict:
    """open_clip's pretrained config for ``pretrained`` under architecture ``arch``: a tag, or
    ``hf-hub:org/repo[/file]`` naming the Hub repo of one of the architecture's tags; else {}."""
    import open_clip

    if not pretrained or pretrained == RANDOM:
        return {}
    if not pretrained.startswith(HF_HUB):
        return open_clip.get_pretrained_cfg(arch, pretrained) or {}
    repo = "/".join(pretrained[len(HF_HUB):].strip("/").split("/")[:2])
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        if cfg.get("hf_hub") and os.path.dirname(cfg["hf_hub"]) == repo:
            return cfg
    return {}


def quick_gelu(model: str, pretrained: str | None) -> bool:
    """Whether ``model`` with ``pretrained`` runs with QuickGELU (x * sigmoid(1.702 x)).

    OpenAI's CLIP (Radford et al. 2021) was trained with QuickGELU, and so were the other
    weights whose open_clip pretrained config says ``quick_gelu: True`` (OpenAI's, MetaCLIP 1's,
    ...). open_clip 3's plain architectures (``ViT-B-32``, ``ViT-L-14``) use ``nn.GELU`` and
    only warn when such weights are loaded into them; the numbers are then not OpenAI CLIP's.
    Rule: QuickGELU when the architecture's config says so (``ViT-B-32-quickgelu``, a config
    file with ``quick_gelu: true``, an ``hf-hub:``/``local-dir:`` model's ``open_clip_config.json``)
    or when the pretrained tag's config does (``pretrained: hf-hub:org/repo`` counts as the tag
    whose Hub repo it names). A local checkpoint file carries no such flag: name the
    ``-quickgelu`` architecture for one with QuickGELU weights."""
    if model_config(model).get("quick_gelu"):
        return True
    if is_config_file(model) or has_schema(model):
        return False
    return bool(_tag_config(arch_name(model), pretrained).get("quick_gelu"))


@dataclass
class LoadedModel:
    model: Any  # open_clip CLIP / CustomTextCLIP, eval mode
    preprocess: Any  # open_clip's inference preprocess (PIL image -> tensor)
    tokenizer: Any  # open_clip's tokenizer for the model (truncates to its context length)
    device: Any
    input_dtype: Any  # dtype images are cast to (None: float32)
    embed_dim: int
    quick_gelu: bool = False  # the model runs QuickGELU (see :func:`quick_gelu`)

    def image_tensor(self, img) -> Any:
        """A PIL image as the model's input, decoded the way open_clip_train's loader feeds
        training: converted to RGB first (webdataset's ``pilrgb``), then open_clip's inference
        ``preprocess``. (The transform's own RGB conversion comes after the resize, so a
        palette, bilevel or greyscale image would be resized in its own mode.)"""
        return self.preprocess(img if img.mode == "RGB" else img.convert("RGB"))


def load(model: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32",
         where: str = WHERE) -> LoadedModel:
    """Create the model, its inference preprocess and its tokenizer with open_clip, with
    QuickGELU where the weights were trained with it (:func:`quick_gelu`)."""
    import open_clip
    import torch

    name = register(model)
    if pretrained == RANDOM:
        weights = None
    elif pretrained and pretrained.startswith(HF_HUB):
        weights = fetch(resolve(model, pretrained, where))[0]  # a cache hit when preflight ran
    else:
        weights = pretrained or None
    quick = quick_gelu(model, pretrained)
    net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device,
                                                               precision=precision, force_quick_gelu=quick)
    net.eval()
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(net, preprocess, tokenizer, torch.device(device), open_clip.get_input_dtype(precision),
                       embed_dim(model, where), quick)


# --------------------------------------------------------------------------- decoding on the device

#: The steps of open_clip's inference preprocess that :class:`TensorPreprocess` runs on tensors.
_TENSOR_STEPS = ("Resize", "CenterCrop", "MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize")


class TensorPreprocess:
    """open_clip's inference ``preprocess`` on decoded images held as uint8 RGB tensors (C, H,
    W) on any device, for ``clip_score.decode: gpu``: JPEGs are decoded in batches by
    ``torchvision.io.decode_jpeg`` on the model's device (nvJPEG on CUDA, libjpeg-turbo on CPU)
    and the preprocess's own ``Resize`` and ``CenterCrop`` (torchvision transforms, which take
    tensors: bicubic with antialiasing, rounded back to uint8 as Pillow's resize is) run there
    too, then /255 and its ``Normalize``. The pixels differ from Pillow's resize by a few
    levels at edges, so scores differ slightly from ``decode: cpu`` (the test bounds it).

    Only the ``shortest`` resize mode (every open_clip ViT/ConvNeXt config) is built of those
    steps; any other preprocess raises ConfigError. Anything that is not a JPEG, a CMYK JPEG
    (Pillow's conversion is the reference), or a file torchvision refuses (it fails on any
    libjpeg warning: truncation, corrupt data) is left to the caller's Pillow path (None), so a
    damaged image gets Pillow's verdict."""

    def __init__(self, preprocess: Any, device: Any):
        names = [type(t).__name__ for t in getattr(preprocess, "transforms", [preprocess])]
        unknown = [n for n in names if n not in _TENSOR_STEPS]
        if unknown:
            raise ConfigError(f"{WHERE}.decode: gpu runs open_clip's preprocess on tensors, which this model's "
                              f"preprocess ({', '.join(names)}) cannot do ({', '.join(unknown)}); use decode: cpu")
        self.steps = [t for t in preprocess.transforms if type(t).__name__ in ("Resize", "CenterCrop")]
        self.normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.device = device

    def decode(self, images: list[bytes]) -> list[Any]:
        """The model inputs of ``images`` (float32 tensors on the device), None where this
        path cannot decode one (the caller decodes those with Pillow)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[Any] = [None] * len(images)
        rows = [i for i, d in enumerate(images) if d[:3] == b"\xff\xd8\xff"]
        if not rows:
            return out
        data = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in rows]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=self.device)
        except Exception:  # one bad image fails the batch: decode one by one, the bad ones stay None
            decoded = []
            for x in data:
                try:
                    decoded.append(decode_jpeg(x, mode=ImageReadMode.UNCHANGED, device=self.device))
                except Exception:  # noqa: BLE001 - Pillow gets its turn
                    decoded.append(None)
        for i, x in zip(rows, decoded):
            # greyscale as Pillow's convert("RGB") makes it; CMYK (4 channels) is Pillow's to convert
            if x is not None and x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[1] > 0 and x.shape[2] > 0:
                out[i] = self.tensor(x.expand(3, -1, -1) if x.shape[0] == 1 else x)
        return out

    def tensor(self, x: Any) -> Any:
        """One decoded uint8 (3, H, W) image as the model's input."""
        for step in self.steps:
            x = step(x)
        return self.normalize(x.float().div_(255.0))


# --------------------------------------------------------------------------- running

#: On CPU every model call embeds at most this many pairs, with one torch thread.
CPU_BATCH = 16


def embed_batch(m: LoadedModel, pixels, tokens) -> tuple[np.ndarray, np.ndarray, float]:
    """One model call: L2-normalised float32 image and text embeddings of a batch of pairs
    (preprocessed images stacked, token rows), and the seconds it took."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    with torch.inference_mode():
        x = pixels.to(m.device, non_blocking=True)
        if m.input_dtype is not None:
            x = x.to(m.input_dtype)
        image = F.normalize(m.model.encode_image(x).float(), dim=-1)
        text = F.normalize(m.model.encode_text(tokens.to(m.device)).float(), dim=-1)
        out = image.cpu().numpy(), text.cpu().numpy()
    return out[0], out[1], time.perf_counter() - t0


def _embed_one_thread(m: LoadedModel, pixels, tokens) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`embed_batch` with one torch thread, set in the thread that runs it, right before
    (libgomp keeps the count per thread once a thread has set it and run a parallel region,
    but a thread that only set it follows what another thread sets later)."""
    import torch

    torch.set_num_threads(1)
    return embed_batch(m, pixels, tokens)


class PairEmbedder:
    """Embeds (image, caption) pairs with a loaded model so that the numbers do not depend on
    how many CPUs compute them.

    torch's float32 matrix products on CPU (MKL) split the sum of a small batch across
    threads: the same 5 to 11 pairs embed to different last bits with 1 and with 2 threads,
    so scores, and a ``min_score`` or ``top_fraction`` cut near a tie, would follow the
    machine and ``--num-cpus``. On CPU every model call therefore runs with one torch
    thread on a batch whose composition the caller fixes (``clip_score``: :data:`CPU_BATCH`
    pairs), and up to ``threads`` calls run side by side, each in its own thread: the worker's
    CPUs are used, and each call computes what one thread alone would. On CUDA the calls
    run in the calling thread, as batches of the caller's size."""

    def __init__(self, loaded: LoadedModel, threads: int = 1):
        self.m = loaded
        self.pool = (ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-model")
                     if loaded.device.type == "cpu" else None)

    def run(self, batches: Iterable) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """:func:`embed_batch` of every (stacked images, token rows) batch that ``batches``
        yields, in order; on CPU each call starts as soon as it is yielded. The calling
        thread's torch thread count is what it was before, afterwards."""
        if self.pool is None:
            return [embed_batch(self.m, pixels, tokens) for pixels, tokens in batches]
        import torch

        keep = torch.get_num_threads()
        try:
            calls = [self.pool.submit(_embed_one_thread, self.m, pixels, tokens) for pixels, tokens in batches]
            return [c.result() for c in calls]
        finally:
            torch.set_num_threads(keep)

    def embed(self, pixels: list, tokens, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and text embeddings of all pairs, in model calls of ``batch`` pairs."""
        import torch

        parts = self.run((torch.stack(pixels[i:i + batch]), tokens[i:i + batch]) for i in range(0, len(pixels), batch))
        if not parts:
            return np.zeros((0, self.m.embed_dim), np.float32), np.zeros((0, self.m.embed_dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


# --------------------------------------------------------------------------- pairsift models pull


def parse_pull_name(text: str) -> tuple[str, str | None]:
    """``MODEL:PRETRAINED`` (or ``hf-hub:org/repo``, ``local-dir:/path``) -> (model, pretrained)."""
    if text.startswith(LOCAL_DIR) or (text.startswith(HF_HUB) and ":" not in text[len(HF_HUB):]):
        return text, None
    cut = text.find(":" + HF_HUB)
    if cut > 0:
        return text[:cut], text[cut + 1:]
    model, sep, pretrained = text.partition(":")
    if not sep or not model or not pretrained:
        raise ConfigError(f"models pull: expected MODEL:PRETRAINED (e.g. ViT-B-32:laion2b_s34b_b79k) "
                          f"or hf-hub:org/repo, got {text!r}")
    return model, pretrained


def pull(text: str) -> list[str]:
    """Fetch a model's weights (and tokenizer / text tower files) into the cache by loading it
    once with open_clip; return the cached weight files."""
    model, pretrained = parse_pull_name(text)
    w = resolve(model, pretrained)
    files = cached_files(w)
    if files is None:
        if offline():
            raise ConfigError(f"models pull: {text} is not cached and HF_HUB_OFFLINE is set; "
                              f"unset it on a machine with network access")
        why = unreachable(w)
        if why:
            raise ConfigError(f"models pull: {text}: {why}")
        files = fetch(w)
    load(model, pretrained)  # the tokenizer and any Hugging Face text tower come along
    return files


def _cmd_pull(args) -> int:
    for name in args.names:
        files = pull(name)
        print(f"{name}: cached" + "".join(f"\n  {f}" for f in files))
    return 0


def add_commands(subparsers) -> None:
    models = subparsers.add_parser("models", help="open_clip models used by clip_score")
    sub = models.add_subparsers(dest="models_command", required=True)
    p = sub.add_parser("pull", help="fetch model weights into the local cache (needs network)",
                       description="Fetch open_clip weights into the local cache, so that jobs "
                                   "run later (or on a machine without network that gets a copy of "
                                   "the cache) find them.")
    p.add_argument("names", nargs="+", metavar="MODEL:PRETRAINED",
                   help="e.g. ViT-B-32:laion2b_s34b_b79k, ViT-L-14:datacomp_xl_s13b_b90k, hf-hub:org/repo")
    p.set_defaults(func=_cmd_pull)
