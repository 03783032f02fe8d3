"""A real OpenAI-compatible HTTP server on loopback (FastAPI + uvicorn in a thread) whose answers
a test scripts: ``reply(body) -> (status, text | dict)``. It counts every request it receives."""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shoptune.serve.testing import app_in_thread


def prompt_of(body: dict) -> str:
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body.get("prompt", "")


class ScriptedServer:
    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []  # {"t", "path", "key", "status"}
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()  # clear() holds new chat requests until set() again
        self.held = 0
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._handle(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._handle(request, chat=False)

        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(app_in_thread(app)) + "/v1"

    async def _handle(self, request: Request, chat: bool):
        import asyncio
        body = await request.json()
        key = hashlib.sha256(prompt_of(body).encode()).hexdigest()[:12]
        if chat and not self.gate.is_set():
            with self.lock:
                self.held += 1
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        status, out = self.reply(body)
        with self.lock:
            self.requests.append({"t": time.monotonic(), "path": "chat" if chat else "completions",
                                  "key": key, "status": status, "seed": body.get("seed")})
        if status != 200:
            headers = {"retry-after": str(out.get("retry_after"))} if isinstance(out, dict) and "retry_after" in out else {}
            message = out.get("message", f"scripted {status}") if isinstance(out, dict) else f"scripted {status}"
            return JSONResponse({"error": {"message": message, "type": "scripted",
                                           "param": None, "code": None}}, status_code=status,
                                headers=headers)
        text = out
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if chat:
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}], "usage": usage}
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}],
                "usage": usage}

    def chat_requests(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == "chat"]

    def stop(self) -> None:
        self.gate.set()
        self._stack.close()


__all__ = ["ScriptedServer", "prompt_of"]
