"""JobStore: durable jobs in SQLite (WAL), their audio in files beside it.

Layout under ``ASR_DATA_DIR``: ``jobs.sqlite3`` (with its ``-wal`` and ``-shm``), and ``audio/<id>.pcm``, each
job's audio as decoded at submission (16 kHz mono, signed 16-bit little-endian): a resumed run reads the same
samples as the first. A window's result is one row, written once, in the same transaction as the job's
progress; so after any crash the job resumes from its last finished window and none is transcribed twice.

Every call runs on one thread of its own (SQLite blocks, the event loop must not), in order. A database that
cannot be opened (corrupt, not a database, a newer schema, an unwritable directory) raises
:class:`StoreUnavailable` saying what to do; the file is never rewritten or removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
SCHEMA_VERSION = 1
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED = ("queued", "running")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    model TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    options TEXT NOT NULL,
    audio_bytes INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    windows_total INTEGER NOT NULL,
    windows_done INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    request_sha256 TEXT NOT NULL,
    webhook_url TEXT,
    webhook TEXT,
    error TEXT,
    result TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_by_age ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS windows (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    run INTEGER NOT NULL,
    window TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""


class StoreUnavailable(Exception):
    """The job store cannot be used; the message says why and what to do."""


class StorageFull(Exception):
    """A write failed for want of space (or a file-size limit): nothing of it was kept."""


@dataclass
class JobRecord:
    id: str
    tenant: str
    status: str
    created_at: float
    model: str
    model_sha256: str
    options: dict
    audio_bytes: int
    duration_s: float
    windows_total: int
    request_sha256: str
    idempotency_key: str | None = None
    webhook_url: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    windows_done: int = 0
    runs: int = 0
    webhook: dict | None = None  # delivery: status, attempts, last_error, delivered_at
    error: dict | None = None
    result: dict | None = None

    @property
    def progress(self) -> float:
        if self.status == "succeeded":
            return 1.0
        return round(self.windows_done / self.windows_total, 4) if self.windows_total else 0.0


_JSON_FIELDS = ("options", "webhook", "error", "result")


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    for name in _JSON_FIELDS:
        values[name] = None if values[name] is None else json.loads(values[name])
    return JobRecord(**values)


class JobStore:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "jobs.sqlite3"
        self.audio_dir = self.data_dir / "audio"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")
        self._db: sqlite3.Connection | None = None

    # lifecycle
    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.audio_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"the job store {self.path} cannot be opened ({exc}): make ASR_DATA_DIR a writable directory") from exc
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a crash of the process loses nothing committed
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            if (check := db.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(check)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"its schema is version {version}, newer than this server's {SCHEMA_VERSION}")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            raise StoreUnavailable(
                f"the job store {self.path} cannot be used ({exc}); it was left as it is. Restore it from a backup, or move it "
                "aside (the audio files beside it are kept) for the server to start a new one") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    async def _write(self, call: Callable[..., T], *args: Any) -> T:
        """A write to the database: one SQLite refuses (the disk or a file-size limit is full, an I/O error) raises
        :class:`StorageFull`; its transaction was rolled back, so nothing of it is kept and what was stored stays."""
        try:
            return await self._run(call, *args)
        except sqlite3.OperationalError as exc:
            raise StorageFull(f"the job store could not be written ({exc})") from exc

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "JobStore.open() first"
        return self._db

    # audio
    def audio_path(self, job_id: str) -> Path:
        return self.audio_dir / f"{job_id}.pcm"

    async def write_audio(self, job_id: str, audio: np.ndarray) -> int:
        """Store a job's samples (16-bit); returns the bytes written. Raises :class:`StorageFull`, leaving no file."""
        return await self._run(self._write_audio, job_id, audio)

    def _write_audio(self, job_id: str, audio: np.ndarray) -> int:
        pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2")  # 16-bit sources (x / 32768) come back exactly
        path, partial = self.audio_path(job_id), self.audio_path(job_id).with_suffix(".partial")
        try:
            with open(partial, "wb") as out:
                out.write(pcm.tobytes())
                out.flush()
                os.fsync(out.fileno())
            partial.rename(path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise StorageFull(f"the job's audio could not be stored ({exc.strerror or exc})") from exc
        return pcm.nbytes

    async def read_audio(self, job_id: str) -> np.ndarray:
        return await self._run(lambda: np.fromfile(self.audio_path(job_id), dtype="<i2").astype(np.float32) / 32768)

    def stored_bytes(self) -> int:
        """Audio bytes held for jobs (the admission limit's measure); blocking, but only a directory listing."""
        return sum(entry.stat().st_size for entry in os.scandir(self.audio_dir) if entry.is_file())

    # jobs
    async def insert(self, job: JobRecord) -> JobRecord:
        """Add a job; with an idempotency key already used by the tenant, the job stored under it is returned instead."""
        return await self._write(self._insert, job)

    def _insert(self, job: JobRecord) -> JobRecord:
        values = {name: getattr(job, name) for name in job.__dataclass_fields__}
        for name in _JSON_FIELDS:
            values[name] = None if values[name] is None else json.dumps(values[name])
        columns = ", ".join(values)
        try:
            self.db.execute(f"INSERT INTO jobs ({columns}) VALUES ({', '.join(':' + c for c in values)})", values)
        except sqlite3.IntegrityError:
            existing = self._by_key(job.tenant, job.idempotency_key)
            if existing is None:
                raise
            return existing
        return job

    def _by_key(self, tenant: str, key: str | None) -> JobRecord | None:
        if key is None:
            return None
        row = self.db.execute("SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?", (tenant, key)).fetchone()
        return None if row is None else _record(row)

    async def by_key(self, tenant: str, key: str) -> JobRecord | None:
        return await self._run(self._by_key, tenant, key)

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, if it exists (and belongs to ``tenant``, when given)."""
        def get() -> JobRecord | None:
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None or (tenant is not None and row["tenant"] != tenant) else _record(row)
        return await self._run(get)

    async def page(self, tenant: str, limit: int, before: tuple[float, str] | None) -> list[JobRecord]:
        """A tenant's jobs, newest first, ``limit`` of them, older than ``before`` (created_at, id) if given."""
        def page() -> list[JobRecord]:
            where, args = "tenant = ?", [tenant]
            if before is not None:
                where += " AND (created_at < ? OR (created_at = ? AND id < ?))"
                args += [before[0], before[0], before[1]]
            rows = self.db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ?", [*args, limit])
            return [_record(row) for row in rows]
        return await self._run(page)

    async def next_queued(self, exclude: set[str]) -> JobRecord | None:
        """The oldest job waiting to run (queued, or running when the server stopped), not in ``exclude``."""
        def oldest() -> JobRecord | None:
            rows = self.db.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at, id")
            return next((_record(row) for row in rows if row["id"] not in exclude), None)
        return await self._run(oldest)

    async def counts(self) -> dict[str, int]:
        def counts() -> dict[str, int]:
            found = dict(self.db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
            return {status: found.get(status, 0) for status in STATUSES}
        return await self._run(counts)

    async def oldest_queued_at(self) -> float | None:
        return await self._run(lambda: self.db.execute("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'").fetchone()[0])

    async def update(self, job_id: str, **values: Any) -> None:
        def update() -> None:
            encoded = {k: json.dumps(v) if k in _JSON_FIELDS and v is not None else v for k, v in values.items()}
            self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = :{k}' for k in encoded)} WHERE id = :id", {**encoded, "id": job_id})
        await self._write(update)

    async def start_run(self, job_id: str) -> int:
        """Mark the job running; returns the number of this run (1 the first time, 2 after a restart...)."""
        def start() -> int:
            self.db.execute("UPDATE jobs SET status = 'running', runs = runs + 1, started_at = COALESCE(started_at, ?) WHERE id = ?",
                            (time.time(), job_id))
            return self.db.execute("SELECT runs FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        return await self._write(start)

    # windows
    async def add_window(self, job_id: str, index: int, run: int, window: dict) -> None:
        """One finished window, and the job's progress with it, in one transaction."""
        def add() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT INTO windows (job_id, idx, run, window) VALUES (?, ?, ?, ?)", (job_id, index, run, json.dumps(window)))
                self.db.execute("UPDATE jobs SET windows_done = windows_done + 1 WHERE id = ?", (job_id,))
        await self._write(add)

    async def windows(self, job_id: str) -> list[tuple[int, dict]]:
        """A job's finished windows, in order: (the run that transcribed it, the window)."""
        def windows() -> list[tuple[int, dict]]:
            rows = self.db.execute("SELECT run, window FROM windows WHERE job_id = ? ORDER BY idx", (job_id,))
            return [(row["run"], json.loads(row["window"])) for row in rows]
        return await self._run(windows)

    async def delete(self, job_id: str) -> None:
        """The job, its windows and its audio."""
        def delete() -> None:
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self.audio_path(job_id).unlink(missing_ok=True)
        await self._write(delete)

    async def drop_audio(self, job_id: str) -> None:
        await self._run(lambda: self.audio_path(job_id).unlink(missing_ok=True))

    async def expired(self, before: float) -> list[str]:
        """Finished jobs (succeeded, failed, cancelled) that finished before ``before``."""
        def expired() -> list[str]:
            rows = self.db.execute("SELECT id FROM jobs WHERE status NOT IN ('queued', 'running') AND finished_at < ?", (before,))
            return [row[0] for row in rows]
        return await self._run(expired)

    async def reset_windows(self, job_id: str, model_sha256: str) -> None:
        """Forget the windows done (on other weights): the job starts over."""
        def reset() -> None:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("DELETE FROM windows WHERE job_id = ?", (job_id,))
                self.db.execute("UPDATE jobs SET windows_done = 0, model_sha256 = ? WHERE id = ?", (model_sha256, job_id))
        await self._write(reset)

    async def pending_webhooks(self) -> list[JobRecord]:
        """Finished jobs whose webhook is still owed."""
        def pending() -> list[JobRecord]:
            rows = self.db.execute("SELECT * FROM jobs WHERE webhook_url IS NOT NULL AND status NOT IN ('queued', 'running') "
                                   "AND (webhook IS NULL OR json_extract(webhook, '$.status') = 'pending')")
            return [_record(row) for row in rows]
        return await self._run(pending)
