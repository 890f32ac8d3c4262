"""Checks that keep a job from losing or destroying data, all made before anything is written
(see ARCHITECTURE.md, "Invariants").

* :func:`check_output` — the output folder must be a folder we may write, must not be,
  contain or lie inside an input, and must not be somebody else's non-empty folder.
* :func:`input_identity` — what the inputs are (paths, sizes, mtimes or ETags): part of the
  job's identity, so a resume over a changed input set is refused instead of mixing shards.
* :class:`JobLock` — one driver per output folder at a time (a kernel lock on local disks, a
  heartbeat object on object stores).
* :func:`owned_to_remove` — what ``--restart`` may remove: only what a pairsift job recorded
  that it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

from pairsift.pipeline import layout, storage
from pairsift.pipeline.errors import ConfigError

_GLOB_CHARS = "*?["


def _is_glob(path: str) -> bool:
    """A path is a glob only if it has glob characters and does not exist as written
    (a folder may well be called ``br[1]``)."""
    if not any(ch in path for ch in _GLOB_CHARS):
        return False
    try:
        return not storage.exists(path)
    except Exception:
        return True


def input_root(path: str) -> str:
    """The folder (or file) an input path names: a glob's fixed leading folders."""
    if not _is_glob(path):
        return path.rstrip("/") or "/"
    parts = path.split("/")
    root = []
    for p in parts:
        if any(ch in p for ch in _GLOB_CHARS):
            break
        root.append(p)
    return "/".join(root) or "/"


def _norm(path: str) -> str:
    if storage.is_url(path):
        return path.rstrip("/")
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or lies under it (normalised paths)."""
    if child == parent:
        return True
    sep = "/" if not parent.endswith("/") else ""
    return child.startswith(parent + sep)


def check_output(spec) -> None:
    """Refuse outputs that would destroy or re-read data; ConfigError names the problem."""
    out = _norm(spec.output)
    inp = _norm(input_root(spec.input.path))
    if _inside(out, inp) or _inside(inp, out):
        how = "is" if out == inp else ("lies inside" if _inside(out, inp) else "contains")
        raise ConfigError(
            f"output {spec.output} {how} the input {spec.input.path}: a job must not write where it reads "
            f"(a rerun would ingest its own shards, and --restart could remove input). Choose another output folder.")
    if storage.is_url(spec.output):
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output {spec.output} exists and is not a folder")
    if not os.path.exists(layout.job_file(out)) and os.path.isdir(out):
        ours = [n for n in layout.FIXED if os.path.exists(os.path.join(out, n))]
        if ours:
            raise ConfigError(
                f"output {spec.output} already holds {', '.join(ours)} that no pairsift job recorded writing "
                f"(no _work/job.json): pairsift will not write over or remove them. Choose an empty or new folder.")
    _check_writable(out)


def _check_writable(out: str) -> None:
    """Create and remove a probe in the nearest existing folder of ``out``: nothing is left."""
    probe_dir = out
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise ConfigError(f"output {out}: {probe_dir} is a file, not a folder")
    probe = os.path.join(probe_dir, f".pairsift-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"output {out} cannot be written ({probe_dir}: {e.strerror or e})") from None


# --------------------------------------------------------------------------- input identity


def _stamp(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def input_files(path: str) -> list[tuple[str, int, str]]:
    """(path relative to the input root, size, mtime or ETag) of every file an input path
    names, sorted."""
    fs, _ = storage.fs_path(path)
    root = input_root(path)
    sroot = fs._strip_protocol(root)
    if _is_glob(path):
        found = fs.glob(fs._strip_protocol(path), detail=True)
        found = {k: v for k, v in found.items() if v.get("type") != "directory"}
        base = sroot
    elif fs.isdir(sroot):
        found = fs.find(sroot, detail=True)
        base = sroot
    elif fs.exists(sroot):
        found = {sroot: fs.info(sroot)}
        base = posixpath.dirname(sroot)
    else:
        return []
    out = []
    for name, info in found.items():
        out.append((posixpath.relpath(name, base), int(info.get("size") or 0), _stamp(info)))
    return sorted(out)


def input_identity(input_spec) -> dict[str, Any]:
    """A digest of the input file set (and the count), for ``job.json``."""
    files = input_files(input_spec.path)
    h = hashlib.sha256(json.dumps(files).encode("utf-8", "surrogateescape"))
    return {"files": len(files), "bytes": sum(f[1] for f in files), "digest": h.hexdigest()[:16]}


# --------------------------------------------------------------------------- the job lock


class JobLock:
    """One driver per output folder. Local folders: ``fcntl.flock`` on ``OUT/.pairsift.lock``
    (released by the kernel when the driver dies, so a killed run never blocks its resume).
    Object stores: a lock object whose heartbeat the holder refreshes every ``beat`` seconds;
    another run refuses while the heartbeat is younger than ``stale`` seconds."""

    NAME = ".pairsift.lock"

    def __init__(self, output: str, beat: float = 20.0, stale: float = 90.0):
        self.output = output
        self.path = layout.lock_file(output)
        self.beat, self.stale = beat, stale
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}

    def check_free(self) -> None:
        """Refuse early (ConfigError) if another run holds the lock; writes nothing. The lock
        itself is taken by :meth:`acquire` once the job is known to be able to start."""
        if storage.is_url(self.output):
            if storage.exists(self.path):
                self._refuse_if_live(storage.read_json(self.path))
            return
        if not os.path.isfile(self.path):
            return
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            raise ConfigError(f"output {self.output} is in use by another pairsift run ({holder}); wait for it to "
                              f"finish, or use another --output") from None
        finally:
            os.close(fd)

    def _refuse_if_live(self, held: dict) -> None:
        age = time.time() - float(held.get("beat", 0))
        if age < self.stale:
            raise ConfigError(
                f"output {self.output} is in use by another pairsift run (pid {held.get('pid')} on "
                f"{held.get('host')}, heartbeat {age:.0f} s ago); wait for it to finish, or use another --output")

    def acquire(self) -> "JobLock":
        if storage.is_url(self.output):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        os.makedirs(self.output, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise ConfigError(f"output {self.output} is in use by another pairsift run ({holder}); wait for it to "
                              f"finish, or use another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({k: v for k, v in self.owner.items() if k != "token"}).encode())
        self._fd = fd

    def _acquire_remote(self) -> None:
        if storage.exists(self.path):
            try:
                held = storage.read_json(self.path)
            except Exception:
                held = {}
            self._refuse_if_live(held)
        self._write_beat()
        time.sleep(0.05)
        if storage.read_json(self.path).get("token") != self.owner["token"]:  # lost a race
            raise ConfigError(f"output {self.output} was just taken by another pairsift run")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="pairsift-lock")
        self._thread.start()

    def _write_beat(self) -> None:
        storage.write_json(self.path, {**self.owner, "beat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                self._write_beat()
            except Exception:
                pass

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            try:
                storage.remove_tree(self.path)
            except Exception:
                pass

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- restart


def owned_to_remove(output: str) -> list[str]:
    """What ``--restart`` removes: the fixed layout and the artifacts the old job recorded,
    and only when ``_work/job.json`` shows a pairsift job wrote there (else nothing)."""
    job = layout.job_file(output)
    if not storage.exists(job):
        return []
    try:
        artifacts = list(storage.read_json(job).get("artifacts") or [])
    except Exception:
        artifacts = []
    safe = [a for a in artifacts if isinstance(a, str) and a and "/" not in a and a not in (".", "..")]
    return [p for p in layout.owned_paths(output, safe) if storage.exists(p)]
