"""Stage ``download``: fetch the images of URL rows inside the worker task, with img2dataset.

img2dataset (Beaumont 2021; the downloader of LAION-400M/5B, DataComp and MetaCLIP) cuts a URL
list into shards and hands each shard to its ``Downloader``, which fetches the shard's URLs on
a thread pool (``download_image_with_retry``: urllib with its Firefox user agent, optional
``user_agent_token``, ``timeout`` seconds, ``retries`` extra tries, and a refusal of bodies
whose ``X-Robots-Tag`` says ``noai``/``noimageai``/``noindex``/``noimageindex``) and passes each
body through its ``Resizer``. This stage runs exactly that code on the live rows of one batch:
the batch's URLs are one img2dataset shard (an Arrow file in memory) given to
``Downloader.download_shard``, with ``resize_mode: no`` and ``disable_all_reencoding``, so each
body is kept byte for byte as the server sent it (no decode check here: a body that is not an
image, an HTML page served with status 200, is dropped later by ``quality`` as
``decode_error``). Because it is a map stage, every worker downloads its own shards: on a
cluster every node downloads, and a shard whose phase committed is never fetched again (the
phase ledger is the resume-by-shard that img2dataset's ``_stats.json`` files were).

Rule: a live row with a ``url`` gets the fetched body in ``image``; a live row whose fetch
fails, or that has no URL, is dropped as ``download_failed``; a body over ``max_bytes`` is
dropped as ``member_too_large``. ``download_error`` holds img2dataset's error message (e.g.
``HTTP Error 404: Not Found``) for each such row. Rows dropped before this stage are not fetched.

Settings (``timeout``, ``retries``, ``threads``, ``max_bytes``) default to the job's
``input.download_timeout``, ``input.download_retries``, ``input.download_threads`` and
``input.max_image_bytes`` (:meth:`DownloadStage.for_input`); the engine inserts this stage into
URL-list jobs by itself (after the stages that need no pixels), or where the job lists it.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time

import pyarrow as pa
from pydantic import Field

from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import Stage, StageConfig

#: Settings taken from the job's ``input`` section when the stage config does not set them.
FROM_INPUT = {"timeout": "download_timeout", "retries": "download_retries", "threads": "download_threads",
              "max_bytes": "max_image_bytes"}
_SHARDS = itertools.count()
_IMPORT_LOCK = threading.Lock()


class DownloadConfig(StageConfig):
    #: Seconds img2dataset's urllib call waits (img2dataset's ``timeout``).
    timeout: float = Field(10.0, gt=0)
    #: Extra tries after a failed fetch (img2dataset's ``retries``).
    retries: int = Field(0, ge=0)
    #: Fetches in flight per worker (img2dataset's ``thread_count``).
    threads: int = Field(16, ge=1)
    #: Largest body kept; a larger one is dropped as ``member_too_large``.
    max_bytes: int = Field(64 * 2**20, ge=1)
    #: img2dataset's ``user_agent_token`` (added to its user agent string).
    user_agent_token: str | None = None
    #: X-Robots-Tag directives that refuse a body; null: img2dataset's default
    #: (noai, noimageai, noindex, noimageindex); []: none.
    disallowed_header_directives: list[str] | None = None


def _import_img2dataset():
    """img2dataset's ``Downloader`` and ``Resizer``. Its package imports webdataset, whose
    optional DataLoader glue imports torch (seconds per process): where torch is not loaded
    yet, that import is skipped (torch stays importable afterwards)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
    with _IMPORT_LOCK:
        blocked = "torch" not in sys.modules
        if blocked:
            sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            from img2dataset.downloader import Downloader
            from img2dataset.resizer import Resizer
        finally:
            if blocked and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    return Downloader, Resizer


class _Collected:
    """An img2dataset sample writer that keeps what it is given in memory: row -> (body,
    error message). One class per batch (img2dataset instantiates it per shard)."""

    sink: dict[int, tuple[bytes | None, str | None]]

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        pass

    def write(self, img_str, key, caption, meta):
        self.sink[int(meta["row"])] = (img_str, meta.get("error_message"))

    def close(self):
        pass


class DownloadStage(Stage[DownloadConfig]):
    name = "download"
    # What was downloaded is computed once: a rerun with new decisions fetches nothing again (and
    # a link that died since cannot change the result). The bytes are kept in the compute cache.
    rewrites = ("image",)
    scores = ()

    @classmethod
    def needs_pixels(cls, config) -> bool:
        return False  # it supplies them

    @classmethod
    def for_input(cls, input_spec, config: DownloadConfig | None = None) -> DownloadConfig:
        """The config for a job reading ``input_spec``: every setting the job did not give the
        stage itself comes from ``input`` (``download_timeout``, ``download_retries``,
        ``download_threads``, ``max_image_bytes``)."""
        config = config or DownloadConfig()
        update = {f: getattr(input_spec, src) for f, src in FROM_INPUT.items() if f not in config.model_fields_set}
        return DownloadConfig.model_validate({**config.model_dump(exclude_unset=True), **update})

    def __init__(self, config: DownloadConfig, context=None):
        super().__init__(config, context)
        self._classes = None
        self._seconds = 0.0

    def preflight(self) -> None:
        import importlib.util

        from pairsift.pipeline.errors import ConfigError

        if importlib.util.find_spec("img2dataset") is None:
            raise ConfigError("download: img2dataset is not installed (pip install img2dataset)")

    def setup(self) -> None:
        self._classes = _import_img2dataset()

    def _fetch(self, rows: list[tuple[int, str]]) -> dict[int, tuple[bytes | None, str | None]]:
        """img2dataset's ``Downloader.download_shard`` on one in-memory shard of (row, url)."""
        import fsspec

        if self._classes is None:
            self.setup()
        Downloader, Resizer = self._classes
        c = self.config
        sink: dict[int, tuple[bytes | None, str | None]] = {}
        writer = type("_Writer", (_Collected,), {"sink": sink})
        tag = f"pairsift-download/{os.getpid()}-{threading.get_ident()}-{next(_SHARDS)}"
        fs = fsspec.filesystem("memory")
        table = pa.table({"url": pa.array([u for _, u in rows], pa.string()),
                          "row": pa.array([i for i, _ in rows], pa.int64())})
        with fs.open(f"/{tag}/urls.arrow", "wb") as f:
            with pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
        directives = c.disallowed_header_directives
        if directives is None:  # img2dataset.download's default
            directives = ["noai", "noimageai", "noindex", "noimageindex"]
        downloader = Downloader(
            sample_writer_class=writer, thread_count=c.threads, save_caption=False, extract_exif=False,
            resizer=Resizer(image_size=256, resize_mode="no", resize_only_if_bigger=False,
                            disable_all_reencoding=True),
            output_folder=f"memory://{tag}/out", column_list=["url", "row"], timeout=c.timeout,
            number_sample_per_shard=max(10, len(rows)), oom_shard_count=5, compute_hash=None,
            verify_hash_type=None, encode_format="jpg", retries=c.retries,
            user_agent_token=c.user_agent_token, disallowed_header_directives=directives or None)
        try:
            downloader.download_shard((0, f"memory://{tag}/urls.arrow"))
        finally:
            if fs.exists(f"/{tag}"):
                fs.rm(f"/{tag}", recursive=True)  # the stats file (the shard file it removed itself)
        return sink

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        live = live_mask(batch)
        urls = batch.column("url").to_pylist() if "url" in batch.column_names else [None] * n
        images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n
        errors: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n
        todo = [(i, urls[i]) for i in range(n) if live[i] and urls[i]]
        for i in range(n):
            if live[i] and not urls[i]:
                reasons[i], errors[i] = "download_failed", "no url"
        if todo:
            t0 = time.perf_counter()
            got = self._fetch(todo)
            self._seconds += time.perf_counter() - t0
            cap = self.config.max_bytes
            for i, _ in todo:
                body, message = got.get(i, (None, "img2dataset returned nothing for this row"))
                if body is None:
                    reasons[i], errors[i] = "download_failed", message or "unknown error"
                elif len(body) > cap:
                    reasons[i], errors[i] = "member_too_large", f"{len(body)} bytes, over the cap of {cap}"
                else:
                    images[i] = body
        batch = set_column(batch, "image", pa.array(images, pa.binary()))
        batch = set_column(batch, "download_error", pa.array(errors, pa.string()))
        return mark_dropped(batch, reasons, self.name)

    def summary(self) -> dict:
        c = self.config
        return {"downloader": "img2dataset", "timeout": c.timeout, "retries": c.retries, "threads": c.threads}

    def take_timings(self) -> dict[str, float]:
        out, self._seconds = ({"fetch": self._seconds} if self._seconds else {}), 0.0
        return out


__all__ = ["DownloadStage", "DownloadConfig", "FROM_INPUT"]
