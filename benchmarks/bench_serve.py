"""Load test of ``rewardkit serve``'s /v1/score on loopback. Prints JSON, saves it.

The server runs as the command runs (``python -m rewardkit.cli serve --endpoints score``,
the embedded Social Reward scorer), on 127.0.0.1 only. ``--clients`` threads, each with its
own HTTP connection, send ``--requests`` requests in all (one AdWorld render each, base64
PNG, a prompt each), as fast as their answers come back; a run stops early at
``--time-limit`` seconds (the JSON says how many were not sent). Two server settings are
measured in the same run, alternating over ``--rounds`` rounds so that a co-tenant's load
falls on both alike:

* ``dynamic``: LitServe's dynamic batching, up to ``--batch-size`` requests per forward
  within ``--batch-timeout`` seconds;
* ``batch_1``: the same server with ``--batch-size 1`` (one request per forward).

Reported per setting: throughput (requests/s, over all rounds), p50/p99 latency (s), the
failed requests (non-200 or transport errors: must be 0), and every round's figures; and the
throughput gain of dynamic batching over batch size 1. The clients run on the same machine
as the server, so they share its cores.

    python benchmarks/bench_serve.py [--clients 16] [--requests 400] [--rounds 2]
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from rewardkit.io import to_strict_json, write_json_atomic
from rewardkit.world.export import render_world

RESULTS = Path(__file__).parent / "results" / "serve_load.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(batch_size: int, args, work: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [
        sys.executable, "-m", "rewardkit.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), "--endpoints", "score", "--device", "cpu",
        "--batch-size", str(batch_size), "--batch-timeout", str(args.batch_timeout),
        "--db", f"sqlite:///{work / 'labels.db'}", "--outputs", str(work / "outputs"),
        "--log-level", "error", "--max-images", "64",
    ]  # fmt: skip
    log = open(work / f"server-{batch_size}.log", "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(process)
    raise RuntimeError("server not ready in 300 s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:  # anything the server left behind, in its own process group only
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(url: str, bodies: list[dict], clients: int, total: int, limit: float) -> dict:
    """``clients`` threads send ``total`` requests (cycling over ``bodies``)."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next_index[0]
                    if i >= total:
                        return
                    next_index[0] += 1
                start = time.perf_counter()
                try:
                    r = http.post("/v1/score", json=bodies[i % len(bodies)])
                    ok = r.status_code == 200 and len(r.json()["scores"]) == 1
                    why = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as err:
                    ok, why = False, f"{type(err).__name__}: {err}"
                took = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(took)
                    else:
                        failures.append(why)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return {
        "requests": total, "completed": len(latencies), "failed": len(failures),
        "not_sent": total - next_index[0], "seconds": round(seconds, 3),
        "throughput_rps": round(len(latencies) / seconds, 2) if seconds else 0.0,
        "latencies": latencies, "failures": failures[:5],
    }  # fmt: skip


def summarise(rounds: list[dict]) -> dict:
    lat = np.array([x for r in rounds for x in r["latencies"]])
    completed = sum(r["completed"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    return {
        "throughput_rps": round(completed / seconds, 2) if seconds else 0.0,
        "p50_latency_s": round(float(np.percentile(lat, 50)), 4) if len(lat) else None,
        "p99_latency_s": round(float(np.percentile(lat, 99)), 4) if len(lat) else None,
        "completed": completed,
        "failed": sum(r["failed"] for r in rounds),
        "not_sent": sum(r["not_sent"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k != "latencies"} for r in rounds],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=400, help="per setting and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="dynamic batching's limit")
    p.add_argument("--batch-timeout", type=float, default=0.01)
    p.add_argument("--time-limit", type=float, default=180, help="seconds per round")
    p.add_argument("--images", type=int, default=32, help="distinct renders sent")
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. the load)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = render_world(work / "world", args.images, seed=11, size=64, progress=False)
        rows = pq.read_table(work / "world" / "manifest.parquet").to_pylist()
        bodies = [{"images": [base64.b64encode((work / "world" / r["path"]).read_bytes())
                              .decode()], "prompts": [r["prompt"]]} for r in rows]  # fmt: skip
        assert table.num_rows == len(bodies)
        settings = {"dynamic": args.batch_size, "batch_1": 1}
        rounds: dict[str, list[dict]] = {name: [] for name in settings}
        for _ in range(args.rounds):
            for name, batch in settings.items():
                process, url = start_server(batch, args, work)
                try:
                    load(url, bodies, args.clients, min(args.clients, 32), 60)  # warm-up
                    rounds[name].append(
                        load(url, bodies, args.clients, args.requests, args.time_limit)
                    )
                finally:
                    stop_server(process)
    load_after = os.getloadavg()
    results = {name: summarise(r) for name, r in rounds.items()}
    gain = results["dynamic"]["throughput_rps"] / max(results["batch_1"]["throughput_rps"], 1e-9)
    cpus = os.cpu_count() or 1
    shared = max(load_before[0], load_after[0]) > 0.5 * cpus
    report = {
        "benchmark": "rewardkit serve /v1/score load test (loopback)",
        "endpoint": "/v1/score, embedded social-reward scorer, one 64 px PNG per request",
        "clients": args.clients,
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "batch_timeout_s": args.batch_timeout,
        "dynamic": results["dynamic"],
        "batch_1": results["batch_1"],
        "dynamic_batching_gain": round(gain, 3),
        "failed_requests": results["dynamic"]["failed"] + results["batch_1"]["failed"],
        "machine": {
            "cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "shared": shared,
            "note": args.note
            or (
                "the machine was shared with other jobs during the run (load average above "
                "half the cores); clients and server also share its cores"
                if shared
                else "clients and server share the machine's cores"
            ),
        },  # fmt: skip
    }
    write_json_atomic(args.out, report)
    print(to_strict_json(report, indent=2))


if __name__ == "__main__":
    main()
