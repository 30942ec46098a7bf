"""Server CPU per HTTP call of the asyncio HTTP servers considered for the KServe v2 REST door,
side by side in one run: aiohttp's web server, and uvicorn (httptools) under Starlette.

    python -m bench.http_servers [--calls 2000] [--rounds 5]

Each candidate serves the same two handlers in a process of its own on one event loop, as the
door would: a GET answering a small JSON body (a health or metadata call) and a POST echoing a
small JSON body (a one-step infer's size). One client process sends the calls one after another
on one keep-alive connection; the server process's CPU time (user + system) divided by the
calls is the figure. Rounds alternate between candidates; medians are printed. uvicorn and
starlette are not dependencies of rnnserve: `pip install uvicorn[standard] starlette` to count
them too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from bench.cluster import cpu_seconds

BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 1, 1], "datatype": "FP32", "data": [1.0]}]}
).encode()


def _aiohttp(port: int) -> None:
    from aiohttp import web

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def infer(request: web.Request) -> web.Response:
        return web.json_response(json.loads(await request.read()))

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post("/v2/models/echo/infer", infer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _uvicorn(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    async def infer(request: Request) -> JSONResponse:
        return JSONResponse(json.loads(await request.body()))

    app = Starlette(
        routes=[
            Route("/v2/health/ready", ready),
            Route("/v2/models/echo/infer", infer, methods=["POST"]),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


SERVERS = {"aiohttp": _aiohttp, "uvicorn+starlette": _uvicorn}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _available(name: str) -> bool:
    module = "aiohttp" if name == "aiohttp" else "uvicorn"
    try:
        __import__(module)
        if name != "aiohttp":
            __import__("starlette")
    except ImportError:
        return False
    return True


def _calls(port: int, calls: int, post: bool) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(calls):
        if post:
            connection.request(
                "POST", "/v2/models/echo/infer", BODY, {"Content-Type": "application/json"}
            )
        else:
            connection.request("GET", "/v2/health/ready")
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    connection.close()


def _cpu_per_call(pid: int, port: int, calls: int, post: bool) -> float:
    before = cpu_seconds(pid)
    _calls(port, calls, post)
    return (cpu_seconds(pid) - before) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        SERVERS[args.serve[0]](int(args.serve[1]))
        return
    names = [n for n in SERVERS if _available(n)]
    procs, ports = {}, {}
    for name in names:
        ports[name] = _free_port()
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bench.http_servers", "--serve", name, str(ports[name])],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    try:
        for name in names:
            deadline = time.monotonic() + 20
            while True:
                try:
                    _calls(ports[name], 1, post=False)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            _calls(ports[name], 200, post=True)  # warm
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for post in (False, True):
                for name in names:
                    cpu = _cpu_per_call(procs[name].pid, ports[name], args.calls, post)
                    results.setdefault((name, "POST infer" if post else "GET ready"), []).append(
                        cpu
                    )
        base = names[0]
        print(f"server CPU per call, median of {args.rounds} interleaved rounds of {args.calls}")
        for call in ("GET ready", "POST infer"):
            floor = statistics.median(results[(base, call)])
            for name in names:
                median = statistics.median(results[(name, call)])
                print(f"  {call:10s}  {name:18s} {median * 1e6:7.1f} µs  {median / floor:5.2f}x")
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
