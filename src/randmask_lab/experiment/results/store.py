"""The results store: one SQLite file (stdlib sqlite3), one row per run, and leases on runs in progress.

Several workers (processes, or machines sharing the file system) may share one store and out-dir.
Before a worker starts a run it claims it: ``claim`` inserts a lease row (owner, heartbeat, expiry)
inside ``BEGIN IMMEDIATE``, so of two workers exactly one gets it. The owner renews the lease from a
heartbeat thread (``Lease``); a lease whose owner died (kill -9) stops being renewed, expires, and
the next worker to claim the run takes it over and resumes it from its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from randmask_lab.errors import StoreError
from randmask_lab.experiment.results.record import FINISHED, RunRecord
from randmask_lab.fs import RESUME, sqlite_problem

FORMAT = "randmask-results/2"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model TEXT, task TEXT, method TEXT, ratio REAL, density REAL, lr REAL,
    data_seed INTEGER, mask_seed INTEGER, order_seed INTEGER, protocol TEXT,
    status TEXT, best_epoch INTEGER, val_loss REAL, val_metric REAL, test_metric REAL, metric TEXT,
    trainable INTEGER, total INTEGER, wall_seconds REAL, created TEXT, record TEXT
)""",
    "CREATE TABLE IF NOT EXISTS leases (run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, heartbeat REAL NOT NULL, "
    "expires REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
)
COLUMNS = ("run_id", "model", "task", "method", "ratio", "density", "lr", "data_seed", "mask_seed",
           "order_seed", "protocol", "status", "best_epoch", "val_loss", "val_metric", "test_metric",
           "metric", "trainable", "total", "wall_seconds", "created", "record")
Claim = Literal["claimed", "finished", "busy"]


class StoreReadOnlyError(StoreError):
    """The results store cannot be written here (read-only folder or file); it is not damaged."""


def store_file(store: str | Path | None, out_dir: str | Path) -> Path:
    """The results store file: ``store`` if given, else ``<out_dir>/results.sqlite``."""
    return Path(store or Path(out_dir) / "results.sqlite")


def protocol_label(config: dict[str, Any]) -> str:
    """Runs are only compared within one protocol: sample sizes, epochs, batch (and its grouping), gradient
    clipping, mode."""
    grouped = ", by length" if config.get("group_by_length") else ""  # absent from records made before
    clipped = f", clip {config['max_grad_norm']:g}" if config.get("max_grad_norm") else ""  # likewise
    return (f"{config['n_train']}/{config['n_val']}/{config['n_test']} ex, {config['epochs']} ep, "
            f"bs {config['batch_size']}{grouped}{clipped}, {config['mode']}")


def new_owner() -> str:
    """A worker id unique across machines and restarts: ``host:pid:uuid``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when ``owner`` (``host:pid:uuid``) is a process of this host that no longer exists.

    So a killed worker's runs are taken over at once rather than when its lease expires. Safe even
    if the pid test errs (another pid namespace under the same host name): a live owner whose lease
    is taken finds it lost at its next heartbeat and stops without writing.
    """
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: the process exists under another user
        return False
    return False


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a run, and when their lease runs out (unix seconds)."""

    owner: str
    heartbeat: float
    expires: float


BUSY_SECONDS = 120.0  # how long one store operation waits for another worker's lock before it fails


def _enable_wal(db: sqlite3.Connection, timeout: float = BUSY_SECONDS) -> None:
    """Put the store in WAL mode, waiting out another process that is creating the same store.

    Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database is locked" at once,
    without its busy timeout, when another connection holds a lock it is waiting to upgrade (the deadlock
    rule). Two workers started together on one new --out-dir met it; retry until ``timeout``, the busy
    timeout every other store operation gets from SQLite.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.5)


class ResultStore:
    """Run records in a SQLite file: ``put`` a record, ``get`` one, list them; ``claim`` runs to execute."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.read_only = False  # a healthy store in a folder this process cannot write: reads only
        if self.path.is_dir():
            raise StoreError(f"results store {self.path} is a folder; pass a .sqlite file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of results store {self.path} ({e.strerror}); pass a writable "
                             "--out-dir (or --store)") from None
        try:
            with self._connect() as db:
                self._check_tables(db)
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
        except StoreReadOnlyError:
            if not self.path.is_file():
                raise
            self.read_only = True  # report, export, findings still read it
            with self._connect(write=False) as db:
                if "runs" not in self._check_tables(db):
                    raise StoreError(f"{self.path} is not a randmask results store (no runs table)") from None

    def _check_tables(self, db: sqlite3.Connection) -> set[str]:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables - {"runs", "leases", "meta"}:
            raise StoreError(f"{self.path} is a SQLite file of another program (tables "
                             f"{sorted(tables)}), not a randmask results store; pass another --store")
        if "runs" in tables:
            cols = [r[1] for r in db.execute("PRAGMA table_info(runs)")]
            if tuple(cols) != COLUMNS:
                raise StoreError(f"{self.path} has a `runs` table with other columns than a randmask results "
                                 "store; pass another --store")
        return tables

    @contextmanager
    def _connect(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        # A long timeout and WAL let several workers write to one store; isolation_level=None so
        # that `claim` can open its own BEGIN IMMEDIATE transaction.
        if self.read_only:
            yield from self._read_only(write)
            return
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open results store {self.path}: {e}") from None
        try:
            _enable_wal(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
                raise  # contention beyond the timeout: an internal problem, keep the traceback
            problem = sqlite_problem(e)
            if problem == "read-only":
                raise StoreReadOnlyError(self._read_only_message(e)) from None
            if problem == "full":
                raise StoreError(f"the disk holding results store {self.path} is full ({e}): free some space, then "
                                 f"{RESUME}") from None
            raise StoreError(f"results store {self.path} is damaged or not a SQLite file ({e}); move it away "
                             "or pass another --store") from None
        finally:
            db.close()

    def _read_only_message(self, error: object) -> str:
        return (f"results store {self.path} cannot be written ({error}): its folder or file is read-only or not "
                "yours. The store itself is fine (report and export still read it); run in a writable --out-dir "
                f"(or pass --store), or make {self.path.parent} writable")

    def _read_only(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection to a store nobody here can write: SQLite's immutable mode (no WAL files to create)."""
        if write:
            raise StoreReadOnlyError(self._read_only_message("read-only"))
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open results store {self.path} read-only: {e}") from None
        try:
            yield db
        except sqlite3.DatabaseError as e:
            raise StoreError(f"results store {self.path} is damaged or not a SQLite file ({e}); move it away "
                             "or pass another --store") from None
        finally:
            db.close()

    # -- records --------------------------------------------------------------------------------

    def put(self, record: RunRecord, owner: str | None = None) -> None:
        """Insert or replace the record of ``record.run_id`` (and drop ``owner``'s lease on it)."""
        c = record.config
        data_seed, mask_seed, order_seed = (c.get(k) if c.get(k) is not None else c["seed"]
                                            for k in ("data_seed", "mask_seed", "order_seed"))
        row = (record.run_id, c["model"], c["task"], c["method"], c.get("ratio"), c.get("density"), c["lr"],
               data_seed, mask_seed, order_seed, protocol_label(c), record.status, record.best_epoch,
               record.val_loss, record.val_metric, record.test_metric, record.metric, record.trainable,
               record.total, record.wall_seconds, record.created, json.dumps(record.to_dict()))
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(COLUMNS))})", row)
            if owner is not None:
                db.execute("DELETE FROM leases WHERE run_id = ? AND owner = ?", (record.run_id, owner))

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        with self._connect(write=False) as db:
            row = db.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if not row:
            return None
        try:
            data = json.loads(row[0])
            config = data.get("config") if isinstance(data, dict) else None
            if not (isinstance(config, dict) and {"model", "task", "method", "lr", "seed"} <= set(config)):
                raise ValueError("not a run record: its config lacks model, task, method, lr or seed")
            return RunRecord.from_dict(data)
        except (TypeError, ValueError, RecursionError, AttributeError, KeyError) as e:  # not JSON, not a record
            raise StoreError(f"results store {self.path}: the record of run {run_id} is damaged ({str(e)[:80]}); "
                             "run it again with --restart, or rebuild the store from its study file") from None

    def delete(self, run_id: str) -> None:
        """Forget the record of ``run_id`` (``--restart``)."""
        with self._connect() as db:
            db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def is_finished(self, run_id: str) -> bool:
        """True when the run ended (done, diverged, scale_collapsed): a sweep skips it."""
        with self._connect(write=False) as db:
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return bool(row) and row[0] in FINISHED

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Rows (all columns but the JSON record) matching ``column=value`` filters."""
        bad = set(where) - set(COLUMNS)
        if bad:
            raise ValueError(f"unknown store columns {sorted(bad)}; known: {', '.join(COLUMNS)}")
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        cols = [c for c in COLUMNS if c != "record"]
        with self._connect(write=False) as db:
            found = db.execute(f"SELECT {', '.join(cols)} FROM runs WHERE {clause} ORDER BY created",
                               tuple(where.values())).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in found]

    def records(self, **where: Any) -> list[RunRecord]:
        """Full records matching the filters."""
        return [r for r in (self.get(row["run_id"]) for row in self.rows(**where)) if r is not None]

    def __len__(self) -> int:
        with self._connect(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    # -- leases ---------------------------------------------------------------------------------

    def claim(self, run_id: str, owner: str, ttl: float, now: float | None = None) -> Claim:
        """Atomically claim ``run_id`` for ``owner`` for ``ttl`` seconds.

        "finished": the store holds a finished record (nothing to do); "busy": another owner's
        lease has not expired; "claimed": the lease is ``owner``'s (new, taken over from an
        expired owner or from a dead process on this host, or renewed).
        """
        now = time.time() if now is None else now
        with self._connect() as db:  # BEGIN IMMEDIATE: one writer at a time, so check-then-insert is atomic
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row and row[0] in FINISHED:
                return "finished"
            lease = db.execute("SELECT owner, expires FROM leases WHERE run_id = ?", (run_id,)).fetchone()
            if lease and lease[0] != owner and lease[1] > now and not owner_is_dead(lease[0]):
                return "busy"
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)", (run_id, owner, now, now + ttl))
        return "claimed"

    def heartbeat(self, run_id: str, owner: str, ttl: float) -> bool:
        """Extend ``owner``'s lease; False when it no longer holds it (it expired and was taken over)."""
        now = time.time()
        with self._connect() as db:
            cur = db.execute("UPDATE leases SET heartbeat = ?, expires = ? WHERE run_id = ? AND owner = ?",
                             (now, now + ttl, run_id, owner))
            return cur.rowcount == 1

    def release(self, run_id: str, owner: str) -> None:
        """Drop ``owner``'s lease on ``run_id`` (if it still holds it)."""
        with self._connect() as db:
            db.execute("DELETE FROM leases WHERE run_id = ? AND owner = ?", (run_id, owner))

    def lease(self, run_id: str) -> LeaseInfo | None:
        """The current lease on ``run_id``, expired or not."""
        with self._connect(write=False) as db:
            row = db.execute("SELECT owner, heartbeat, expires FROM leases WHERE run_id = ?", (run_id,)).fetchone()
        return LeaseInfo(*row) if row else None


class Lease:
    """A held claim on one run, renewed every ``ttl / 4`` seconds by a daemon thread until ``release``.

    ``lost`` turns True when a heartbeat finds the lease taken over (this worker stalled past the
    expiry); the training loop checks it and stops instead of writing over the new owner's run.
    """

    def __init__(self, store: ResultStore, run_id: str, owner: str, ttl: float) -> None:
        self.store, self.run_id, self.owner, self.ttl = store, run_id, owner, ttl
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.store.heartbeat(self.run_id, self.owner, self.ttl):
                    self.lost = True
                    return
            except Exception:  # noqa: BLE001 - a store hiccup: try again at the next beat, the lease lasts ttl
                continue

    def release(self) -> None:
        """Stop the heartbeat and drop the lease."""
        self._stop.set()
        self._thread.join()
        if not self.lost:
            self.store.release(self.run_id, self.owner)
