"""Hugging Face Text Generation Inference, through its native API: `/info` and the `/generate_stream` token stream.

Raw-text prompts (`chat=False`) go to `/generate_stream`, which sends every token with its id; chat prompts go to
TGI's OpenAI-compatible Messages API (`/v1/chat/completions`), which applies the model's chat template on the
server. Both stream through the same exact client as the `openai` engine. Traces come from TGI's `/metrics`
(`tgi_batch_current_size`, `tgi_queue_size`, ...), as for any server. Request fields follow TGI 3.x's router (its
request and response types, validation and metric names).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Sequence

from workbench.engines.http_streams import Stamps, server_sent_events
from workbench.engines.openai import OpenAIEngine, Replica, _message_of, _Reply
from workbench.errors import InvalidRequestError
from workbench.types import SamplingOptions

_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


class TGIEngine(OpenAIEngine):
    """A model served by TGI.

    >>> engine = wb.load("tgi", url="http://127.0.0.1:8080")                                   # doctest: +SKIP
    >>> engine.generate("The capital of France is", chat=False, temperature=0)[0].token_ids   # doctest: +SKIP
    """

    api_name = "TGI API"

    def __init__(self, model: str | None = None, url: str | Sequence[str] = "http://127.0.0.1:8080",
                 api_key_env: str = "HF_TOKEN", **options: Any) -> None:
        super().__init__(model, url=url, api_key_env=api_key_env, **options)

    @staticmethod
    def _api_url(url: str) -> str:
        return url.removesuffix("/v1")  # TGI's own API is at its root; the Messages API below /v1

    def _openai_root(self, replica: Replica) -> str:
        return f"{replica.url}/v1"

    def _connect(self, replica: Replica) -> tuple[str, int | None]:
        info = self._get_json(f"{replica.url}/info", "reading /info")
        served = info.get("model_id", "")
        if self._requested_model and self._requested_model != served:
            raise InvalidRequestError(f"the server at {replica.url} does not serve model {self._requested_model!r}; "
                                      f"it serves: {served}.")
        self.tgi_info = info
        return served, info.get("max_total_tokens")

    def _check_options(self, options: SamplingOptions, chat: bool) -> None:
        """Refuse what TGI would refuse mid-run or silently ignore."""
        if options.ignore_eos:
            raise InvalidRequestError("TGI cannot ignore the end-of-sequence token: make the workload with "
                                      "ignore_eos=False.")
        if chat and options.top_k:
            raise InvalidRequestError("TGI's Messages API has no top_k (it would be ignored): use top_p, or "
                                      "chat=False for TGI's own /generate_stream, which takes top_k.")
        limit = self.tgi_info.get("max_stop_sequences")
        if limit is not None and len(options.stop) > limit:
            raise InvalidRequestError(f"this TGI server takes at most {limit} stop strings "
                                      f"(--max-stop-sequences), got {len(options.stop)}.")

    def _request_options(self, options: SamplingOptions) -> dict[str, Any]:
        body = super()._request_options(options)
        # TGI's router reads `model` as a LoRA adapter id unless it is "tgi", and its validation refuses top_p=1;
        # leaving top_p out when greedy also keeps the server from switching sampling back on.
        body["model"] = "tgi"
        if options.greedy or options.top_p >= 1:
            del body["top_p"]
        return body

    async def _chunks(self, replica: Replica, prompt: str | Sequence[int], options: SamplingOptions, chat: bool,
                      system: str | None, reply: _Reply) -> AsyncIterator[str]:
        if chat:
            async for piece in super()._chunks(replica, prompt, options, chat, system, reply):
                yield piece
            return
        if not isinstance(prompt, str):
            raise InvalidRequestError("TGI's /generate_stream takes text, not token ids: give the prompt as text.")
        parameters: dict[str, Any] = {"max_new_tokens": options.max_tokens, "details": True,
                                      "do_sample": not options.greedy}
        if not options.greedy:  # TGI refuses temperature 0 and top_p 1: leave out what is off
            parameters["temperature"] = options.temperature
            if options.top_p < 1:
                parameters["top_p"] = options.top_p
            if options.top_k:
                parameters["top_k"] = options.top_k
        if options.seed is not None:
            parameters["seed"] = options.seed
        if options.stop:
            parameters["stop"] = list(options.stop)
        body = {"inputs": (system + "\n" if system else "") + prompt, "parameters": parameters}
        stamps = Stamps()
        async for now, data in server_sent_events(self._http.http, f"{replica.url}/generate_stream", body,
                                                  self._headers(), stamps):
            reply.sent = stamps.sent
            event = json.loads(data)
            if "error" in event:
                raise InvalidRequestError(f"TGI stopped the request: {_message_of(event['error'])}")
            token = event.get("token") or {}
            if "id" in token:
                reply.token_ids.append(token["id"])
                reply.chunk_times.append(now)
            details = event.get("details") or {}
            if details:
                reply.finish_reason = _FINISH.get(details.get("finish_reason"), "stop")
                reply.completion_tokens = details.get("generated_tokens", len(reply.token_ids))
                reply.prompt_tokens = details.get("input_length", reply.prompt_tokens)
            yield "" if token.get("special") else token.get("text", "")
