"""A closed-loop load generator for benchmarks: ``clients`` concurrent one-text requests over gRPC.

It runs in its own process with one asyncio loop (``tritonclient.grpc.aio``), so neither the GIL of the
process that starts it nor 32 Python threads compete with the server for the two cores the way a
thread-per-client HTTP load does. Every request's latency and outcome is returned; nothing is dropped.

    from serving.loadgen import LoadProcess
    with LoadProcess(grpc_url, "student", clients=32) as lp:
        ...                      # swap, measure, wait
    lat_s, errors, rps = lp.result()

``LoadGenerator`` is the demo's steady traffic instead: a few HTTP client threads at a set pace whose texts can
change while it runs (a domain shift), every request recorded with its outcome.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time

import numpy as np

from serving.client import ServingClient


async def _run(grpc_url: str, model: str, clients: int, texts: list[str], stop, started) -> tuple[list, list, float]:
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    client = grpcaio.InferenceServerClient(grpc_url)
    lat: list[float] = []
    starts: list[float] = []  # time.monotonic() of each request: comparable across processes on one host
    errs: list[str] = []

    async def one(i: int) -> None:
        k = i
        while not stop.is_set():
            arr = np.array([[texts[k % len(texts)].encode()]], dtype=object)
            inp = InferInput("TEXT", [1, 1], "BYTES")
            inp.set_data_from_numpy(arr)
            t0 = time.perf_counter()
            starts.append(time.monotonic())
            try:
                await client.infer(model, [inp], client_timeout=60)
            except Exception as e:  # counted, never hidden
                errs.append(str(e)[:200])
            lat.append(time.perf_counter() - t0)
            k += 1

    t0 = time.perf_counter()
    started.set()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return lat[:len(starts)], errs, wall, starts[:len(lat)]


def _main(grpc_url, model, clients, texts, stop, started, out) -> None:
    out.put(asyncio.run(_run(grpc_url, model, clients, texts, stop, started)))


class LoadProcess:
    """Start with ``start()`` (or ``with``); ``stop()`` ends the load and ``result()`` returns
    (latencies in s as an array, error strings, requests/s)."""

    def __init__(self, grpc_url: str, model: str, clients: int = 32, texts: list[str] | None = None):
        ctx = mp.get_context("spawn")
        self._stop, self._started, self._out = ctx.Event(), ctx.Event(), ctx.Queue()
        texts = texts or ["this movie was good", "a terrible boring plot", "what a wonderful day", "i hated it"]
        self._proc = ctx.Process(target=_main, args=(grpc_url, model, clients, texts, self._stop, self._started, self._out),
                                 daemon=True)
        self._res = None

    def start(self) -> "LoadProcess":
        self._proc.start()
        if not self._started.wait(60):
            raise RuntimeError("load process did not start within 60 s")
        return self

    def stop(self) -> None:
        if self._res is None:
            self._stop.set()
            self._res = self._out.get(timeout=120)
            self._proc.join(30)

    def result(self) -> tuple[np.ndarray, list[str], float]:
        self.stop()
        lat, errs, wall, _ = self._res
        return np.array(lat), errs, (len(lat) / wall if wall else 0.0)

    def timeline(self) -> tuple[np.ndarray, np.ndarray]:
        """(start times in ``time.monotonic()`` seconds, latencies in s) of every request."""
        self.stop()
        lat, _, _, starts = self._res
        return np.array(starts), np.array(lat)

    def __enter__(self) -> "LoadProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LoadGenerator:
    """Client threads calling Triton with texts of the current domain; every request is recorded."""

    def __init__(self, url: str, model: str, threads: int = 8, rate_limit_s: float = 0.0):
        self.url, self.model, self.threads, self.pause = url, model, threads, rate_limit_s
        self.pool: list[str] = []
        self.samples: list[tuple[float, float, bool]] = []
        self.stop_event = threading.Event()
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.workers: list[threading.Thread] = []

    def set_pool(self, texts: list[str]) -> None:
        self.pool = list(texts)

    def _run(self, seed: int) -> None:
        client, rng = ServingClient(self.url, timeout_s=30), np.random.default_rng(seed)
        while not self.stop_event.is_set():
            pool = self.pool
            if not pool:
                time.sleep(0.1)
                continue
            text = pool[int(rng.integers(len(pool)))]
            t = time.time()
            try:
                client.predict(self.model, [text])
                ok = True
            except Exception:  # counted, not raised: a failed request is what a run measures
                ok = False
            with self.lock:
                self.samples.append((t - self.t0, (time.time() - t) * 1000, ok))
            if self.pause:
                time.sleep(self.pause)

    def start(self) -> "LoadGenerator":
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        for w in self.workers:
            w.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for w in self.workers:
            w.join(35)

    def failed_between(self, a: float, b: float) -> tuple[int, int]:
        with self.lock:
            rows = [s for s in self.samples if a - self.t0 <= s[0] <= b - self.t0]
        return sum(1 for s in rows if not s[2]), len(rows)
