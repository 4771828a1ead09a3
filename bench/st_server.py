"""The standalone alternative to the proxy's /v1/embeddings a user might run: sentence-transformers on
torch CPU behind a minimal HTTP server (the standard library's), answering POST /v1/embeddings in
OpenAI's shape. The same e5 weights as the built-in model, dequantised to float32 (bench/ours.py).

    bench/.venv/bin/python -m bench.st_server --port 8099

One model call per request; calls take turns (a lock), as torch already spreads one call over every
core and two at once would only fight over them. Prints "ready" once the model is loaded."""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(port: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from bench import ours

    torch.set_num_threads(os.cpu_count() or 1)
    model = SentenceTransformer(str(ours.hf_e5_dir()), device="cpu")
    turn = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the proxy's listener

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
            with turn, torch.inference_mode():
                vectors = model.encode(texts, batch_size=len(texts), normalize_embeddings=True,
                                       convert_to_numpy=True)
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
