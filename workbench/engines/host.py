"""Engines in their own process: the kernel holds a proxy, a spawned worker holds the engine.

    kernel (Jupyter)                                   worker process (spawned, never forked)
    EngineProxy  --- calls, stop, close ------------>  the engine, in-process to it: its real scheduler,
                 <-- snapshots, tokens, pieces, -----  block pool and run loop
                     results, errors
                 (one duplex pipe; the worker's own output goes to a log file)

The proxy has the engine's whole API, so views and notebooks cannot tell it from an engine in the kernel. What the
engine does to its process (a segfault in a kernel, the out-of-memory killer, an illegal instruction) ends the
worker, not the kernel: the call that was running raises `EngineCrashedError`, naming the signal, what the engine was
doing and the last lines of its log, and a new `load` works.

A fresh interpreter pays for importing torch, transformers or vLLM again (seconds, where a second load in the kernel
paid nothing), so as each load starts, a spare worker starts importing for the next one, on spare CPU.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from workbench.engines.interface import Engine
from workbench.errors import EngineCrashedError, WorkbenchError
from workbench.logs import engine_log, log_engines_to
from workbench.models import ResolvedModel
from workbench.sysmem import process_memory
from workbench.trace import CacheFacts, StepSnapshot, Trace
from workbench.types import (
    CompileFacts,
    EngineInfo,
    GenerationResult,
    KVCacheMeasurement,
    OffloadFacts,
    RankFacts,
    SamplingOptions,
    TokenScores,
)
from workbench.workload import Request

_LOAD_TIMEOUT_S = 900
_WORKERS: set[subprocess.Popen] = set()  # every worker started here, ended with this process at the latest


@atexit.register
def _end_workers() -> None:
    for process in _WORKERS:
        if process.poll() is None:
            process.kill()


@dataclass
class CloseReport:
    """What `close()` gave back: the worker's exit, and the kernel's memory before the load and after the close."""

    worker_exit_code: int | None
    kernel_rss_before_load: int
    kernel_rss_after_close: int
    gpu_used_before_load: int | None = None  # bytes used on the GPU (nvidia-smi), where there is one
    gpu_used_after_close: int | None = None

    @property
    def kernel_grew_by(self) -> int:
        return self.kernel_rss_after_close - self.kernel_rss_before_load


class EngineProxy(Engine):
    """An engine running in a worker process of its own. `workbench.load` returns one for every engine in this
    process's reach unless told `isolate=False`.

    >>> engine = wb.load("vllm")      # the engine runs in a worker; this kernel holds the proxy    # doctest: +SKIP
    >>> engine.process.pid            # doctest: +SKIP
    >>> engine.close()                # the worker exits: all its memory is back                    # doctest: +SKIP
    """

    def __init__(self, adapter: type[Engine], model: ResolvedModel, options: dict[str, Any],
                 requires: Sequence[str] = ()) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.name = adapter.name
        self.packages = {module.partition(".")[0] for module in requires}  # what the engine imports
        self.adapter = adapter  # crosses the pipe by reference: the worker imports its module
        self.model = model
        self.options = dict(options)
        self.extra_options = ()
        self._rss_before = process_memory()[0]
        self._gpu_before = gpu_memory_used()
        self._events: dict[int, queue.Queue] = {}
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._doing = "loading"
        self._crash: EngineCrashedError | None = None
        self._open(load=False)
        start = time.perf_counter()
        self._start_worker()
        try:  # while the worker loads the engine: the kernel's own tokenizer (decoding, counting) and config
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            self.config = AutoConfig.from_pretrained(model.path)
        except BaseException:
            self._kill()
            raise
        self._wait_until_loaded(start)
        self._loaded = True

    # ---- the worker --------------------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        worker = _take_spare(self.packages) or _spawn()
        _keep_spare(self.name, self.packages)  # for the next load
        self.process, self._conn, self.log = worker.process, worker.conn, worker.log
        self.warm_worker = worker.warm != ()  # a spare that had imported libraries beforehand
        self._conn.send(_environment_changes(worker))  # its own imports' settings stay as they are
        self._conn.send((self.adapter, self.name, self.model, self.options, engine_log()))
        self._ready: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"workbench-{self.name}-events", daemon=True)
        self._reader.start()

    def _wait_until_loaded(self, start: float) -> None:
        try:
            kind, value = self._ready.get(timeout=_LOAD_TIMEOUT_S)
        except queue.Empty:
            self._kill()
            raise WorkbenchError(f"the {self.name!r} engine did not load within {_LOAD_TIMEOUT_S} s: "
                                 f"{self.log_tail()}") from None
        if kind != "ready":
            self._kill()
            raise value
        self._summary = value
        self.dtype = value["dtype"]
        self.max_model_len = value["max_model_len"]
        self.load_seconds = value["load_seconds"]
        self.worker_start_seconds = time.perf_counter() - start - self.load_seconds  # spawning and importing
        self._doing = "idle"
        _IMPORTED[self.name] = tuple(value["imported"])

    def _read(self) -> None:
        """The kernel side's reader: hands each message to the call it belongs to; a closed pipe is a dead worker."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "warm":  # a spare's imports were done before it was taken
                continue
            if kind in ("ready", "failed"):
                self._ready.put((kind, message[1]))
            elif message[1] in self._events:
                self._events[message[1]].put(message)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        crash = self._crash_error()
        if crash is not None:
            self._crash = crash
            self._ready.put(("failed", crash))
            for events in list(self._events.values()):
                events.put(("crashed", 0, crash))

    def _crash_error(self) -> EngineCrashedError | None:
        code = self.process.poll()
        if code == 0 or (code is None and self._closed):
            return None
        if code is not None and code < 0:
            try:
                how = f"died of {signal.Signals(-code).name}"
            except ValueError:
                how = f"died of signal {-code}"
        else:
            how = f"exited with code {code}"
        return EngineCrashedError(f"the {self.name!r} engine's process {how} while {self._doing}; the kernel and "
                                  f"its other engines are fine: load a new one. Its last words: {self.log_tail()}")

    def log_tail(self, lines: int = 4) -> str:
        """The last lines the worker wrote (its log file holds them all: `engine.log`)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:]) or "(nothing)"

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    # ---- calls -------------------------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError):
                raise self._crash or self._crash_error() or WorkbenchError(
                    f"the {self.name!r} engine's process is gone: load a new one.") from None

    def _check_open(self) -> None:
        super()._check_open()
        if self._crash is not None:
            raise EngineCrashedError(f"this {self.name!r} engine crashed earlier ({self._crash}); load a new one.")

    def _call(self, method: str, *args: Any, doing: str | None = None,
              on_event: Callable[[tuple], None] | None = None, **kwargs: Any) -> Any:
        """Call `method` on the engine in the worker and wait for its result; `on_event` sees what it sends
        meanwhile (snapshots, tokens, pieces)."""
        call_id = next(self._ids)
        events: queue.Queue = queue.Queue()
        self._events[call_id] = events
        self._doing = doing or f"answering {method}"
        try:
            self._send(("call", call_id, method, args, kwargs))
            while True:
                try:
                    message = events.get(timeout=0.5)
                except queue.Empty:
                    if self.process.poll() is not None and self._crash is None:
                        self._reader.join(timeout=10)  # the reader turns the dead worker into an error
                    continue
                kind = message[0]
                if kind == "result":
                    return message[2]
                if kind in ("error", "crashed"):
                    raise message[2]
                if on_event is not None:
                    on_event(message)
        except KeyboardInterrupt:  # a notebook's stop button: stop the engine, keep its state
            self._send(("stop",))
            raise
        finally:
            del self._events[call_id]
            self._doing = "idle"

    # ---- the API -----------------------------------------------------------------------------------------------
    def _load(self) -> None:  # the worker loads the engine (see _start_worker)
        return None

    def _info(self) -> EngineInfo:
        return self._summary["info"]

    def _cache_facts(self) -> CacheFacts:
        return self._call("cache_facts")

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        return self._call("measure_kv_cache")

    def _ranks(self) -> list[RankFacts]:
        return self._call("ranks")

    def _offload(self) -> OffloadFacts:
        return self._call("offload")

    def _compilation(self) -> CompileFacts:
        return self._call("compilation")

    def _score(self, text: str | Sequence[int]) -> TokenScores:
        return self._call("score", text if isinstance(text, str) else list(text), doing="scoring a text")

    def _generate(self, texts: list[str], options: SamplingOptions, chat: bool) -> list[GenerationResult]:
        with self._busy():
            return self._call("generate", texts, options.max_tokens, options.temperature, options.top_p,
                              options.top_k, options.seed, options.stop, chat,
                              doing=f"generating for {len(texts)} prompt(s)")

    def _stream(self, text: str, options: SamplingOptions, chat: bool) -> Iterator[str]:
        pieces: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def call() -> None:
            try:
                self._call("stream", text, options.max_tokens, options.temperature, options.top_p, options.top_k,
                           options.seed, options.stop, chat, doing="streaming an answer",
                           on_event=lambda message: pieces.put(message[2]))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                failure.append(exc)
            finally:
                pieces.put(None)

        def generator() -> Iterator[str]:
            with self._busy():
                caller = threading.Thread(target=call, daemon=True)
                caller.start()
                finished = False
                try:
                    while (piece := pieces.get()) is not None:
                        yield piece
                    finished = True
                finally:
                    if not finished:
                        self._send(("stop",))  # an abandoned stream: the engine aborts its request
                    caller.join()
                if failure:
                    raise failure[0]

        return generator()

    def run(self, requests: Sequence[Request | str], record: bool = True,
            on_step: Callable[[StepSnapshot], None] | None = None,
            on_tokens: Callable[[int, list[int]], None] | None = None,
            on_start: Callable[[Trace], None] | None = None, *, rate: float | None = None,
            burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0) -> Trace:
        """`Engine.run` in the worker: each step's snapshot and each request's tokens reach the callbacks here as the
        engine takes them, and the trace fills in as it would in this process."""
        self._check_open()
        self._load_plan(requests, rate, burstiness, max_concurrency, seed)  # bad input is refused here, at once
        trace: list[Trace] = []

        def on_event(message: tuple) -> None:
            kind = message[0]
            if kind == "start":
                trace.append(message[2])
                if on_start is not None:
                    on_start(trace[0])
            elif kind == "step":
                if record:
                    trace[0].steps.append(message[2])
                if on_step is not None:
                    on_step(message[2])
            elif kind == "tokens" and on_tokens is not None:
                on_tokens(message[2], message[3])

        wants = {"steps": record or on_step is not None, "tokens": on_tokens is not None}
        with self._busy():
            done = self._call("run", list(requests), wants, rate=rate, burstiness=burstiness,
                              max_concurrency=max_concurrency, seed=seed,
                              doing=f"running {len(requests)} request(s)", on_event=on_event)
        result = trace[0] if trace else done
        result.facts, result.requests, result.results = done.facts, done.requests, done.results
        result.engine_counters, result.load_profile = done.engine_counters, done.load_profile
        return result

    def stop(self) -> None:
        """Stop what the engine is doing at its next step (from any thread); the engine stays loaded."""
        super().stop()
        if not self._closed and self.process.poll() is None:
            self._send(("stop",))

    def close(self) -> CloseReport | None:
        """Stop the worker: its process exits, and with it every byte it held. Returns what was given back (the
        kernel's memory before the load and after; the GPU's, where there is one); warns when it did not all
        come back."""
        if self._closed:
            return None
        self._closed = True
        if self.process.poll() is None:
            try:
                self._send(("close",))
                self.process.wait(timeout=60)
            except (WorkbenchError, subprocess.TimeoutExpired):
                pass
        self._kill()
        _WORKERS.discard(self.process)
        self._reader.join(timeout=10)
        self._conn.close()
        if self.process.returncode == 0:
            self.log.unlink(missing_ok=True)  # kept only when the worker did not end well
        import gc

        gc.collect()
        report = CloseReport(self.process.returncode, self._rss_before, process_memory()[0], self._gpu_before,
                             gpu_memory_used())
        if report.gpu_used_before_load is not None and report.gpu_used_after_close is not None \
                and report.gpu_used_after_close > report.gpu_used_before_load + (64 << 20):
            import warnings

            warnings.warn(f"the GPU holds {(report.gpu_used_after_close - report.gpu_used_before_load) >> 20} MiB "
                          f"more than before this {self.name!r} engine was loaded, though its process exited: "
                          f"another process holds it", stacklevel=2)
        return report

    def __getattr__(self, name: str) -> Any:
        # only reached for what the proxy lacks: an engine's internals (`engine.llm`, `engine.hf_model`)
        if name.startswith("_") or "process" not in self.__dict__:
            raise AttributeError(name)
        raise AttributeError(f"{name!r}: the {self.name!r} engine's internals live in its worker process "
                             f"(pid {self.process.pid}); to reach them, load it with isolate=False.")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "crashed" if self._crash else f"pid {self.process.pid}"
        return f"<EngineProxy {self.name!r} model={self.model.name!r} {state}>"


@dataclass
class _Worker:
    """A started worker process, connected back to this one, not yet told which engine to load."""

    process: subprocess.Popen
    conn: Any  # multiprocessing.connection.Connection
    log: Path
    warm: tuple[str, ...] = ()  # the modules it imports while it waits
    environment: dict[str, str] | None = None  # this process's environment when it was started
    warmed: bool = False  # its "warm" message was read (by wait_for_spare)


def _spawn(warm: Sequence[str] = ()) -> _Worker:
    """A new interpreter (never a fork: CUDA, threads and locks do not survive one), started as a module so that
    nothing of the caller's script runs again in it; it connects back over a Unix socket with a secret key, handed
    over its standard input (never on a command line) with the modules to import while it waits. A spare (with
    modules to import) runs at idle priority from its first instruction, where it can be raised again."""
    log = Path(tempfile.mkstemp(prefix="workbench-worker-", suffix=".log")[1])
    folder = tempfile.mkdtemp(prefix="workbench-engine-")
    address, key = os.path.join(folder, "socket"), secrets.token_bytes(32)
    try:
        with Listener(address, family="AF_UNIX", authkey=key) as listener:
            with open(log, "ab") as out:
                process = subprocess.Popen([sys.executable, "-m", "workbench.engines.host", address],
                                           stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
            _WORKERS.add(process)
            if warm and _can_raise_priority():
                try:
                    os.sched_setscheduler(process.pid, os.SCHED_IDLE, os.sched_param(0))
                except OSError:
                    pass
            process.stdin.write("\n".join([key.hex(), *warm]).encode() + b"\n")
            process.stdin.close()
            conn = _accept(listener, process, log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _Worker(process, conn, log, tuple(warm), dict(os.environ))


def _accept(listener: Listener, process: subprocess.Popen, log: Path) -> Any:
    """The worker's connection, or why it never came (it died first, or took too long)."""
    accepted: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: accepted.put(listener.accept()), daemon=True).start()
    deadline = time.monotonic() + _LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return accepted.get(timeout=0.2)
        except queue.Empty:
            if process.poll() is not None:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:]) or "(nothing)"
                raise WorkbenchError(f"an engine's process ended (code {process.returncode}) before it started: "
                                     f"{tail}") from None
    process.kill()
    raise WorkbenchError(f"an engine's process did not start within {_LOAD_TIMEOUT_S} s.")


# One spare worker at a time: started as each load starts (so that its imports overlap that load rather than the
# runs after it), it imports what the last worker of that engine imported (torch, transformers, vLLM: most of a load's
# time in a fresh process; the base every engine imports, before the engine's first load), at idle priority where it
# can be raised again, and waits. The next load takes it when it imported nothing but the base and what that engine
# itself needs: a vLLM spare serves vLLM, a transformers spare serves every engine.
_SPARES: dict[str, _Worker] = {}  # engine name -> its spare (at most one entry)
_SPARES_LOCK = threading.Lock()
_IMPORTED: dict[str, tuple[str, ...]] = {}  # engine name -> the modules its last worker imported, in order
_BASE_MODULES = ("torch", "transformers", "transformers.modeling_utils", "transformers.generation", "safetensors.torch")
_BASE_PACKAGES = {"torch", "transformers", "safetensors", "accelerate", "workbench"}
# Read by the libraries as they are imported (thread pools, devices, the interpreter itself): a spare that imported
# before one of these changed would run with the old value. Any other variable reaches the worker at its load.
_IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH_", "PYTORCH_", "LD_",
                    "PYTHON")


def _take_spare(packages: set[str]) -> _Worker | None:
    """The spare, if it suits an engine that imports `packages`, is alive, and imported with the import-time
    environment of now."""
    with _SPARES_LOCK:
        if not _SPARES:
            return None
        owner, worker = next(iter(_SPARES.items()))
        foreign = {module.partition(".")[0] for module in worker.warm} - _BASE_PACKAGES - packages
        if foreign:
            return None  # it imported another engine's libraries (vLLM's, DeepSpeed's): left for that engine
        del _SPARES[owner]
    changed, removed = _environment_changes(worker)
    if worker.process.poll() is None and not any(k.startswith(_IMPORT_TIME_ENV) for k in [*changed, *removed]):
        return worker
    _end(worker)  # dead, or its imports read a variable that has changed since
    return None


def _environment_changes(worker: _Worker) -> tuple[dict[str, str], list[str]]:
    """What changed in this process's environment since `worker` started: the variables set or changed since, and
    those removed."""
    now, then = dict(os.environ), worker.environment or {}
    return {k: v for k, v in now.items() if then.get(k) != v}, [k for k in then if k not in now]


def _keep_spare(name: str, packages: set[str]) -> None:
    """Start a spare worker for the next load of engine `name` (which imports `packages`) in the background; it
    replaces the one there. Not with `WORKBENCH_SPARE_WORKERS=0`."""
    if os.environ.get("WORKBENCH_SPARE_WORKERS", "1") == "0":
        return
    modules = _IMPORTED.get(name) or (*_BASE_MODULES, *sorted(packages - _BASE_PACKAGES))

    def start() -> None:
        try:
            worker = _spawn(modules)
        except WorkbenchError:
            return
        with _SPARES_LOCK:
            old = list(_SPARES.values())
            _SPARES.clear()
            _SPARES[name] = worker
        for spare in old:
            _end(spare)

    threading.Thread(target=start, name=f"workbench-{name}-spare", daemon=True).start()


def wait_for_spare(name: str, timeout_s: float = 300) -> bool:
    """Wait until a spare worker for engine `name` has imported its libraries (for benchmarks); False if there is
    none, or it took longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _SPARES_LOCK:  # held while reading, so that no load takes the spare meanwhile
            worker = _SPARES.get(name)
            if worker is not None and (worker.warmed or worker.conn.poll(0)):
                if not worker.warmed:
                    worker.conn.recv()
                    worker.warmed = True
                return True
        time.sleep(0.1)
    return False


def end_spare_workers() -> int:
    """End the spare workers kept for the next loads (they hold the engines' libraries, not their models);
    returns how many there were."""
    with _SPARES_LOCK:
        spares = list(_SPARES.values())
        _SPARES.clear()
    for worker in spares:
        _end(worker)
    return len(spares)


def _end(worker: _Worker) -> None:
    worker.conn.close()
    if worker.process.poll() is None:
        worker.process.kill()
    worker.process.wait(timeout=10)
    _WORKERS.discard(worker.process)
    worker.log.unlink(missing_ok=True)


def gpu_memory_used() -> int | None:
    """Bytes in use on the first NVIDIA GPU, from nvidia-smi (so CUDA is never initialised here); None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) << 20 if out else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


# ---- the worker's side -----------------------------------------------------------------------------------------
def _serve_engine(conn, warm: Sequence[str] = ()) -> None:
    """The worker process: load the engine in this process, then serve the kernel's calls until told to close. Its
    standard output and error are the log file."""
    import faulthandler

    faulthandler.enable()  # a native crash leaves the Python stack in the log: the kernel quotes its last lines
    _warm_up(conn, warm)
    try:
        changed, removed = conn.recv()  # the kernel's environment now, against the one this process started with
        os.environ.update(changed)
        for key in removed:
            os.environ.pop(key, None)
        before = set(sys.modules)
        adapter, name, model, options, log = conn.recv()  # unpickling the adapter imports its module
        if log is not None:  # the kernel sends its engine log records to a file: so do its workers
            log_engines_to(log, native=False)
        adapter.name = name
        engine = adapter(model, **options)
    except BaseException as exc:  # noqa: BLE001 - the kernel raises it
        conn.send(("failed", _picklable(exc)))
        return
    imported = [m for m in sys.modules if m not in before and m.partition(".")[0] in _WARM_PACKAGES | {"workbench"}]
    conn.send(("ready", {"info": engine.info, "dtype": engine.dtype, "max_model_len": engine.max_model_len,
                         "load_seconds": engine.load_seconds, "imported": [*warm, *imported]}))
    sending = threading.Lock()

    def send(message: tuple) -> None:
        with sending:
            conn.send(message)

    calls: queue.Queue = queue.Queue()

    def read() -> None:  # `stop` must reach the engine while a call runs in the main thread
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                calls.put(("close",))
                return
            if message[0] == "stop":
                engine.stop()
            else:
                calls.put(message)
                if message[0] == "close":
                    return

    threading.Thread(target=read, daemon=True).start()
    while True:
        message = calls.get()
        if message[0] == "close":
            engine.close()
            _exit_now()
        _, call_id, method, args, kwargs = message
        try:
            send(("result", call_id, _answer(engine, call_id, method, args, kwargs, send)))
        except BaseException as exc:  # noqa: BLE001 - the kernel raises it
            send(("error", call_id, _picklable(exc)))


def _exit_now() -> None:
    """End the worker once its engine has closed, without the interpreter's teardown (a second or more with torch
    loaded, and nothing in it the kernel needs): the log is flushed first, and any process the engine started and
    left running (a rank's worker) is ended, as the atexit handlers skipped here would."""
    import logging

    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    for child in psutil.wait_procs(children, timeout=5)[1]:
        child.kill()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _answer(engine: Engine, call_id: int, method: str, args: tuple, kwargs: dict, send) -> Any:
    if method == "run":
        requests, wants = args
        trace = engine.run(
            requests, record=False,
            on_start=lambda t: send(("start", call_id, Trace(t.engine, t.model, t.facts, list(t.requests),
                                                               load_profile=t.load_profile))),
            on_step=(lambda s: send(("step", call_id, s))) if wants["steps"] else None,
            on_tokens=(lambda i, ids: send(("tokens", call_id, i, ids))) if wants["tokens"] else None, **kwargs)
        return trace  # its steps went one by one; it carries none
    if method == "stream":
        for piece in engine.stream(*args, **kwargs):
            send(("piece", call_id, piece))
        return None
    if method in ("cache_facts", "info", "kv_bytes_per_token"):
        return getattr(engine, method)
    return getattr(engine, method)(*args, **kwargs)


def _picklable(exc: BaseException) -> BaseException:
    """The exception, or a WorkbenchError with its message when it cannot cross the pipe."""
    import pickle

    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - anything unpicklable becomes its message
        return WorkbenchError(f"{type(exc).__name__}: {exc}")


# The packages whose modules a spare worker imports ahead (in the order the last worker of its engine did): the
# engines' own, which take seconds; not every small module of the standard library.
_WARM_PACKAGES = {"torch", "transformers", "vllm", "deepspeed", "tensorrt_llm", "accelerate", "safetensors"}


def _can_raise_priority() -> bool:
    """Whether a process of this user may go from SCHED_IDLE back to normal scheduling."""
    import resource

    return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def _warm_up(conn, modules: Sequence[str]) -> None:
    """Import `modules` while the kernel has not yet said which engine to load: at idle priority (only spare CPU)
    where this process may raise it again, back at normal priority as soon as the kernel asks."""
    if not modules:
        return
    import importlib

    if _can_raise_priority():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        asked = threading.Event()

        def back_to_normal() -> None:
            conn.poll(None)  # the kernel's first message: from here on the user is waiting
            asked.set()
            for thread in os.listdir("/proc/self/task"):  # this thread and any the imports started
                try:
                    os.sched_setscheduler(int(thread), os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass

        threading.Thread(target=back_to_normal, daemon=True).start()
    start = time.perf_counter()
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a module that needs its engine's state first is imported then
            pass
    conn.send(("warm", time.perf_counter() - start))


if __name__ == "__main__":  # python -m workbench.engines.host SOCKET; the key, then modules to import, on stdin
    _key, *_modules = sys.stdin.read().split()
    _serve_engine(Client(sys.argv[1], family="AF_UNIX", authkey=bytes.fromhex(_key)), _modules)
