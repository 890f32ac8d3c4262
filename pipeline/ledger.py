"""The commit/resume ledger: one marker file per committed task (DataTrove-style).

A task's outputs are published first (atomic renames), then its marker; a rerun skips
every task whose marker exists. The marker holds the task's summary (counts, timings) and
the partial a global stage's scan produced is stored beside it.
"""

from __future__ import annotations

from typing import Any

from pairsift.pipeline import layout, storage


class Ledger:
    def __init__(self, output: str):
        self.root = layout.ledger_dir(output)

    def _marker(self, step: str, name: str) -> str:
        return storage.join(self.root, step, f"{name}.json")

    def _partial(self, step: str, name: str) -> str:
        return storage.join(self.root, step, f"{name}.partial.pkl")

    def committed(self, step: str, name: str) -> bool:
        return storage.exists(self._marker(step, name))

    def commit(self, step: str, name: str, summary: dict, partial: Any = None) -> None:
        if partial is not None:
            storage.write_pickle(self._partial(step, name), partial)
        storage.write_json(self._marker(step, name), summary)

    def summary(self, step: str, name: str) -> dict:
        return storage.read_json(self._marker(step, name))

    def partial(self, step: str, name: str) -> Any:
        return storage.read_pickle(self._partial(step, name))
