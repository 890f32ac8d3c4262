"""MetaCLIP's balancing arithmetic: entry counts -> entry probabilities -> a kept draw.

"Demystifying CLIP Data" (Xu et al. 2023): an entry matched by ``count_e`` captions gets
probability ``p_e = 1`` if ``count_e < t`` else ``t / count_e``; a caption is kept with
probability ``1 - prod(1 - p_e)`` over the entries it matches (0 if none). ``t`` can be
chosen from a tail share (the share of all matches held by entries below ``t``); MetaCLIP 2
transfers English ``t`` to every language through that share.

:data:`PAPER_TAIL_SHARE` is the tail share MetaCLIP's own setting implies: at ``t = 20,000``
on its 1.6B-pair pool (400M curated) about 16k of the 500k entries are head entries, holding
5.35B of the pool's 5.67B matches (paper, Sec. 3.4; the released ``entry_counts_400m.json``
agrees), so the tail holds (5.67 - 5.35) / 5.67 = 5.64% of all matches. Deriving ``t`` from
this share balances a pool of any size the way ``t = 20k`` balanced 1.6B pairs.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Share of all matches held by tail entries (count < t) in MetaCLIP 1's 400M setting:
#: t = 20k on the 1.6B pool, 16k head entries with 5.35B of 5.67B matches.
PAPER_TAIL_SHARE = round((5.67 - 5.35) / 5.67, 4)  # 0.0564
#: MetaCLIP 1's t for its 400M set (pool of 1.6B pairs); 170k for 2.5B (MetaCLIP 2's t_en).
PAPER_T = 20_000


def t_to_p(counts: np.ndarray, t: float) -> float:
    """Share of all matches held by entries whose count is below ``t``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total > 0 else 0.0


def p_to_t(counts: np.ndarray, p: float) -> int:
    """The count at the sorted position whose cumulative share of matches is closest to
    ``p`` (first such position on ties), as MetaCLIP 2 does; at least 1."""
    counts = np.sort(np.asarray(counts, dtype=np.int64))
    total = counts.sum()
    if counts.size == 0 or total == 0:
        return 1
    share = np.cumsum(counts) / total
    return max(1, int(counts[int(np.argmin(np.abs(share - p)))]))


def entry_probs(counts: np.ndarray, t: float) -> np.ndarray:
    """``p_e = 1`` for ``count_e < t``, else ``t / count_e``."""
    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, t)


def accept_probs(offsets: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per caption (CSR ``offsets``/``ids``): ``1 - prod(1 - p_e)``, 0 with no entry."""
    n = len(offsets) - 1
    out = np.zeros(n, dtype=np.float64)
    lengths = np.diff(offsets)
    nonempty = np.flatnonzero(lengths > 0)
    if nonempty.size:
        q = 1.0 - probs[ids]
        out[nonempty] = 1.0 - np.multiply.reduceat(q, offsets[nonempty])
    return out


def uniform_draws(seed: int, uids: list[str], salt: str = "metaclip") -> np.ndarray:
    """A uniform number in [0, 1) per uid, a function of (seed, salt, uid) only."""
    key = f"{salt}:{seed}".encode()
    out = np.empty(len(uids), dtype=np.float64)
    for i, uid in enumerate(uids):
        h = hashlib.blake2b(uid.encode("utf-8", "surrogateescape"), digest_size=8, key=key).digest()
        out[i] = (int.from_bytes(h, "little") >> 11) * (1.0 / (1 << 53))
    return out
