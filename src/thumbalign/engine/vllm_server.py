"""The HTTP side of `thumbalign vllm-serve`: one vLLM engine (:class:`LocalEngine`) answering training processes
anywhere, in an environment of its own.

    GET  /health         {"model": folder, "weights": how many pushes so far}
    POST /generate       {"prompt_ids", "seeds", "temperature", "max_new_tokens", "eos_token_id"}
                         -> {"answers": token ids, "logps": each sampled token's log-prob}
    POST /logps          {"prompt_ids", "answer_ids"} -> {"logps"}
    POST /load_weights   a safetensors body: the policy's whole weights, as its checkpoint names them

Requests are served one engine call at a time (the engine is not thread-safe); each request's answers depend on its
seeds only, so which process asked first changes nothing.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .vllm_engine import LocalEngine, weights_from_bytes

LIMIT = 64 << 30  # largest body accepted (the weights of a ~16B-parameter model in bf16)


def serve(engine: LocalEngine, model_dir: str, host: str, port: int, say=print) -> None:
    lock = threading.Lock()
    pushes = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would drown the server's own lines
            pass

        def reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self.reply(200, {"model": model_dir, "weights": pushes[0]})
            else:
                self.reply(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > LIMIT:
                self.reply(413, {"error": f"body of {length} bytes is larger than {LIMIT}"})
                return
            body = self.rfile.read(length)
            try:
                with lock:
                    self.reply(200, handle(self.path, body))
            except (KeyError, TypeError, ValueError) as err:
                self.reply(400, {"error": f"{type(err).__name__}: {err}"})

    def handle(path: str, body: bytes) -> dict:
        if path == "/load_weights":
            engine.load_weights(weights_from_bytes(body))
            pushes[0] += 1
            return {"weights": pushes[0]}
        request = json.loads(body)
        if path == "/generate":
            answers, logps = engine.generate(request["prompt_ids"], request["seeds"], float(request["temperature"]),
                                             int(request["max_new_tokens"]), request.get("eos_token_id"))
            return {"answers": answers, "logps": logps}
        if path == "/logps":
            return {"logps": engine.logps(request["prompt_ids"], request["answer_ids"])}
        raise KeyError(f"no such endpoint {path}")

    server = ThreadingHTTPServer((host, port), Handler)
    say(f"vLLM serving {model_dir} at http://{host}:{server.server_address[1]}")
    try:
        server.serve_forever()
    finally:
        server.server_close()
