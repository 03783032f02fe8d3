"""A fake upstream engine for gateway tests: a real HTTP server on loopback (FastAPI + uvicorn in
a thread) speaking the subset of vLLM's or llama.cpp llama-server's API the gateway uses.

It records every request body (``.requests``) and answers deterministically: a completion is the
word naming the adapter that answered (" base", " alpha", ...) repeated once per token, so a test
sees which adapter the gateway chose; ``script`` overrides the text for prompts that end with a
given token id; ``fail_next`` makes the next completion fail with a status and message. A
constrained request is answered with text that satisfies the constraint it carries (choice:
the biased token with the highest ``choice_scores``; numbers: ``numbers_answer``, which must
match a vLLM regex fully, else a 400 as from an engine that enforces it).

Misbehaviour for the gateway's hardening tests: ``misbehave_next`` = one of :data:`BROKEN`
makes the next completion answer that way; ``models_reply = "list"`` makes ``/v1/models``
answer a JSON list; ``body_sizes`` records the size of each completion request body.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from shoptune.serve.testing import app_in_thread, free_port

BROKEN = {
    "text": "200 with a plain-text body",
    "json-list": "200 with a JSON list",
    "sse-list": "200 event stream whose event is a JSON list",
    "sse-not-json": "200 event stream whose event is not JSON",
    "cut": "200 event stream cut after two tokens (no finish_reason, no [DONE])",
    "abort": "200 event stream ending with finish_reason 'abort'",
    "echo-auth": "400 whose message echoes the Authorization header",
    "echo-auth-500": "500 plain text echoing every request header",
    "echo-auth-stream": "an in-band stream error echoing the Authorization header",
    "huge": "200 body of huge_bytes (streamed lazily)",
    "endless": "200 event stream of tokens that ignores max_tokens (until the client leaves)",
    "usage-bomb": "200 event stream whose usage claims 10**12 completion tokens",
}


class FakeUpstream:
    def __init__(self, kind: str, tok, *, loras=("alpha", "beta"), api_key: str | None = None,
                 token_delay: float = 0.0, port: int | None = None):
        self.kind, self.tok, self.api_key, self.token_delay = kind, tok, api_key, token_delay
        self.requests: list[dict] = []
        self.loras = list(loras)  # vLLM: names; llama.cpp: adapter files <name>.gguf with ids
        self.fail_next: tuple[int, str] | None = None
        self.choice_scores: dict[int, float] = {}  # token id -> score for logit-biased answers
        self.numbers_answer = "2, 1, 3"
        self.script: dict[int, str] = {}
        self.closed_early = 0  # streams the client closed before the end
        self.healthy = True
        self.misbehave_next: str | None = None  # one of BROKEN, for the next completion
        self.models_reply: str | None = None  # "list": /v1/models answers a JSON list
        self.huge_bytes = 50 << 20
        self.body_sizes: list[int] = []
        self.check_regex = True  # answer 400 when numbers_answer does not match a vLLM regex
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = self._build()
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        self._stack.enter_context(app_in_thread(self.app, port=self.port, start_timeout=20))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    # ------------------------------------------------------------------ behaviour
    def _adapter(self, body: dict) -> str:
        if self.kind == "vllm":
            return body["model"] if body["model"] in self.loras else "base"
        active = [x["id"] for x in body.get("lora") or [] if x["scale"]]
        if "lora" not in body:  # llama-server's default: every adapter at its global scale 1
            return "+".join(self.loras) or "base"
        return "+".join(self.loras[i] for i in active) or "base"

    def _text(self, body: dict) -> list[str]:
        """The answer as a list of per-token pieces."""
        prompt = body["prompt"]
        if body.get("logit_bias"):
            ids = [int(t) for t in body["logit_bias"]]
            best = max(ids, key=lambda t: (self.choice_scores.get(t, 0.0), -t))
            return [self.tok.decode([best])]
        if body.get("grammar") or body.get("structured_outputs"):
            parts = re.findall(r"\d+|, ", self.numbers_answer)
            return parts + ["\n", "ignored"]
        if prompt and prompt[-1] in self.script:
            return list(self.script[prompt[-1]])
        return [f" {self._adapter(body)}"] * body["max_tokens"]

    def _check_auth(self, request: Request):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": {"message": "Invalid API Key", "type": "authentication_error",
                                           "code": 401}}, status_code=401)
        return None

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            if not self.healthy:
                return JSONResponse({"error": {"code": 503, "message": "Loading model",
                                               "type": "unavailable_error"}}, status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(request: Request):
            if (bad := self._check_auth(request)) is not None:
                return bad
            if self.models_reply == "list":
                return JSONResponse([{"id": "m"}])
            if self.kind == "llama.cpp":
                return {"object": "list", "data": [{"id": "smollm2.gguf", "object": "model",
                                                    "owned_by": "llamacpp"}]}
            return {"object": "list", "data": [
                {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "object": "model", "owned_by": "vllm",
                 "root": "/models/smollm2", "parent": None}] + [
                {"id": n, "object": "model", "owned_by": "vllm", "root": f"/adapters/{n}",
                 "parent": "HuggingFaceTB/SmolLM2-135M-Instruct"} for n in self.loras]}

        if self.kind == "llama.cpp":
            @app.get("/lora-adapters")
            async def lora_adapters():
                return [{"id": i, "path": f"/models/{n}.gguf", "scale": 1.0}
                        for i, n in enumerate(self.loras)]

        if self.kind == "vllm":
            @app.post("/v1/load_lora_adapter")
            async def load(request: Request):
                body = await request.json()
                self.requests.append({"path": "/v1/load_lora_adapter", **body})
                if body["lora_name"] in self.loras:
                    return JSONResponse({"error": {"message": f"The lora adapter '{body['lora_name']}' "
                                                   "has already been loaded.", "type": "BadRequestError",
                                                   "code": 400}}, status_code=400)
                self.loras.append(body["lora_name"])
                return f"Success: LoRA adapter '{body['lora_name']}' added successfully."

            @app.post("/v1/unload_lora_adapter")
            async def unload(request: Request):
                body = await request.json()
                self.requests.append({"path": "/v1/unload_lora_adapter", **body})
                if body["lora_name"] not in self.loras:
                    return JSONResponse({"error": {"message": "not found", "code": 404}}, status_code=404)
                self.loras.remove(body["lora_name"])
                return f"Success: LoRA adapter '{body['lora_name']}' removed successfully."

        @app.post("/v1/completions")
        async def completions(request: Request):
            if (bad := self._check_auth(request)) is not None:
                return bad
            raw = await request.body()
            self.body_sizes.append(len(raw))
            body = json.loads(raw)
            self.requests.append({"path": "/v1/completions", **body})
            if self.misbehave_next is not None:
                mode, self.misbehave_next = self.misbehave_next, None
                return self._broken(mode, body, request)
            regex = (body.get("structured_outputs") or {}).get("regex")
            if self.check_regex and regex is not None and not re.fullmatch(regex, self.numbers_answer):
                return JSONResponse({"error": {"message": f"answer {self.numbers_answer!r} does not match "
                                               "the regex", "code": 400}}, status_code=400)
            if self.fail_next is not None:
                status, message = self.fail_next
                self.fail_next = None
                return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                               "code": status}}, status_code=status)
            if self.kind == "vllm" and body["model"] not in self.loras and \
                    body["model"] != "HuggingFaceTB/SmolLM2-135M-Instruct":
                return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist.",
                                               "type": "NotFoundError", "code": 404}}, status_code=404)
            pieces = self._text(body)[:body.get("max_tokens", 16)]
            text, reason = "".join(pieces), "length" if len(pieces) >= body.get("max_tokens", 16) else "stop"
            for s in body.get("stop") or []:
                if s in text:
                    text, reason = text[:text.index(s)], "stop"
            if not body.get("stream"):
                return {"id": "cmpl-fake", "object": "text_completion", "model": body["model"],
                        "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
                        "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(pieces),
                                  "total_tokens": len(body["prompt"]) + len(pieces)}}

            async def stream():
                sent = ""
                try:
                    for piece in pieces:
                        if not text.startswith(sent + piece):  # cut by a stop string: the rest of it
                            piece = text[len(sent):]
                            if not piece:
                                break
                        sent += piece
                        if self.token_delay:
                            await asyncio.sleep(self.token_delay)
                        yield "data: " + json.dumps({"choices": [{"index": 0, "text": piece,
                                                                  "finish_reason": None}]}) + "\n\n"
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": "",
                                                              "finish_reason": reason}]}) + "\n\n"
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield "data: " + json.dumps({"choices": [], "usage": {
                            "prompt_tokens": len(body["prompt"]), "completion_tokens": len(pieces),
                            "total_tokens": len(body["prompt"]) + len(pieces)}}) + "\n\n"
                    yield "data: [DONE]\n\n"
                except (asyncio.CancelledError, GeneratorExit):
                    self.closed_early += 1
                    raise
            return StreamingResponse(stream(), media_type="text/event-stream")

        return app

    def _broken(self, mode: str, body: dict, request: Request):
        auth = request.headers.get("authorization", "")
        sse = "text/event-stream"

        def event(obj) -> str:
            return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"

        def token(text, reason=None):
            return event({"choices": [{"index": 0, "text": text, "finish_reason": reason}]})

        async def events(*items):
            for x in items:
                yield x

        if mode == "text":
            return PlainTextResponse("upstream hiccup")
        if mode == "json-list":
            return JSONResponse([1, 2, 3])
        if mode == "sse-list":
            return StreamingResponse(events(event([1, 2]), event("[DONE]")), media_type=sse)
        if mode == "sse-not-json":
            return StreamingResponse(events(event("hello"), event("[DONE]")), media_type=sse)
        if mode == "cut":
            return StreamingResponse(events(token(" half"), token(" way")), media_type=sse)
        if mode == "abort":
            return StreamingResponse(events(token(" half"), token("", "abort"), event("[DONE]")),
                                     media_type=sse)
        if mode == "echo-auth":
            return JSONResponse({"error": {"message": f"bad request; you sent Authorization: {auth}",
                                           "code": 400}}, status_code=400)
        if mode == "echo-auth-500":
            return PlainTextResponse(f"crash; headers: {dict(request.headers)}", status_code=500)
        if mode == "echo-auth-stream":
            return StreamingResponse(events(token(" ok"), event({"error": {"message": f"died; {auth}"}}),
                                            event("[DONE]")), media_type=sse)
        if mode == "huge":
            async def huge():
                yield '{"choices": [{"text": "' if not body.get("stream") else 'data: {"choices": [{"text": "'
                for _ in range(self.huge_bytes >> 16):
                    yield "x" * (1 << 16)
                yield '"}]}'
            return StreamingResponse(huge(), media_type=sse if body.get("stream") else "application/json")
        if mode == "endless":
            async def endless():
                try:
                    while True:
                        yield token(" more")
                        await asyncio.sleep(0)
                except (asyncio.CancelledError, GeneratorExit):
                    self.closed_early += 1
                    raise
            return StreamingResponse(endless(), media_type=sse)
        if mode == "usage-bomb":
            return StreamingResponse(events(token(" one", "stop"), event({"choices": [], "usage": {
                "prompt_tokens": 1, "completion_tokens": 10 ** 12, "total_tokens": 10 ** 12}}),
                event("[DONE]")), media_type=sse)
        raise ValueError(f"unknown misbehaviour {mode!r}: one of {', '.join(BROKEN)}")


def main(argv=None) -> None:
    """A stand-in ``llama-server`` binary (tests of `serve --engine llama.cpp`): takes its flags
    (-m, --lora, --port), checks the files exist, serves FakeUpstream("llama.cpp") until killed.
    Writes its pid to $FAKE_LLAMA_PID_FILE."""
    import argparse
    import os
    from pathlib import Path

    from transformers import AutoTokenizer
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", required=True)
    ap.add_argument("--lora", default="")
    ap.add_argument("--port", type=int, required=True)
    a, _ = ap.parse_known_args(argv)
    files = [a.m] + [x for x in a.lora.split(",") if x]
    for f in files:
        if not Path(f).is_file():
            raise SystemExit(f"error: failed to load {f}")
    if os.environ.get("FAKE_LLAMA_PID_FILE"):
        Path(os.environ["FAKE_LLAMA_PID_FILE"]).write_text(str(os.getpid()))
    tok = AutoTokenizer.from_pretrained(os.environ["FAKE_LLAMA_TOKENIZER"])
    up = FakeUpstream("llama.cpp", tok, loras=[Path(x).name.removesuffix(".gguf") for x in files[1:]],
                      port=a.port)
    uvicorn.run(up.app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
