"""The results store: one SQLite file (stdlib sqlite3), one row per run, safe for parallel sweeps."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from randmask_lab.experiment.record import FINISHED, RunRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model TEXT, task TEXT, method TEXT, ratio REAL, density REAL, lr REAL,
    data_seed INTEGER, mask_seed INTEGER, order_seed INTEGER, protocol TEXT,
    status TEXT, best_epoch INTEGER, val_loss REAL, val_metric REAL, test_metric REAL, metric TEXT,
    trainable INTEGER, total INTEGER, wall_seconds REAL, created TEXT, record TEXT
)
"""
COLUMNS = ("run_id", "model", "task", "method", "ratio", "density", "lr", "data_seed", "mask_seed",
           "order_seed", "protocol", "status", "best_epoch", "val_loss", "val_metric", "test_metric",
           "metric", "trainable", "total", "wall_seconds", "created", "record")


def store_file(store: str | Path | None, out_dir: str | Path) -> Path:
    """The results store file: ``store`` if given, else ``<out_dir>/results.sqlite``."""
    return Path(store or Path(out_dir) / "results.sqlite")


def protocol_label(config: dict[str, Any]) -> str:
    """Runs are only compared within one protocol: sample sizes, epochs, batch and mode."""
    return (f"{config['n_train']}/{config['n_val']}/{config['n_test']} ex, {config['epochs']} ep, "
            f"bs {config['batch_size']}, {config['mode']}")


class ResultStore:
    """Run records in a SQLite file: ``put`` a record, ``get`` one, list them, check if finished."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A long timeout and WAL let several sweep processes write to one store.
        db = sqlite3.connect(self.path, timeout=120)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def put(self, record: RunRecord) -> None:
        """Insert or replace the record of ``record.run_id``."""
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

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        with self._connect() as db:
            row = db.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return RunRecord.from_dict(json.loads(row[0])) if row else None

    def is_finished(self, run_id: str) -> bool:
        """True when the run ended (done or diverged): a sweep skips it."""
        with self._connect() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return bool(row) and row[0] in FINISHED

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Rows (all columns but the JSON record) matching ``column=value`` filters."""
        bad = set(where) - set(COLUMNS)
        if bad:
            raise ValueError(f"unknown store columns {sorted(bad)}; known: {', '.join(COLUMNS)}")
        clause = " AND ".join(f"{k} = ?" for k in where) or "1"
        cols = [c for c in COLUMNS if c != "record"]
        with self._connect() as db:
            found = db.execute(f"SELECT {', '.join(cols)} FROM runs WHERE {clause} ORDER BY created",
                               tuple(where.values())).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in found]

    def records(self, **where: Any) -> list[RunRecord]:
        """Full records matching the filters."""
        return [r for r in (self.get(row["run_id"]) for row in self.rows(**where)) if r is not None]

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])
