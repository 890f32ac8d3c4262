"""``brightness``: a global stage defined outside pairsift, the way a user writes one.

It adds a score (``brightness``, the mean grey level of the image, 0-255) and a column that is
not one (``brightness_gpu``: the CUDA devices its worker was given, to show its resource request
was honoured), drops images darker than ``min_brightness``, writes an artifact
(``OUT/brightness/histogram.parquet``) and its own section of the report. Nothing under
``pairsift/pipeline`` names it.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa

from pairsift.pipeline.table import live_mask, mark_dropped, set_column
from pairsift.stages.base import GlobalStage, Resources, StageConfig


class BrightnessConfig(StageConfig):
    min_brightness: float = 0.0
    gpus: float = 0.0


class BrightnessStage(GlobalStage[BrightnessConfig]):
    name = "brightness"
    scores = ("brightness",)
    artifacts = ("brightness",)

    def resources(self) -> Resources:
        return Resources(cpus=1.0, gpus=self.config.gpus)

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        values: list[float | None] = []
        for ok, data in zip(live_mask(batch), batch.column("image").to_pylist()):
            if not ok or data is None:
                values.append(None)
                continue
            with Image.open(io.BytesIO(data)) as img:
                values.append(float(np.asarray(img.convert("L"), dtype=np.float32).mean()))
        batch = set_column(batch, "brightness", values, pa.float32())
        device = os.environ.get("CUDA_VISIBLE_DEVICES")
        return set_column(batch, "brightness_gpu", [device] * batch.num_rows, pa.string())

    def scan(self, batch: pa.Table, pass_name: str, state) -> np.ndarray:
        v = batch.column("brightness").to_numpy(zero_copy_only=False)
        v = v[~np.isnan(v.astype(float))] if len(v) else v
        return np.histogram(v.astype(float), bins=16, range=(0, 256))[0]

    def combine(self, partials: list[np.ndarray], pass_name: str) -> np.ndarray:
        return np.sum(partials, axis=0) if partials else np.zeros(16, dtype=np.int64)

    def merge(self, partials, pass_name: str, state) -> np.ndarray:
        total = np.zeros(16, dtype=np.int64)
        for p in partials:  # streamed from the ledger
            total += p
        return total

    def apply(self, batch: pa.Table, state: np.ndarray) -> pa.Table:
        v = batch.column("brightness").to_pylist()
        live = live_mask(batch)
        reasons = ["too_dark" if ok and b is not None and b < self.config.min_brightness else None
                   for ok, b in zip(live, v)]
        return mark_dropped(batch, reasons, self.name)

    def finalize(self, state: np.ndarray, output: str) -> dict:
        import pyarrow.parquet as pq

        from pairsift.pipeline import storage

        table = pa.table({"bin": np.arange(16, dtype=np.int32) * 16, "count": np.asarray(state, dtype=np.int64)})
        with storage.atomic_open(storage.join(output, "brightness", "histogram.parquet")) as f:
            pq.write_table(table, f)
        return {"images": int(np.sum(state))}

    @classmethod
    def report_section(cls, output: str, manifest: dict) -> str | None:
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(output, "brightness", "histogram.parquet"))
        rows = "".join(f"<tr><td>{b}</td><td>{c}</td></tr>" for b, c in zip(t["bin"].to_pylist(), t["count"].to_pylist()))
        return f'<section id="brightness"><h2>Brightness histogram</h2><table>{rows}</table></section>'
