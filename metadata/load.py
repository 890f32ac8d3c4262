"""Reading metadata lists: the ones pairsift ships, or any JSON list of strings.

A metadata source is a language code naming a list shipped in this folder (``en``, or
``shipped`` for every shipped language at once), or a path to a JSON list of strings
(``.json``, or gzip-compressed ``.json.gz``; MetaCLIP's own ``metadata.json`` works as it is).
A path that does not exist but whose ``.gz`` sibling does is read from the sibling. A
directory stands for the ``<lang>.json[.gz]`` files in it (worldwide mode).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

from pairsift.pipeline.errors import ConfigError

SHIPPED_DIR = Path(__file__).resolve().parent
_LANG = re.compile(r"^[a-z]{2,3}(_[a-z]+)?$")
_SUFFIXES = (".json.gz", ".json")


def shipped_languages() -> list[str]:
    """Languages with a metadata list shipped in pairsift's ``metadata/`` folder."""
    return sorted(_languages_in(SHIPPED_DIR))


def _languages_in(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        for suffix in _SUFFIXES:
            name = p.name
            if name.endswith(suffix) and _LANG.match(name[: -len(suffix)]):
                out.setdefault(name[: -len(suffix)], p)
    return out


def resolve(source: str, key: str = "metadata") -> Path:
    """The file a single-list source names; ConfigError naming ``key`` when there is none."""
    if _LANG.match(source) and not os.path.exists(source):
        found = _languages_in(SHIPPED_DIR).get(source)
        if found is None:
            raise ConfigError(f"{key}: no shipped metadata for language {source!r} "
                              f"(shipped: {', '.join(shipped_languages()) or 'none'}); give a file path")
        return found
    p = Path(source).expanduser()
    if not p.exists() and Path(str(p) + ".gz").exists():
        p = Path(str(p) + ".gz")
    if not p.is_file():
        raise ConfigError(f"{key}: metadata file not found: {source}")
    return p.resolve()


def resolve_languages(source: str | dict[str, str], key: str = "metadata") -> dict[str, Path]:
    """Language -> file for worldwide mode: a mapping of sources, a directory of
    ``<lang>.json[.gz]`` files, or ``shipped``."""
    if isinstance(source, dict):
        return {lang: resolve(src, f"{key}.{lang}") for lang, src in source.items()}
    if source == "shipped":
        return _languages_in(SHIPPED_DIR)
    p = Path(source).expanduser()
    if p.is_dir():
        found = _languages_in(p)
        if not found:
            raise ConfigError(f"{key}: no <lang>.json or <lang>.json.gz files in {source}")
        return {lang: f.resolve() for lang, f in found.items()}
    raise ConfigError(f"{key}: worldwide mode needs a folder of <lang>.json files, 'shipped', "
                      f"or a mapping language -> file; got {source!r}")


def load_metadata(source: str | os.PathLike, key: str = "metadata") -> list[str]:
    """The entries of one metadata list, in order (ids are positions)."""
    path = resolve(str(source), key)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read metadata {path}: {e}") from None
    if isinstance(data, dict):  # MetaCLIP 2's per-language files map entry -> source tag
        data = list(data)
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ConfigError(f"{key}: {path} is not a JSON list of strings")
    return data


def write_metadata(entries: list[str], path: str | os.PathLike) -> Path:
    """Write a list as JSON (gzip-compressed, deterministically, when the name ends in .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(entries, ensure_ascii=False, indent=0) + "\n"
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
            f.write(text.encode("utf-8"))
    else:
        path.write_text(text, encoding="utf-8")
    return path
