"""`qwenvl serve`: the OpenAI API (chat completions with pictures, completions, models, tokenize) over the
continuous-batching engine, plus /health and Prometheus /metrics.

A request is checked, its pictures fetched (server-mode rules, `media.py`) and its prompt built before it
reaches the engine; every refusal is OpenAI's JSON error shape with the status a client can act on (400
naming the field, 401, 404, 413, 429/503 with Retry-After). A client that disconnects cancels its request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from ..boxes import parse_boxes, to_pixels
from ..chat import reply_ids
from ..engine import EngineStopped, LLMEngine, Picture, QueueFull
from ..errors import ImageError, QwenVLError
from ..generation import SamplingParams
from .media import MediaPolicy, MediaTooLarge
from .prompt import Prompt, PromptBuilder
from .protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


@dataclass
class ServerSettings:
    served_model_name: str = "qwen-vl"
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images_per_request: int = 8
    retry_after_s: int = 1


class Metrics:
    def __init__(self, engine: LLMEngine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("qwenvl_requests", "Requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("qwenvl_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.output_tokens = Counter("qwenvl_output_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("qwenvl_time_to_first_token_seconds", "Arrival to first token", registry=registry,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("qwenvl_inter_token_latency_seconds", "Time between two tokens of a stream",
                             registry=registry, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        Gauge("qwenvl_running_sequences", "Sequences holding a cache slot", registry=registry) \
            .set_function(lambda: engine.num_running)
        Gauge("qwenvl_waiting_sequences", "Sequences queued for a slot", registry=registry) \
            .set_function(lambda: engine.num_waiting)
        Gauge("qwenvl_image_cache_hits", "Pictures whose features came from the cache", registry=registry) \
            .set_function(lambda: engine.runner.image_hits)
        Gauge("qwenvl_image_cache_misses", "Pictures encoded", registry=registry) \
            .set_function(lambda: engine.runner.image_misses)
        Gauge("qwenvl_prefix_cache_tokens", "Prompt tokens whose cache came from the prefix cache",
              registry=registry).set_function(lambda: engine.stats["prefix_cache_tokens"])


class Choice:
    """One sequence's text as the client sees it: cut at end-of-turn and at the first stop string."""

    def __init__(self, seq, tokenizer, stops: list[str]):
        self.seq, self.tokenizer, self.stops = seq, tokenizer, stops
        self.sent = ""
        self.text = ""
        self.stopped = False  # by a stop string
        self.closed = False  # its last text has been handed out
        self.hold = max((len(s) for s in stops), default=1) - 1

    def update(self) -> str:
        """The new text to send (none while a character or a possible stop string is incomplete)."""
        ids = reply_ids(self.seq.output, self.tokenizer)
        text = self.tokenizer.decode(ids, errors="replace")
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                text, self.stopped = text[:at], True
        self.text = text
        if self.done:
            ready = text
        else:
            ready = text[:len(text) - self.hold] if self.hold else text
            if ready.endswith("\ufffd"):
                ready = ready[:-1]
        delta = ready[len(self.sent):] if ready.startswith(self.sent) else ""
        self.sent += delta
        return delta

    @property
    def done(self) -> bool:
        return self.stopped or self.seq.finished

    @property
    def finish_reason(self) -> str:
        return "stop" if self.stopped or self.seq.finish_reason in ("stop", "abort") else "length"


def engine_lifespan(engine: LLMEngine):
    """The app's lifespan: the engine's loop runs while the app serves (the API's and the web page's)."""
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.accepting = False
        engine.stop()
    return lifespan


def build_app(engine: LLMEngine, tokenizer, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    builder = PromptBuilder(tokenizer, engine.model.generation_config.max_window_size)
    metrics = Metrics(engine)
    app = FastAPI(title="qwenvl", lifespan=engine_lifespan(engine))
    app.state.engine = engine

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(_from_validation(e.errors()))

    @app.exception_handler(404)
    async def _not_found(request: Request, e):
        return error_response(APIError(404, f"no such endpoint: {request.method} {request.url.path}", "not_found_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if settings.api_key and request.url.path.startswith(("/v1", "/tokenize")):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return error_response(APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                               "authentication_error"))
        return await call_next(request)

    async def parse(request: Request, model_type):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        try:
            parsed = model_type.model_validate(body)
        except ValidationError as e:
            raise _from_validation(e.errors()) from None
        if parsed.model is not None and parsed.model != settings.served_model_name:
            raise APIError(404, f"the model {parsed.model!r} does not exist; this server serves "
                                f"{settings.served_model_name!r}", "not_found_error", "model")
        return parsed

    async def pictures(prompt: Prompt) -> list[Picture]:
        if len(prompt.urls) > settings.max_images_per_request:
            raise APIError(400, f"the request has {len(prompt.urls)} images, more than the server's "
                                f"{settings.max_images_per_request} (--max-images-per-request)", param="messages")
        try:
            images = await asyncio.gather(*(asyncio.to_thread(settings.media.load, url) for url in prompt.urls))
        except MediaTooLarge as e:
            raise APIError(413, str(e), param="messages") from None
        except ImageError as e:
            raise APIError(400, str(e), param="messages") from None
        size = engine.model.config.visual.image_size
        return [Picture(image, size) for image in images]

    def sampling(req, max_tokens: int | None, prompt_len: int) -> SamplingParams:
        config = engine.model.generation_config
        options = {"stop_words_ids": [[tokenizer.im_end_id], [tokenizer.im_start_id]]}
        if req.ignore_eos:  # fixed-length answers, as load tests want them
            options.update(stop_words_ids=[], eos_token_id=None)
        if max_tokens is None:
            max_tokens = max(min(config.max_new_tokens, engine.max_model_len - prompt_len), 1)
        options["max_new_tokens"] = max_tokens
        if req.temperature is not None:
            options.update(do_sample=req.temperature > 0, temperature=req.temperature or 1.0)
        for name in ("top_p", "top_k", "repetition_penalty", "seed"):
            if getattr(req, name) is not None:
                options[name] = getattr(req, name)
        try:
            return SamplingParams.build(config, **options)
        except QwenVLError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None

    def stops_of(req) -> list[str]:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: at most 4 non-empty strings", param="stop")
        return stops

    async def submit(prompts: list[Prompt], labels: list[str | None], field: str, params: SamplingParams, n: int,
                     logprobs: int | None, images, queue, loop):
        """n sequences per prompt, prompt by prompt (choice index = prompt index * n + k); a refused prompt
        cancels the ones queued before it, and its error names it by `labels` (None: the request's `field`)."""
        seqs = []

        def listener(seq, tokens):
            loop.call_soon_threadsafe(queue.put_nowait, seq)

        try:
            for prompt, label in zip(prompts, labels):
                for i in range(n):
                    p = params if i == 0 or params.seed is None else \
                        SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                    try:
                        seqs.append(engine.add_request(prompt.ids, p, images=images, listener=listener,
                                                       logprobs=logprobs))
                    except QueueFull as e:
                        raise APIError(429, str(e), "rate_limit_error",
                                       headers={"Retry-After": str(settings.retry_after_s)}) from None
                    except EngineStopped as e:
                        raise APIError(503, str(e), "service_unavailable",
                                       headers={"Retry-After": str(settings.retry_after_s)}) from None
                    except QwenVLError as e:
                        raise APIError(400, f"{label}: {e}" if label else str(e),
                                       param=_param_of(str(e)) or label or field) from None
        except APIError:
            for s in seqs:
                engine.abort(s)
            raise
        metrics.prompt_tokens.inc(sum(len(p.ids) for p in prompts) * n)
        return seqs

    def observe(seq, last: list) -> None:
        now = seq.last_token_at
        if now is None or last[0] == now:
            return
        if last[0] is None and seq.first_token_at is not None:
            metrics.ttft.observe(seq.first_token_at - seq.arrival)
        elif last[0] is not None:
            metrics.itl.observe(now - last[0])
        last[0] = now

    async def run(request: Request, req, prompts: list[Prompt], labels: list[str | None], params, logprobs,
                  endpoint: str, render):
        images = await pictures(prompts[0])  # the prompts of one request show the same pictures
        stops = stops_of(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        field = "messages" if endpoint == "chat" else "prompt"
        seqs = await submit(prompts, labels, field, params, req.n, logprobs, images, queue, loop)
        choices = [Choice(s, tokenizer, stops) for s in seqs]
        index = {s.id: i for i, s in enumerate(seqs)}
        created, rid = int(time.time()), f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        last = [[None] for _ in seqs]

        async def events():
            """(choice index, new text) as the sequences advance; aborts them all if the client leaves."""
            try:
                while not all(c.closed for c in choices):
                    try:
                        seq = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    i = index[seq.id]
                    choice = choices[i]
                    if choice.closed:
                        continue
                    if seq.finish_reason == "error":
                        raise APIError(500, f"the request failed in the engine: {seq.error}", "server_error")
                    if seq.finish_reason == "abort" and not choice.stopped:  # not by us: the server shuts down
                        raise APIError(503, "the server shut down before the answer was complete (--shutdown-timeout)",
                                       "service_unavailable")
                    observe(seq, last[i])
                    delta = choice.update()
                    if choice.stopped and not seq.finished:
                        engine.abort(seq)
                    choice.closed = choice.done
                    if delta or choice.closed:
                        yield i, delta
            finally:
                for s in seqs:
                    if not s.finished:
                        engine.abort(s)

        def usage() -> dict:
            given, completion = sum(len(p.ids) for p in prompts), sum(len(s.output) for s in seqs)
            return {"prompt_tokens": given, "completion_tokens": completion, "total_tokens": given + completion}

        if not req.stream:
            async for _ in events():
                pass
            if not all(c.closed for c in choices):
                raise APIError(499, "the client disconnected")
            metrics.output_tokens.inc(sum(len(s.output) for s in seqs))
            metrics.requests.labels(request.url.path, "200").inc()
            return JSONResponse(render.full(rid, created, choices, usage(), images))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def stream():
            try:
                yield _sse(render.first(rid, created, len(choices)))
                async for i, delta in events():
                    c = choices[i]
                    yield _sse(render.chunk(rid, created, i, delta, c.finish_reason if c.done else None, c, images))
                if include_usage:
                    yield _sse(render.usage_chunk(rid, created, usage()))
                yield "data: [DONE]\n\n"
                metrics.output_tokens.inc(sum(len(s.output) for s in seqs))
                metrics.requests.labels(request.url.path, "200").inc()
            except APIError as e:
                yield _sse(error_body(e.message, e.kind, e.param, e.status))
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        try:
            prompt = builder.chat(req.messages)
        except QwenVLError as e:
            raise APIError(400, str(e), param=str(e).split(":")[0] if str(e).startswith("messages") else "messages")
        params = sampling(req, req.max_completion_tokens or req.max_tokens, len(prompt.ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await run(request, req, [prompt], [None], params, logprobs, "chat",
                         ChatRender(settings.served_model_name, tokenizer))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        given = completion_prompts(req.prompt)
        labels = [None] if isinstance(req.prompt, str) or _is_ids(req.prompt) else \
            [f"prompt[{i}]" for i in range(len(given))]
        prompts = [builder.completion(p, req.images) for p in given]
        params = sampling(req, req.max_tokens or 16, 0)  # (the prompt's length matters only without max_tokens)
        params.stop_words_ids = []
        return await run(request, req, prompts, labels, params, req.logprobs, "completion",
                         CompletionRender(settings.served_model_name, tokenizer))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        try:
            prompt = builder.chat(req.messages) if req.messages is not None else builder.completion(req.prompt, [])
        except QwenVLError as e:
            raise APIError(400, str(e), param="messages")
        return {"tokens": prompt.ids, "count": len(prompt.ids), "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "qwenvl", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if not engine.accepting:
            raise APIError(503, "shutting down", "service_unavailable", headers={"Retry-After": "1"})
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def completion_prompts(prompt) -> list[str | list[int]]:
    """The completions API's prompt (a string, a list of strings, a list of token ids, or a list of token-id
    lists) as a list of prompts; an element of another kind is refused by its index."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: give at least one prompt", param="prompt")
    if _is_ids(prompt):
        return [prompt]
    for i, p in enumerate(prompt):
        if not (isinstance(p, str) or _is_ids(p)):
            raise APIError(400, f"prompt[{i}]: each prompt must be a string or a list of token ids (integers), "
                                f"got {json.dumps(p)[:60]}", param=f"prompt[{i}]")
    return list(prompt)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _param_of(message: str) -> str | None:
    """The request field a sampling or length message names."""
    for option, param in (("max_new_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                          ("top_k", "top_k"), ("repetition_penalty", "repetition_penalty"), ("seed", "seed")):
        if option in message:
            return param
    return None


def _from_validation(errors: list) -> APIError:
    first = errors[0] if errors else {}
    loc = []
    for p in first.get("loc", ()):
        p = str(p)
        if p in ("str", "int", "float", "bool", "TextPart", "ImagePart") or "[" in p or p.startswith(("function-", "list")):
            break  # a union's failed branch names its type: the field ends before it
        if p != "body":
            loc.append(p)
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    return APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)


class ChatRender:
    def __init__(self, model: str, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def _logprobs(self, choice: Choice) -> dict | None:
        if choice.seq.logprobs is None:
            return None
        item = lambda i, lp: {"token": self.tokenizer.decode([i]), "logprob": lp,
                              "bytes": list(self.tokenizer.decode([i]).encode("utf-8"))}
        content = []
        for token, (lp, top) in zip(choice.seq.output, choice.seq.token_logprobs):
            content.append({**item(token, lp), "top_logprobs": [item(i, v) for i, v in top]})
        return {"content": content}

    def boxes(self, text: str, images: list[Picture]) -> list[dict]:
        found = parse_boxes(text)
        if not found:
            return []
        size = images[-1].size if images else None
        return [{"ref": b["ref"], "box": list(b["box"]),
                 "box_pixels": list(to_pixels(b["box"], *size)) if size else None} for b in found]

    def full(self, rid, created, choices, usage, images) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": i, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c),
                             "message": {"role": "assistant", "content": c.text, "boxes": self.boxes(c.text, images)}}
                            for i, c in enumerate(choices)],
                "usage": usage}

    def first(self, rid, created, n) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                            for i in range(n)]}

    def chunk(self, rid, created, i, delta, finish, choice, images) -> dict:
        body = {"content": delta}
        if finish is not None:
            body["boxes"] = self.boxes(choice.text, images)
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [{"index": i, "delta": body, "finish_reason": finish}]}

    def usage_chunk(self, rid, created, usage) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                "choices": [], "usage": usage}


class CompletionRender(ChatRender):
    def full(self, rid, created, choices, usage, images) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                            for i, c in enumerate(choices)], "usage": usage}

    def first(self, rid, created, n) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": i, "text": "", "finish_reason": None, "logprobs": None} for i in range(n)]}

    def chunk(self, rid, created, i, delta, finish, choice, images) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": i, "text": delta, "finish_reason": finish, "logprobs": None}]}

    def usage_chunk(self, rid, created, usage) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [], "usage": usage}
