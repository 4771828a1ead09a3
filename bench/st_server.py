"""What a user might run instead of the proxy's /v1/embeddings: sentence-transformers (bench/runners.py) behind
the standard library's HTTP server, one model call per request, calls taking turns (torch already spreads one call
over every core). Prints "ready" once the model is loaded.

    bench/.venv/bin/python -m bench.st_server --port 8099"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.runners import st_embedder


def serve(port: int) -> None:
    encode = st_embedder()
    turn = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's listener

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
            with turn:
                vectors = encode(texts)
            answer = json.dumps({"object": "list", "model": body["model"], "data": [
                {"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)
            ]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.st_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    serve(parser.parse_args().port)
