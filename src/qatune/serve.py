"""`qatune serve`: the fine-tuned model behind an OpenAI-compatible HTTP API.

    qatune serve                               # models/merged on http://127.0.0.1:8000/v1 (params.yaml `serve`)
    qatune serve --mode gguf                   # the export stage's GGUF in llama.cpp, as Ollama would run it
    QATUNE_API_KEY=secret qatune serve --host 0.0.0.0

Endpoints: GET /v1/models and POST /v1/chat/completions, whole or streamed as server-sent events
("stream": true). Both modes answer through qatune.inference, as `qatune ask` and the chat app do: the
model's own chat template, `train.system_prompt` first unless the request brings a system message,
`generate`'s sampling defaults (a request may lower max_tokens, never raise it past generate.max_new_tokens)
and every end-of-turn stop token (qatune.generation.stop_tokens).

One model in memory answers `serve.concurrency_limit` requests at once; `serve.max_queue` more wait and
the rest get 503 at once (a bounded queue, not an unbounded backlog). Bodies over `serve.max_body_bytes` get
413; prompts over `serve.max_prompt_chars` or the model's context window get 400 with the limit named.
With the environment variable `serve.api_key_env` set, every request needs `Authorization: Bearer <key>`
(401 otherwise); without it the server is meant for this machine only, and says so when bound elsewhere.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qatune import inference, prompts
from qatune.errors import QatuneError
from qatune.params import GenerateParams, ServeParams
from qatune.templates import conversation

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------------- the request (OpenAI's shape)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat request that a local QA model uses; other fields (tools, seed, user,
    ...) are accepted and ignored, as most OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="one answer per request")


class RequestError(Exception):
    """An HTTP error with OpenAI's error body: {"error": {"message", "type", "code"}}."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code

    def response_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.response_body(), status_code=self.status)


def check_size(size: int, limits: ServeParams) -> None:
    if size > limits.max_body_bytes:
        raise RequestError(
            413,
            f"the request body is {size:,} bytes; the limit is {limits.max_body_bytes:,} (serve.max_body_bytes)",
            code="request_too_large",
        )


def parse_request(body: bytes, limits: ServeParams) -> ChatRequest:
    """The request body as a ChatRequest; too large -> 413, not JSON or not a chat request -> 400."""
    check_size(len(body), limits)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the request body is not JSON ({err})") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise RequestError(400, f"not a chat completion request: {problems}") from None


def chat_messages(request: ChatRequest, system_prompt: str | None, max_chars: int) -> list[dict]:
    """The messages the model sees: the request's, with the training system prompt first unless the request
    brings its own (qatune.templates.conversation, as in training); over `max_chars` in all -> 400."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    if messages[-1]["role"] != "user":
        raise RequestError(400, "the last message must be the user's question")
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise RequestError(
            400,
            f"the prompt is {chars:,} characters; the limit is {max_chars:,} (serve.max_prompt_chars). "
            "Please shorten it.",
            code="context_length_exceeded",
        )
    return conversation({"prompt": messages}, system_prompt)


def request_settings(request: ChatRequest, base: GenerateParams) -> GenerateParams:
    """`generate` with the request's sampling; max_tokens may lower generate.max_new_tokens, not raise it."""
    asked = request.max_completion_tokens or request.max_tokens
    try:
        return inference.generation_settings(
            base,
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=min(asked, base.max_new_tokens) if asked else None,
        )
    except QatuneError as err:
        raise RequestError(400, str(err)) from None


# --------------------------------------------------------------------------- prompt tokens, both backends


def prompt_ids(loaded: inference.Loaded, messages: list[dict]) -> list[int]:
    """The token ids `qatune serve` feeds the model for these messages (generation prompt added): the
    tokenizer's chat template for transformers, the GGUF's own template as llama-cpp-python renders and
    tokenizes it for llama.cpp (qatune.prompts, which the export stage checks to be the same ids)."""
    if loaded.backend == "llama.cpp":
        ids = prompts.gguf_ids(loaded.model, messages)
        if ids is None:  # no template in the file: llama-cpp-python's default format, about this long
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return loaded.model.tokenize(text.encode(), add_bos=True)
        return ids
    return prompts.template_ids(loaded.tokenizer, messages, loaded.template_kwargs)


def count_tokens(loaded: inference.Loaded, text: str) -> int:
    if loaded.backend == "llama.cpp":
        return len(loaded.model.tokenize(text.encode(), add_bos=False)) if text else 0
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def context_window(loaded: inference.Loaded) -> int | None:
    if loaded.backend == "llama.cpp":
        return loaded.model.n_ctx()
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def check_prompt_tokens(loaded: inference.Loaded, messages: list[dict]) -> int:
    """Prompt length in tokens; one that leaves no room for an answer in the context window -> 400."""
    tokens = len(prompt_ids(loaded, messages))
    window = context_window(loaded)
    if window is not None and tokens >= window:
        raise RequestError(
            400,
            f"the prompt is {tokens:,} tokens; the model's context window is {window:,}. Please shorten it.",
            code="context_length_exceeded",
        )
    return tokens


# --------------------------------------------------------------------------- the bounded queue


class Gate:
    """At most `running` generations at once and `waiting` more in line; the next one is turned away."""

    def __init__(self, running: int, waiting: int):
        self.running = asyncio.Semaphore(running)
        self.capacity = running + waiting
        self.inside = 0

    def enter(self) -> None:
        if self.inside >= self.capacity:
            raise RequestError(
                503,
                f"the server is busy ({self.inside} requests running or queued, serve.max_queue); retry later",
                kind="server_busy",
                code="queue_full",
            )
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


async def pieces_of(answer: Iterator[str]) -> AsyncIterator[str]:
    """The pieces of a blocking answer generator, each fetched in a worker thread; closing this closes it
    (qatune.inference.stream_answer then stops generating at the next token)."""
    done = object()
    try:
        while (piece := await anyio.to_thread.run_sync(next, answer, done)) is not done:
            yield piece
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(answer.close)


# --------------------------------------------------------------------------- the app


def create_app(
    loaded: inference.Loaded,
    limits: ServeParams,
    settings: GenerateParams,
    system_prompt: str | None,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `loaded`: `limits` are params `serve`, `settings` the sampling defaults
    (params `generate` + flags), `system_prompt` train.system_prompt."""
    # llama.cpp's context is not thread-safe: one generation at a time whatever the params say
    running = 1 if loaded.backend == "llama.cpp" else limits.concurrency_limit
    gate = Gate(running, limits.max_queue)
    app = FastAPI(title="qatune", docs_url=None, redoc_url=None)
    app.state.gate = gate
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return err.response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise RequestError(
                401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key"
            )

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        card = {"id": limits.model_name, "object": "model", "created": created, "owned_by": "qatune"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            check_size(int(declared), limits)  # 413 before reading the body
        chat = parse_request(await request.body(), limits)
        messages = chat_messages(chat, system_prompt, limits.max_prompt_chars)
        chosen = request_settings(chat, settings)
        gate.enter()
        reply = Reply(loaded, chat, chosen, limits.model_name)
        if not chat.stream:
            try:
                async with gate.running:
                    return JSONResponse(await reply.whole(messages))
            finally:
                gate.leave()
        try:
            reply.prompt_tokens = check_prompt_tokens(loaded, messages)  # 400 before the stream starts
        except RequestError:
            gate.leave()
            raise

        async def events() -> AsyncIterator[str]:
            try:
                async with gate.running:
                    async for chunk in reply.chunks(messages):
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                gate.leave()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    return app


class Reply:
    """One answer in OpenAI's chat.completion (whole) or chat.completion.chunk (streamed) objects."""

    def __init__(self, loaded: inference.Loaded, chat: ChatRequest, settings: GenerateParams, model: str):
        self.loaded, self.chat, self.settings, self.model = loaded, chat, settings, model
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompt_tokens = 0

    def usage(self, answer: str) -> dict:
        completion = count_tokens(self.loaded, answer)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def finish_reason(self, usage: dict) -> str:
        # re-tokenized text can differ from the generated ids by a token; "length" means the budget was spent
        return "length" if usage["completion_tokens"] >= self.settings.max_new_tokens else "stop"

    async def whole(self, messages: list[dict]) -> dict:
        self.prompt_tokens = check_prompt_tokens(self.loaded, messages)
        try:
            answer = "".join([p async for p in self.pieces(messages)]).strip()
        except QatuneError as err:  # not enough free memory for even one new token
            raise RequestError(400, str(err)) from None
        usage = self.usage(answer)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": self.finish_reason(usage),
            "logprobs": None,
        }
        return {**self.head("chat.completion"), "choices": [choice], "usage": usage}

    async def chunks(self, messages: list[dict]) -> AsyncIterator[dict]:
        yield self.chunk({"role": "assistant", "content": ""})
        parts = []
        try:
            async for piece in self.pieces(messages):
                parts.append(piece)
                yield self.chunk({"content": piece})
        except QatuneError as err:  # after the headers: an error event, which OpenAI's clients raise
            yield RequestError(400, str(err)).response_body()
            return
        usage = self.usage("".join(parts).strip())
        yield self.chunk({}, self.finish_reason(usage))
        if self.chat.stream_options and self.chat.stream_options.include_usage:
            yield {**self.head("chat.completion.chunk"), "choices": [], "usage": usage}

    def pieces(self, messages: list[dict]) -> AsyncIterator[str]:
        return pieces_of(inference.stream_answer(self.loaded, messages, self.settings))

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("chat.completion.chunk"), "choices": [choice]}


def exposure_warning(host: str, api_key: str | None, key_env: str) -> str | None:
    """The warning for a server without a key reachable from other machines; None when there is none."""
    if api_key is None and host not in LOCAL_HOSTS:
        return (
            f"warning: serving on {host} without an API key: anyone who can reach this machine can use "
            f"the model; set {key_env} to require one"
        )
    return None


def run(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
