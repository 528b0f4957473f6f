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
and names the part that was being decoded:

    parent -> worker   ("scan", raw bytes, ScanLimits)
    worker -> parent   ("structure", MessageFacts, [task location, ...])
    worker -> parent   ("start", index)           before each heavy part
    worker -> parent   ("part", index, PartialFacts)
    worker -> parent   ("done",)
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass, field

from .model import MessageFacts, PartialFacts, ScanLimits, ScanProblem

log = logging.getLogger(__name__)

# Seconds a new worker may take to import its decoders (PyMuPDF alone takes
# about 0.5 s) before it counts as failed.
STARTUP_TIMEOUT = 60.0


def _worker_main(conn: multiprocessing.connection.Connection) -> None:
    """Run jobs from `conn` until the parent closes it."""
    # The parent handles SIGINT and SIGTERM and stops workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

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
        _, raw, limits = request
        _run_job(conn, raw, limits, TASKS, analyse_structure)


def _run_job(conn, raw, limits, tasks_registry, analyse_structure) -> None:
    try:
        facts, tasks = analyse_structure(raw, limits)
    except Exception as error:  # noqa: BLE001 - reported to the parent as a scan problem
        facts = MessageFacts(problems=[ScanProblem("message", "incomplete",
                                                   f"structure analysis failed: {type(error).__name__}")])
        tasks = []
    conn.send(("structure", facts, [task.location for task in tasks]))

    for index, task in enumerate(tasks):
        conn.send(("start", index))
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


class WorkerLost(Exception):
    """The worker died or was killed during a job."""


@dataclass
class JobResult:
    """What a job returned before it finished or was cut short."""

    facts: MessageFacts
    complete: bool
    problems: list[ScanProblem] = field(default_factory=list)


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True,
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

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"worker pool size must be at least 1, got {size}")
        self.size = size
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._busy: set[_Worker] = set()
        self._closed = False
        self._spawning: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Start every worker and wait until each has imported its decoders."""
        started = await asyncio.gather(*(self._spawn() for _ in range(self.size)),
                                       return_exceptions=True)
        failures = [r for r in started if isinstance(r, BaseException)]
        if len(failures) == self.size:
            raise RuntimeError(f"no decoder worker started: {failures[0]}")
        log.info("event=workers_started count=%d", self.size - len(failures))

    async def _spawn(self) -> None:
        worker = _Worker(self._context)
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
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)

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

        facts = MessageFacts()
        locations: list[str] = []
        finished: set[int] = set()
        current: int | None = None
        healthy = False
        self._busy.add(worker)
        try:
            await asyncio.to_thread(worker.conn.send, ("scan", raw, limits))
            while True:
                reply = await worker.receive(deadline)
                kind = reply[0]
                if kind == "structure":
                    facts, locations = reply[1], reply[2]
                elif kind == "start":
                    current = reply[1]
                elif kind == "part":
                    facts.merge(reply[2])
                    finished.add(reply[1])
                    current = None
                elif kind == "done":
                    healthy = True
                    worker.jobs += 1
                    return JobResult(facts, True)
        except TimeoutError:
            reason = "scan budget exhausted"
        except WorkerLost as error:
            reason = f"decoder worker died ({error})"
        except (OSError, EOFError) as error:
            reason = f"decoder worker unreachable ({type(error).__name__})"
        finally:
            self._busy.discard(worker)
            if healthy:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker, "job cut short")

        problems = []
        if not locations and current is None:
            problems.append(ScanProblem("message", "incomplete", reason))
        for index, location in enumerate(locations):
            if index == current:
                problems.append(ScanProblem(location, "incomplete", reason))
            elif index not in finished:
                problems.append(ScanProblem(location, "incomplete", f"not inspected: {reason}"))
        return JobResult(facts, False, problems)

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        for task in list(self._spawning):
            task.cancel()
        for worker in list(self._all):
            self._discard(worker)
        log.info("event=workers_stopped restarts=%d", self.restarts)

    def pids(self) -> list[int]:
        return [w.pid for w in self._all if w.pid is not None]

    def busy_pids(self) -> list[int]:
        """Return the PIDs of workers running a job now."""
        return [w.pid for w in self._busy if w.pid is not None]
