"""The process pool of an ingest: the same forked workers for stage 1, hashing the inputs and stage 3.

A plain process per worker with a pipe (and a thread in the parent that feeds it), not
``multiprocessing.Pool``: the pool's start (queues, locks, three handler threads) and teardown
took ~20 ms, all of it serial time that showed directly in the 2-worker speedup. A job is a
:class:`UnitJob`; its result (or its exception) comes back through the pipe.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import IngestError
from .config import IngestConfig
from .read import run_unit
from .write import write_unit_shards

READ_STAGE = "stage1"
WRITE_STAGE = "stage3"


@dataclass
class UnitJob:
    """One unit's stage 1 (``READ_STAGE``, ``resume``) or stage 3 (``WRITE_STAGE``, ``final`` codes)."""

    stage: str
    cfg: IngestConfig
    unit: int
    resume: bool = False
    final: np.ndarray | None = None


def _unit_job(job: UnitJob):
    if job.stage == READ_STAGE:
        return run_unit(job.cfg, job.unit, resume=job.resume, position=job.unit)
    return write_unit_shards(job.cfg, job.unit, job.final)


def _own_progress_lock() -> None:
    """Give this (forked) worker a tqdm write lock of its own. The inherited one holds a
    multiprocessing semaphore shared with the parent: a worker killed while holding it (SIGKILL, the
    OOM killer) would leave the parent's next progress-bar update waiting forever instead of
    reporting the dead worker. (Bars of several processes may then interleave a line; tqdm's
    ``position`` keeps them apart as before.)"""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _serve(conn) -> None:
    """Loop of a worker process: run ``(index, fn, args)`` messages until ``None``; answer
    ``(index, True, result)`` or ``(index, False, exception)``."""
    _own_progress_lock()
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        if message is None:
            return
        index, fn, args = message
        try:
            reply = (index, True, fn(args))
        except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
            reply = (index, False, e)
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or exception
            what = f"{type(reply[2]).__name__}: {reply[2]}"[:500]
            conn.send((index, False, IngestError(f"an ingest worker could not send back {what} ({e!r})")))


def _send_in_order(conn, outbox: queue.SimpleQueue) -> None:
    """Send ``outbox``'s messages to one worker, in order, until ``None`` (sent too). In a thread:
    a large message (a big unit's final codes) blocks until the worker reads it, which a busy
    worker does only when its current job is done; the caller must not wait for that."""
    while True:
        message = outbox.get()
        try:
            conn.send(message)
        except OSError:  # the worker is gone; the caller learns it from the connection
            return
        if message is None:
            return


class Workers:
    """``workers`` processes for lists of unit jobs, forked once and used for stage 1, hashing the
    inputs and stage 3. The calling process runs the first job itself and ``workers - 1`` forked
    processes the others (when there are as many jobs as workers: the common case, and one fork
    fewer); otherwise ``workers`` processes take the jobs as they become free.
    """

    def __init__(self, workers: int, n_jobs: int):
        self.main_too = workers > 1 and n_jobs == workers
        size = workers - 1 if self.main_too else workers
        self.procs: list[Any] = []
        self.conns: list[Any] = []  # the parent's end of each worker's pipe
        self._outbox: dict[Any, queue.SimpleQueue] = {}  # connection -> messages to send
        self._senders: list[threading.Thread] = []
        self._pending: dict[int, Any] = {}  # sent job id -> its connection (no answer yet)
        self._done: dict[int, tuple[bool, Any]] = {}
        self._next_id = 0
        self._deferred: list[tuple[Callable, Any, dict]] = []
        self._stopped: set[Any] = set()
        if workers > 1 and n_jobs > 1 and size >= 1:
            for k in range(min(size, n_jobs)):
                self._start_worker(k + 1)

    def _start_worker(self, number: int) -> None:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), name=f"ingest-worker-{number}", daemon=True)
        proc.start()
        child.close()
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        sender = threading.Thread(target=_send_in_order, args=(parent, outbox), daemon=True)
        sender.start()
        self.procs.append(proc)
        self.conns.append(parent)
        self._outbox[parent] = outbox
        self._senders.append(sender)

    def _send(self, conn, fn, args) -> int:
        job_id = self._next_id
        self._next_id += 1
        self._pending[job_id] = conn
        self._outbox[conn].put((job_id, fn, args))
        return job_id

    def _collect(self, conns) -> None:
        """Receive one reply from each ready connection among ``conns``."""
        for conn in mp_connection.wait(conns):
            try:
                job_id, ok, value = conn.recv()
            except EOFError:
                raise IngestError(
                    "an ingest worker process died (killed, or out of memory?); run again with "
                    "resume=true to continue from the last checkpoint"
                ) from None
            del self._pending[job_id]
            self._done[job_id] = (ok, value)

    def _result(self, job_id: int):
        while job_id not in self._done:
            self._collect([self._pending[job_id]])
        ok, value = self._done.pop(job_id)
        if not ok:
            raise value
        return value

    def defer(self, fn, args) -> Callable[[], Any]:
        """Queue ``fn(args)`` to run right after the last job of the next :meth:`map`, on the worker
        process that gets that job: it fills the time that worker would wait for the others (with
        no worker process: in a thread, once that map is done). Returns a function that waits for
        the result."""
        box: dict[str, Callable[[], Any]] = {}
        self._deferred.append((fn, args, box))

        def result():
            if "result" not in box:
                raise RuntimeError("a deferred job runs after the next map(); none has run yet")
            return box["result"]()

        return result

    def _start_deferred(self, conn) -> None:
        for fn, args, box in self._deferred:
            if conn is None:
                thread = ThreadPoolExecutor(1, thread_name_prefix=getattr(fn, "__name__", "job"))
                box["result"] = thread.submit(fn, args).result
                thread.shutdown(wait=False)
            else:
                box["result"] = functools.partial(self._result, self._send(conn, fn, args))
        self._deferred = []

    def map(self, jobs: list) -> list:
        """The results of ``_unit_job`` on ``jobs``, in job order."""
        if not self.procs:
            results = [_unit_job(job) for job in jobs]
            self._start_deferred(None)
            return results
        results: list[Any] = [None] * len(jobs)
        todo = list(range(1 if self.main_too else 0, len(jobs)))
        mine: dict[int, tuple[int, Any]] = {}  # sent id -> (job index, connection)
        load = {conn: 0 for conn in self.conns}  # this map's jobs on each worker: one at a time (balance)

        def hand_out() -> None:
            for conn in self.conns:
                if todo and not load[conn]:
                    k = todo.pop(0)
                    mine[self._send(conn, _unit_job, jobs[k])] = (k, conn)
                    load[conn] += 1
                    if not todo:  # the last job: the deferred ones queue behind it
                        self._start_deferred(conn)

        hand_out()
        self._start_deferred(self.conns[0])  # (when this map had no job for the workers)
        if self.main_too:
            results[0] = _unit_job(jobs[0])
        while mine:
            self._collect(list(set(self._pending.values())))
            for job_id in [i for i in mine if i in self._done]:
                k, conn = mine.pop(job_id)
                load[conn] -= 1
                results[k] = self._result(job_id)
            hand_out()
        return results

    def stop(self) -> None:
        """Ask the idle workers to exit, without waiting: they exit while the caller finishes
        (the manifest), and :meth:`close` then finds them gone."""
        busy = set(self._pending.values())
        for conn in self.conns:
            if conn not in busy and conn not in self._stopped:
                self._outbox[conn].put(None)
                self._stopped.add(conn)

    def close(self) -> None:
        """Stop the workers (terminate the busy ones: after an error) and wait for them."""
        busy = set(self._pending.values())
        for proc, conn in zip(self.procs, self.conns):
            if conn in busy:
                proc.terminate()
                self._pending = {i: c for i, c in self._pending.items() if c is not conn}
        self.stop()
        for thread in self._senders:
            thread.join()
        for proc, conn in zip(self.procs, self.conns):
            proc.join()
            conn.close()
        self.procs, self.conns, self._senders = [], [], []
