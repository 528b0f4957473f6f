"""Decoder worker processes, managed one by one.

Decoding images and PDFs is CPU-bound and may hang or crash inside native
code (zxing-cpp, OpenCV, MuPDF), so it runs in long-lived worker processes
instead of the event loop. `concurrent.futures.ProcessPoolExecutor` cannot
stop a running task, and one dead worker breaks every task in flight, so this
pool owns each process: a worker that overruns its deadline is killed with
SIGKILL and replaced alone, and a worker that dies is replaced alone. Other
messages in flight are not affected.

One message is one job. The worker sends its results part by part over a
pipe, so when a job is cut short the pipeline keeps what was already found
and names the part that was being decoded. Each part also has its own
limit (`ScanLimits.image_seconds`, per image or PDF page): a worker that
overruns it is killed, that part is reported, and a fresh worker decodes
the message's remaining parts from the next task index on:

    parent -> worker   ("scan", raw bytes, ScanLimits, first task index)
    worker -> parent   ("structure", MessageFacts, [task location, ...])
    worker -> parent   ("start", index)           before each heavy part
    worker -> parent   ("progress", index)        before each further page or member
    worker -> parent   ("part", index, PartialFacts)
    worker -> parent   ("done",)
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
from dataclasses import dataclass, field

from .model import MessageFacts, PartialFacts, ScanLimits, ScanProblem

log = logging.getLogger(__name__)

# Seconds a new worker may take to import its decoders (PyMuPDF alone takes
# about 0.5 s) before it counts as failed.
STARTUP_TIMEOUT = 60.0


def _limit_memory(memory_mb: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at `memory_mb` MiB; 0 leaves it unlimited.

    A decompression bomb then fails with MemoryError (or a decoder error
    from native code) inside this worker instead of exhausting the host.
    The limit counts virtual memory, including about 650 MiB of mapped
    decoder libraries (measured after `preload` with CPython 3.11 on Linux).
    """
    if memory_mb <= 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn: multiprocessing.connection.Connection, memory_mb: int = 0) -> None:
    """Run jobs from `conn` until the parent closes it."""
    # The parent handles SIGINT and SIGTERM and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_mb)

    from .decoders import TASKS, preload
    from .decoders.structure import analyse_structure

    # Import the image and PDF libraries now, so the first job does not pay for it.
    preload()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _, raw, limits, first_task = request
        _run_job(conn, raw, limits, TASKS, analyse_structure, first_task)


def _run_job(conn, raw, limits, tasks_registry, analyse_structure, first_task: int = 0) -> None:
    from .decoders import set_progress_callback

    try:
        facts, tasks = analyse_structure(raw, limits)
    except Exception as error:  # noqa: BLE001 - reported to the parent as a scan problem
        facts = MessageFacts(problems=[ScanProblem("message", "incomplete",
                                                   f"structure analysis failed: {type(error).__name__}")])
        tasks = []
    conn.send(("structure", facts, [task.location for task in tasks]))

    for index, task in enumerate(tasks):
        if index < first_task:
            continue
        conn.send(("start", index))
        set_progress_callback(lambda index=index: conn.send(("progress", index)))
        decoder = tasks_registry.get(task.kind)
        if decoder is None:
            partial = PartialFacts(problems=[ScanProblem(task.location, "incomplete",
                                                         f"no decoder for {task.kind}")])
        else:
            try:
                partial = decoder(task, limits)
            except Exception as error:  # noqa: BLE001 - reported to the parent as a scan problem
                partial = PartialFacts(problems=[ScanProblem(
                    task.location, "incomplete", f"{task.kind} decoder failed: {type(error).__name__}")])
        conn.send(("part", index, partial))
    conn.send(("done",))


def _merge_partial(target: PartialFacts, other: PartialFacts) -> None:
    target.qr_codes.extend(other.qr_codes)
    target.links.extend(other.links)
    target.html.extend(other.html)
    target.pdfs.extend(other.pdfs)
    target.problems.extend(other.problems)
    target.image_count += other.image_count


class WorkerLost(Exception):
    """The worker died or was killed during a job."""


@dataclass
class JobResult:
    """The facts of one job, with the parts it could not inspect when it was cut short."""

    facts: MessageFacts
    complete: bool
    problems: list[ScanProblem] = field(default_factory=list)


@dataclass
class _Outcome:
    """The end of one run of a job on one worker; `kind` is "done", "part_timeout" or "failed"."""

    facts: MessageFacts
    locations: list[str]
    parts: PartialFacts
    kind: str
    current: int | None
    reason: str


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, memory_mb: int = 0) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, memory_mb), daemon=True,
                                       name="quishguard-decoder")
        self.process.start()
        child.close()
        self.jobs = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def receive(self, deadline: float) -> tuple:
        """Wait for the next message from the worker until `deadline` (monotonic)."""
        loop = asyncio.get_running_loop()
        while not self.conn.poll():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready = loop.create_future()
            fd = self.conn.fileno()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, remaining)
            except asyncio.TimeoutError:
                raise TimeoutError from None
            finally:
                loop.remove_reader(fd)
        try:
            return self.conn.recv()
        except (EOFError, OSError) as error:
            raise WorkerLost(f"worker {self.pid} exited with code {self.process.exitcode}") from error

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """A fixed number of decoder processes; see the module docstring."""

    def __init__(self, size: int, *, memory_mb: int = 0) -> None:
        if size < 1:
            raise ValueError(f"worker pool size must be at least 1, got {size}")
        if memory_mb < 0:
            raise ValueError(f"worker memory limit must be 0 (none) or a number of MiB, got {memory_mb}")
        self.size = size
        self.memory_mb = memory_mb
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._busy: set[_Worker] = set()
        self._closed = False
        # Worker starts and drains of abandoned jobs, cancelled by close().
        self._background: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start every worker and wait until each has imported its decoders."""
        started = await asyncio.gather(*(self._spawn() for _ in range(self.size)),
                                       return_exceptions=True)
        failures = [r for r in started if isinstance(r, BaseException)]
        if len(failures) == self.size:
            raise RuntimeError(f"no decoder worker started: {failures[0]}")
        log.info("event=workers_started count=%d", self.size - len(failures))

    async def _spawn(self) -> None:
        worker = _Worker(self._context, self.memory_mb)
        self._all.add(worker)
        try:
            hello = await worker.receive(time.monotonic() + STARTUP_TIMEOUT)
        except (TimeoutError, WorkerLost) as error:
            log.error("event=worker_start_failed pid=%s error=%s", worker.pid, type(error).__name__)
            self._discard(worker)
            raise RuntimeError("decoder worker failed to start") from error
        log.debug("event=worker_ready pid=%s", hello[1])
        self._idle.put_nowait(worker)

    def _discard(self, worker: _Worker) -> None:
        self._all.discard(worker)
        worker.kill()

    def _replace(self, worker: _Worker, reason: str) -> None:
        """Kill `worker` and start another in the background."""
        log.warning("event=worker_replaced pid=%s reason=%s", worker.pid, reason)
        self._discard(worker)
        self.restarts += 1
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._respawn())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _respawn(self) -> None:
        # A worker that cannot start is retried after a pause so a broken
        # installation does not spin; the pool runs short meanwhile.
        while not self._closed:
            try:
                await self._spawn()
                return
            except RuntimeError:
                await asyncio.sleep(5)

    async def _acquire(self, deadline: float) -> _Worker:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            worker = await asyncio.wait_for(self._idle.get(), remaining)
            if worker.process.is_alive():
                return worker
            self._replace(worker, f"found dead while idle (exit code {worker.process.exitcode})")

    async def scan(self, raw: bytes, limits: ScanLimits, deadline: float) -> JobResult:
        """Decode one message in a worker until `deadline` (time.monotonic()).

        Always returns: a timeout, a crash or a cancelled caller kills only
        the worker of this job, and the result lists what was not inspected.
        """
        try:
            worker = await self._acquire(deadline)
        except TimeoutError:
            return JobResult(MessageFacts(), False,
                             [ScanProblem("message", "incomplete", "no decoder worker free within the scan budget")])

        facts: MessageFacts | None = None
        locations: list[str] = []
        finished: set[int] = set()
        problems: list[ScanProblem] = []
        first_task = 0
        while True:
            outcome = await self._run(worker, raw, limits, deadline, first_task, finished)
            kind, current, reason = outcome.kind, outcome.current, outcome.reason
            if facts is None:
                facts, locations = outcome.facts, outcome.locations
            facts.merge(outcome.parts)
            if kind == "done":
                return JobResult(facts, not problems, problems)
            if kind != "part_timeout" or current is None:
                break

            # One part overran its own limit: it is reported, and the parts
            # after it are decoded by a fresh worker within the message budget.
            problems.append(ScanProblem(locations[current], "incomplete", reason))
            finished.add(current)
            first_task = current + 1
            try:
                worker = await self._acquire(deadline)
            except TimeoutError:
                reason, current = "no decoder worker free within the scan budget", None
                break

        facts = facts or MessageFacts()

        if not locations and current is None:
            problems.append(ScanProblem("message", "incomplete", reason))
        for index, location in enumerate(locations):
            if index == current:
                problems.append(ScanProblem(location, "incomplete", reason))
            elif index not in finished:
                problems.append(ScanProblem(location, "incomplete", f"not inspected: {reason}"))
        return JobResult(facts, False, problems)

    async def _run(self, worker: _Worker, raw: bytes, limits: ScanLimits, deadline: float, first_task: int,
                   finished: set[int]) -> _Outcome:
        """Run one job from task `first_task` on `worker`, which it returns to the pool or replaces.

        Each part gets `limits.image_seconds` from its "start" message (or
        from its last "progress" message, which a PDF sends per page), never
        beyond the message `deadline`.
        """
        outcome = _Outcome(MessageFacts(), [], PartialFacts(), "failed", None, "")
        part_deadline: float | None = None
        healthy = False
        draining = False
        sent = False
        self._busy.add(worker)
        try:
            await asyncio.to_thread(worker.conn.send, ("scan", raw, limits, first_task))
            sent = True
            while True:
                wait_until = deadline if part_deadline is None else min(deadline, part_deadline)
                try:
                    reply = await worker.receive(wait_until)
                except TimeoutError:
                    if part_deadline is not None and part_deadline < deadline:
                        outcome.kind = "part_timeout"
                        outcome.reason = f"decoding took longer than image_seconds={limits.image_seconds}"
                    else:
                        outcome.reason = "scan budget exhausted"
                    return outcome
                kind = reply[0]
                if kind == "structure":
                    outcome.facts, outcome.locations = reply[1], reply[2]
                elif kind in ("start", "progress"):
                    outcome.current = reply[1]
                    part_deadline = time.monotonic() + limits.image_seconds
                elif kind == "part":
                    _merge_partial(outcome.parts, reply[2])
                    finished.add(reply[1])
                    outcome.current = None
                    part_deadline = None
                elif kind == "done":
                    healthy = True
                    worker.jobs += 1
                    outcome.kind = "done"
                    return outcome
        except WorkerLost as error:
            outcome.reason = f"decoder worker died ({error})"
        except (OSError, EOFError) as error:
            outcome.reason = f"decoder worker unreachable ({type(error).__name__})"
        except asyncio.CancelledError:
            # The SMTP client hung up. Killing the worker would cost a process
            # start, so let it finish the job in the background and reuse it.
            if sent:
                draining = True
                self._drain_later(worker, deadline, limits.image_seconds)
            raise
        finally:
            self._busy.discard(worker)
            if healthy:
                self._idle.put_nowait(worker)
            elif not draining:
                self._replace(worker, "job cut short")
        return outcome

    def _drain_later(self, worker: _Worker, deadline: float, part_seconds: float) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(worker, deadline, part_seconds))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self, worker: _Worker, deadline: float, part_seconds: float) -> None:
        """Discard the rest of an abandoned job; return the worker to the pool when it ends
        within the same message and part limits a live job has."""
        part_deadline = deadline
        try:
            while True:
                reply = await worker.receive(min(deadline, part_deadline))
                if reply[0] in ("start", "progress"):
                    part_deadline = time.monotonic() + part_seconds
                elif reply[0] == "part":
                    part_deadline = deadline
                elif reply[0] == "done":
                    self._idle.put_nowait(worker)
                    return
        except (TimeoutError, WorkerLost, OSError, EOFError):
            self._replace(worker, "abandoned job overran its time limit")
        except asyncio.CancelledError:
            self._discard(worker)
            raise

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        for worker in list(self._all):
            self._discard(worker)
        log.info("event=workers_stopped restarts=%d", self.restarts)

    def pids(self) -> list[int]:
        return [w.pid for w in self._all if w.pid is not None]

    def idle_pids(self) -> list[int]:
        """Return the PIDs of started workers waiting for a job."""
        return [w.pid for w in list(self._idle._queue) if w.pid is not None]  # type: ignore[attr-defined]

    def busy_pids(self) -> list[int]:
        """Return the PIDs of workers running a job now."""
        return [w.pid for w in self._busy if w.pid is not None]
