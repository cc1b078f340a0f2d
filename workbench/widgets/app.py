"""The Workbench: one widget to load a model in an engine, send a prompt or a workload, and watch the engine work.

Loading and generation run off the kernel's main thread, so other cells still run meanwhile; the views redraw
live from the engine's trace, and afterwards a slider replays the run step by step. In compare mode a second engine
is loaded beside the first (each in its own process), the same requests run on both at once, and every view shows
the two side by side on one time axis.

>>> from workbench.widgets import Workbench
>>> bench = Workbench(); bench                     # press Load, then Run        # doctest: +SKIP
>>> bench.load("vllm", "smollm2-135m"); bench.run(); bench.wait()               # the same, from code  # doctest: +SKIP
>>> bench.compare_picker.value = "transformers"; bench.load(); bench.run()      # side by side        # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as widgets

import workbench
from workbench.engines import accepted_options
from workbench.errors import WorkbenchError
from workbench.sysmem import process_memory
from workbench.trace import Trace
from workbench.widgets.live import LiveFeed
from workbench.widgets.replay import Replay
from workbench.workload import Request, make_workload

_WIDE = widgets.Layout(width="95%")
# Workbench option -> the engine option it sets; an engine gets only those it accepts.
_ENGINE_OPTIONS = ("max_model_len", "kv_cache_gb", "block_size", "max_batch_size", "enable_prefix_caching")


class Workbench:
    """Engine and model pickers, engine options, Load/Unload, a prompt box or a workload, sampling controls,
    Run/Stop, streaming text per request, and the live views with replay."""

    def __init__(self, engine: str | None = None, model: str = workbench.DEFAULT_MODEL, fps: float = 10.0) -> None:
        self.engine: workbench.Engine | None = None
        self.other: workbench.Engine | None = None  # compare mode's second engine
        self.trace: Trace | None = None
        self.other_trace: Trace | None = None
        self.texts: dict[int, str] = {}
        self.error: str = ""
        self.fps = fps
        self._worker: threading.Thread | None = None
        self._tokens: dict[int, list[int]] = {}
        self._feed: LiveFeed | None = None
        self._build(engine, model)

    # ---- layout ------------------------------------------------------------------------------------------------
    def _build(self, engine: str | None, model: str) -> None:
        # The pickers load a model in this process; a server engine is connected to with `workbench.load("openai")`.
        statuses = [s for s in workbench.engines() if not s.remote]
        installed = [s.name for s in statuses if s.installed]
        self._statuses = {s.name: s for s in statuses}
        best = next((name for name in ("vllm", "transformers-paged", "transformers") if name in installed),
                    installed[0] if installed else statuses[0].name)
        self.engine_picker = widgets.Dropdown(
            description="engine", value=engine or best,
            options=[(s.name if s.installed else f"{s.name} (not installed)", s.name) for s in statuses])
        self.engine_note = widgets.HTML()
        self.compare_picker = widgets.Dropdown(description="compare with", value="",
                                               options=[("none", ""), *((name, name) for name in installed)])
        self.model_picker = widgets.Combobox(description="model", value=model, placeholder="alias or folder",
                                             options=list(workbench.list_models()), ensure_option=False)
        self.dtype = widgets.Dropdown(description="dtype", options=["float32", "bfloat16", "float16"])
        self.max_model_len = widgets.IntText(description="context", value=2048)
        self.kv_cache_gb = widgets.FloatText(description="KV GiB", value=1.0, step=0.25)
        self.block_size = widgets.Dropdown(description="block size", options=[16, 32, 64, 128], value=32)
        self.max_batch_size = widgets.IntText(description="max batch", value=32)
        self.enable_prefix_caching = widgets.Checkbox(description="prefix caching", value=True)
        self.load_button = widgets.Button(description="Load", button_style="primary", icon="play")
        self.unload_button = widgets.Button(description="Unload", disabled=True)
        self.load_progress = widgets.IntProgress(min=0, max=3, value=0, layout=widgets.Layout(width="200px"))
        self.load_status = widgets.HTML()
        self.engine_picker.observe(lambda change: self._engine_picked(), names="value")
        self.load_button.on_click(lambda _: self.load())
        self.unload_button.on_click(lambda _: self.unload())

        self.input_mode = widgets.ToggleButtons(options=["prompt", "workload"], value="prompt")
        self.prompt = widgets.Textarea(value="What is the capital of France?", layout=_WIDE,
                                       placeholder="one prompt per line")
        self.requests = widgets.IntSlider(description="requests", min=1, max=64, value=8)
        self.prompt_words = widgets.IntRangeSlider(description="prompt words", min=1, max=512, value=(8, 24))
        self.output_tokens = widgets.IntRangeSlider(description="output tokens", min=1, max=512, value=(16, 48))
        self.shared_prefix = widgets.IntSlider(description="shared prefix", min=0, max=512, value=0)
        self.rate = widgets.FloatText(description="arrivals/s", value=0.0, step=0.5)
        self.workload_seed = widgets.IntText(description="seed", value=0)
        workload_box = widgets.VBox([self.requests, self.prompt_words, self.output_tokens, self.shared_prefix,
                                     widgets.HBox([self.rate, self.workload_seed])])
        self.inputs = widgets.Stack([self.prompt, workload_box], selected_index=0)
        widgets.jslink((self.input_mode, "index"), (self.inputs, "selected_index"))
        self.input_mode.observe(lambda change: setattr(self.inputs, "selected_index", self.input_mode.index),
                                names="value")

        self.max_tokens = widgets.IntText(description="max tokens", value=64)
        self.temperature = widgets.FloatSlider(description="temperature", min=0.0, max=2.0, value=0.0, step=0.05)
        self.top_p = widgets.FloatSlider(description="top p", min=0.05, max=1.0, value=1.0, step=0.05)
        self.top_k = widgets.IntText(description="top k", value=0)
        self.seed = widgets.IntText(description="seed", value=0)
        self.run_button = widgets.Button(description="Run", button_style="success", disabled=True, icon="forward")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", disabled=True, icon="stop")
        self.run_status = widgets.HTML()
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.output = widgets.HTML(layout=widgets.Layout(max_height="260px", overflow="auto", width="95%"))

        self.replay = Replay()
        self.views = self.replay.views
        # compare mode's column is built now and hidden: a plotly widget moved to a new parent later is drawn
        # afresh in the browser, without the frames sent to it since
        self.replay.columns.append([type(view)() for view in self.views])
        self.tabs = tabs = widgets.Tab([widgets.HBox([first.widget, second.widget])
                                        for first, second in zip(*self.replay.columns)],
                                       titles=("KV cache", "Batching timeline", "Memory", "Throughput"))
        self._show_columns(1)
        self.tabs.observe(lambda change: self._draw_selected_tab(), names="selected_index")

        options_box = widgets.VBox([
            widgets.HBox([self.dtype, self.max_model_len, self.kv_cache_gb]),
            widgets.HBox([self.block_size, self.max_batch_size, self.enable_prefix_caching])])
        self.widget = widgets.VBox([
            widgets.HTML("<b>Engine</b>"),
            widgets.HBox([self.engine_picker, self.model_picker, self.compare_picker]), self.engine_note, options_box,
            widgets.HBox([self.load_button, self.unload_button, self.load_progress, self.load_status]),
            widgets.HTML("<b>Requests</b>"), self.input_mode, self.inputs,
            widgets.HBox([self.max_tokens, self.temperature]), widgets.HBox([self.top_p, self.top_k, self.seed]),
            widgets.HBox([self.run_button, self.stop_button, self.run_status]),
            self.output, self.replay.controls, tabs])
        self._engine_picked()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _engine_picked(self) -> None:
        status = self._statuses[self.engine_picker.value]
        if status.installed:
            self.engine_note.value = f"<i>{html.escape(status.description)}</i>"
        else:
            self.engine_note.value = (f"<b>not installed here</b>: {html.escape(status.reason)}. "
                                      f"Install with <code>{html.escape(status.install)}</code>.")
        self.load_button.disabled = not status.installed or self._busy()

    # ---- loading -----------------------------------------------------------------------------------------------
    def engine_options(self, engine: str) -> dict[str, Any]:
        """The options the pickers set, for those `engine` accepts."""
        accepted = set(accepted_options(engine))
        values = {"dtype": self.dtype.value, "max_model_len": self.max_model_len.value,
                  "kv_cache_gb": self.kv_cache_gb.value, "block_size": self.block_size.value,
                  "max_batch_size": self.max_batch_size.value,
                  "enable_prefix_caching": self.enable_prefix_caching.value}
        return {name: value for name, value in values.items() if name in accepted}

    def load(self, engine: str | None = None, model: str | None = None, **options: Any) -> None:
        """Load `engine` with `model` in the background (what the Load button does); options override the pickers.
        Any engine loaded before is closed first."""
        if engine is not None:
            self.engine_picker.value = engine
        if model is not None:
            self.model_picker.value = model
        if self._busy():
            self._say(self.load_status, "busy: wait for the current load or run to end (or press Stop).")
            return
        name, model_name = self.engine_picker.value, self.model_picker.value
        self._start(self._load_in_background, name, model_name, options)

    def _load_in_background(self, name: str, model_name: str, overrides: dict[str, Any]) -> None:
        self._set_buttons(loading=True)
        self.load_progress.value, self.load_progress.bar_style = 0, "info"
        try:
            self._close_engines()
            self.load_status.value = f"preparing {html.escape(model_name)} ..."
            options = {**self.engine_options(name), **overrides}
            workbench.resolve_model(model_name)  # the one slow step before the engine's own: a first conversion
            self.load_progress.value = 1
            self.load_status.value = f"loading in {html.escape(name)} ..."
            start = time.perf_counter()
            self.engine = workbench.load(name, model=model_name, **options)
            seconds = time.perf_counter() - start
            info = self.engine.info
            self.load_progress.value, self.load_progress.bar_style = 3, "success"
            other = self.compare_picker.value
            if other:
                self.load_status.value = f"loading {html.escape(other)} beside it ..."
                self.other = workbench.load(other, model=model_name, **{**self.engine_options(other), **overrides})
            beside = f"; beside it {html.escape(other)}" if other else ""
            self.load_status.value = (f"{html.escape(info.engine)} {html.escape(info.engine_version)} "
                                      f"on {info.device}: "
                                      f"{html.escape(info.model)}, {info.dtype}, "
                                      f"{info.weight_bytes / 2**20:.0f} MiB of weights, loaded in {seconds:.1f} s"
                                      f"{beside}; this kernel holds {process_memory()[0] / 2**30:.1f} GiB")
        except WorkbenchError as exc:
            self.load_progress.bar_style = "danger"
            self._say(self.load_status, str(exc))
        except Exception as exc:  # the widget must survive anything an engine throws at load
            self.load_progress.bar_style = "danger"
            self._say(self.load_status, f"{type(exc).__name__}: {exc}")
        finally:
            self._set_buttons()

    def unload(self) -> None:
        """Close the engine and free its memory."""
        if self._busy():
            self._say(self.load_status, "busy: press Stop first.")
            return
        self._close_engines()
        self.load_progress.value, self.load_progress.bar_style = 0, ""
        self.load_status.value = "unloaded"
        self._set_buttons()

    def _close_engines(self) -> None:
        for engine in (self.engine, self.other):
            if engine is not None:
                engine.close()
        self.engine = self.other = None

    # ---- running -----------------------------------------------------------------------------------------------
    def current_requests(self) -> list[Request]:
        """The requests the Run button would send: the prompt box's lines, or the workload picker's workload."""
        if self.input_mode.value == "workload":
            return make_workload(n=self.requests.value, prompt_words=self.prompt_words.value,
                                 output_tokens=self.output_tokens.value, shared_prefix_tokens=self.shared_prefix.value,
                                 rate=self.rate.value or None, seed=self.workload_seed.value,
                                 temperature=self.temperature.value)
        prompts = [line for line in self.prompt.value.splitlines() if line.strip()]
        return [Request(p, max_tokens=self.max_tokens.value, temperature=self.temperature.value, top_p=self.top_p.value,
                        top_k=self.top_k.value, seed=self.seed.value) for p in prompts]

    def run(self, requests: list[Request] | None = None) -> None:
        """Send `requests` (default: what the controls say) in the background, with live views."""
        if self.engine is None:
            self._say(self.run_status, "load an engine first.")
            return
        if self._busy():
            self._say(self.run_status, "busy: wait for the current run to end, or press Stop.")
            return
        try:
            requests = requests if requests is not None else self.current_requests()
        except WorkbenchError as exc:
            self._say(self.run_status, str(exc))
            return
        if not requests:
            self._say(self.run_status, "the prompt box is empty: write a prompt (one per line).")
            return
        self._start(self._run_in_background, requests)

    def _run_in_background(self, requests: list[Request]) -> None:
        self._set_buttons(running=True)
        self._tokens, self.texts, self.error = {}, {}, ""
        self.output.value = ""
        self.run_status.value = f"running {len(requests)} request(s) ..."
        self._show_columns(2 if self.other is not None else 1)
        feed = LiveFeed(self.views, fps=self.fps, on_frame=lambda trace: self._show_texts(),
                        visible=lambda view: self.views.index(view) == self.tabs.selected_index)
        self._feed = feed
        beside = self._run_beside(requests) if self.other is not None else None
        start = time.perf_counter()
        try:
            with feed:
                self.trace = self.engine.run(requests, on_tokens=self._on_tokens, **feed.callbacks)
            seconds = time.perf_counter() - start
            results = self.trace.results
            self.texts = {i: r.text for i, r in enumerate(results)}
            self._show_texts()
            status = self._summary(self.trace, seconds)
            if beside is not None:
                beside.join()
                status += "; " + (self._summary(self.other_trace, self._other_seconds) if self.other_trace
                                  else f"{self.other.name}: {self._other_error}")
            self.run_status.value = status
            self.replay.load([self.trace, self.other_trace] if self.other_trace is not None else self.trace)
        except WorkbenchError as exc:
            self._say(self.run_status, str(exc))
        except Exception as exc:  # keep the widget and the engine usable whatever the run raised
            self._say(self.run_status, f"{type(exc).__name__}: {exc}")
        finally:
            self._set_buttons()

    def _run_beside(self, requests: list[Request]) -> threading.Thread:
        """The same requests on the second engine, at the same time, its views in the second column."""
        self.other_trace, self._other_error = None, ""
        views = self.replay.columns[1]
        feed = LiveFeed(views, fps=self.fps, visible=lambda view: views.index(view) == self.tabs.selected_index)

        def run() -> None:
            start = time.perf_counter()
            try:
                with feed:
                    self.other_trace = self.other.run(requests, **feed.callbacks)
                self._other_seconds = time.perf_counter() - start
            except Exception as exc:  # told in the status line; the first engine's run goes on
                self._other_error = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=run, name="workbench-compare", daemon=True)
        thread.start()
        return thread

    @staticmethod
    def _summary(trace: Trace, seconds: float) -> str:
        tokens = sum(r.metrics.generated_tokens for r in trace.results)
        stopped = sum(r.finish_reason == "abort" for r in trace.results)
        return (f"{trace.engine}: {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s), "
                f"{len(trace.steps)} steps" + (f", {stopped} stopped" if stopped else ""))

    def _show_columns(self, count: int) -> None:
        """One view per tab, or in compare mode the two engines' views side by side."""
        for view in self.replay.columns[1]:
            view.widget.layout.display = "" if count > 1 else "none"

    def _draw_selected_tab(self) -> None:
        """A view hidden while a run went on is drawn when its tab is picked."""
        index = self.tabs.selected_index
        trace = self._feed.trace if self._feed is not None else None
        if index is not None and trace is not None and trace.steps:
            view = self.views[index]
            view.show(trace, self.replay.slider.value if not self._busy() else len(trace.steps) - 1)

    def _on_tokens(self, index: int, token_ids: list[int]) -> None:
        self._tokens.setdefault(index, []).extend(token_ids)  # decoded at frame time, not per token

    def _show_texts(self) -> None:
        if self.engine is not None and self._tokens and len(self.texts) < len(self._tokens):
            decode = self.engine.tokenizer.decode
            live = {i: decode(ids, skip_special_tokens=True) for i, ids in list(self._tokens.items())}
        else:
            live = {}
        texts = {**live, **self.texts}
        rows = "".join(f"<tr><td style='vertical-align:top'><b>r{i}</b></td>"
                       f"<td style='white-space:pre-wrap'>{html.escape(texts[i])}</td></tr>" for i in sorted(texts))
        self.output.value = f"<table class='workbench-texts'>{rows}</table>"

    def stop(self) -> None:
        """Abort the running requests; the engine stays loaded and usable."""
        if self.engine is not None and self._busy():
            for engine in (self.engine, self.other):
                if engine is not None:
                    engine.stop()
            self.run_status.value = "stopping ..."

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current load or run ends (for scripts and tests; the buttons never need it)."""
        if self._worker is not None:
            self._worker.join(timeout)

    # ---- shared ------------------------------------------------------------------------------------------------
    def _busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _start(self, target, *args) -> None:
        self._worker = threading.Thread(target=target, args=args, name="workbench-worker", daemon=True)
        self._worker.start()

    def _set_buttons(self, loading: bool = False, running: bool = False) -> None:
        idle = not (loading or running)
        self.load_button.disabled = not idle or not self._statuses[self.engine_picker.value].installed
        self.unload_button.disabled = not idle or self.engine is None
        self.run_button.disabled = not idle or self.engine is None
        self.stop_button.disabled = not running

    def _say(self, target: widgets.HTML, message: str) -> None:
        self.error = message
        target.value = f"<span style='color:#c0392b'>{html.escape(message)}</span>"
