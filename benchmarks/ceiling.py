"""The serving ceiling: what camserve serves when the model costs nothing.

On a GPU the engine explains thousands of images per second; then decoding, resizing, shaping
heatmaps, encoding overlays, protobuf and per-request Python decide throughput. This benchmark
measures exactly that part: a `camserve.server` subprocess serves `tiny_model.tiny_cnn` (about
1 MFLOP per image, through the `factory:` source), and a separate client process drives it with
`--concurrency` calls in flight, for each

* input: `cat` (the 451x300 JPEG of examples/), `large` (the same photo as a 4000x3000 JPEG),
  `uint8` (the cat as a uint8 HxWx3 tensor), `float32` (a normalised 3x224x224 tensor);
* output: `default` (float32 heatmap at the original size), `uint8` (uint8 at the model input
  size), `overlay` (the default heatmap plus an overlay PNG);
* transport: `unary` (Explain calls), `stream` (one ExplainStream with that many requests in
  flight) and `http` (POST /v1/models/tiny:explain with the ExplainRequest in protobuf's JSON
  mapping, the image base64-encoded, answered as JSON with base64 tensors).

Each case reports images/s and the server's CPU milliseconds per image: the server process's
CPU time (all threads, from /proc) over the images answered in the measured window, and that
time split by stage from the server's `camserve_stage_cpu_seconds_total` counter (CPU time of
the threads doing each stage: decode, preprocess, compute, shape, overlay, respond); `other` is
the rest: gRPC, the event loop and the servicer's Python. The client sends pre-serialised
requests and does not parse the answers (it checks a sample), so it takes as little of the
machine as it can. `--processes N` serves from N server processes, the client spreading its
calls over them as a load balancer would (CPU per image then sums the processes). `--bare` adds
a reference row per case: a plain grpc.aio server that answers
every call with the same response bytes, the floor of any Python gRPC service on this machine.

Usage: `python benchmarks/ceiling.py [--duration 5] [--json]` (also `benchmarks/serving.py
--ceiling`). Everything listens on 127.0.0.1; every server process is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CAT = ROOT / "examples" / "chelsea.jpg"
LARGE_SIZE = (4000, 3000)  # width, height
CROP = 224
INPUTS = ("cat", "large", "uint8", "float32")
OUTPUTS = ("default", "uint8", "overlay")
TRANSPORTS = ("unary", "stream", "http")
EXPLAIN = "/camserve.v1.ExplainService/Explain"
EXPLAIN_STREAM = "/camserve.v1.ExplainService/ExplainStream"
CALL_TIMEOUT_S = 300.0
CLIENT_TIMEOUT_S = 900.0
MAX_MESSAGE = 256 * 1024 * 1024
STAGE_METRIC = "camserve_stage_cpu_seconds_total"
BATCH_SUM, BATCH_COUNT = "camserve_batch_size_sum", "camserve_batch_size_count"
BATCH_KEYS = (BATCH_SUM, BATCH_COUNT)
CEILING_KEYS = (
    "input",
    "output",
    "transport",
    "frontends",
    "ips",
    "server_cpu_ms_per_image",
    "engine_cpu_ms_per_image",
    "frontends_cpu_ms_per_image",
    "mean_batch",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ requests


def input_images(workdir: Path) -> dict[str, Any]:
    """Each input kind as what the client SDK sends: encoded bytes or an array."""
    import numpy as np
    from PIL import Image

    from camserve.server.settings import IMAGENET_MEAN, IMAGENET_STD

    cat = Image.open(CAT).convert("RGB")
    large = workdir / "large.jpg"
    if not large.exists():
        cat.resize(LARGE_SIZE, Image.Resampling.BICUBIC).save(large, quality=90)
    square = np.asarray(cat.resize((CROP, CROP), Image.Resampling.BILINEAR), dtype=np.float32)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    normalised = ((square / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32)
    return {
        "cat": CAT.read_bytes(),
        "large": large.read_bytes(),
        "uint8": np.asarray(cat),
        "float32": np.ascontiguousarray(normalised),
    }


def json_body(request: bytes) -> bytes:
    """The same ExplainRequest in protobuf's JSON mapping: what an HTTP/JSON caller posts."""
    from google.protobuf import json_format

    from camserve.v1 import explain_pb2 as pb

    message = pb.ExplainRequest.FromString(request)
    return json_format.MessageToJson(
        message, indent=None, preserving_proto_field_name=True
    ).encode()


def request_bytes(image: Any, output: str, per_request: int = 1) -> bytes:
    """One serialised ExplainRequest: the image `per_request` times, Grad-CAM at the default
    layer, `output`."""
    from camserve.client.requests import ExplainOptions, build_request

    if output == "uint8":
        options = ExplainOptions(resolution="input", dtype="uint8")
    else:
        options = ExplainOptions(overlay=output == "overlay")
    return build_request([image] * per_request, options).SerializeToString()  # type: ignore[no-any-return]


# -------------------------------------------------------------------------------------- server


def server_config(preprocess_threads: int, max_batch_size: int, frontends: int = 0) -> str:
    return "\n".join(
        [
            "[server]",
            'host = "127.0.0.1"',
            f"frontends = {frontends}",
            'log_level = "warning"',
            "grace_period_s = 5",
            "max_message_mb = 128",
            "engine_threads = 1",
            *([f"preprocess_threads = {preprocess_threads}"] if preprocess_threads else []),
            "",
            "[[models]]",
            'name = "tiny"',
            'source = "factory:tiny_model:tiny_cnn"',
            'labels = ""',
            f"crop = {CROP}",
            f"max_batch_size = {max_batch_size}",
            "max_delay_ms = 2",
            "max_queue = 1024",
            "",
        ]
    )


def start_camserve(
    workdir: Path, args: argparse.Namespace, source: Path | None = None
) -> tuple[Any, dict[str, Any]]:
    """A camserve server for the tiny model; `source` is another checkout whose server code
    runs instead of the installed one (its `server/` and `protos/` first on PYTHONPATH)."""
    from serving import start_server

    config = workdir / "ceiling.toml"
    # A baseline checkout may predate the multi-process layout: it runs in one process.
    frontends = args.frontends if source is None else 0
    config.write_text(server_config(args.preprocess_threads, args.batch, frontends))
    paths = [str(HERE)]
    if source is not None:
        paths += [str(source / "server"), str(source / "protos")]
    inherited = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*paths, inherited]))}
    # Another checkout may predate the HTTP port; only this one's server is measured over HTTP.
    return start_server(config, workdir, env=env, http=source is None)


def bare_server_main(response_path: str, ready_path: str) -> int:
    """A grpc.aio server answering every Explain and ExplainStream call with fixed bytes."""
    import grpc

    response = Path(response_path).read_bytes()

    async def unary(request: bytes, context: Any) -> bytes:
        return response

    async def stream(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield response

    async def serve() -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ]
        )
        handlers = {
            "Explain": grpc.unary_unary_rpc_method_handler(unary),
            "ExplainStream": grpc.stream_stream_rpc_method_handler(stream),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("camserve.v1.ExplainService", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready = {"port": port, "pid": os.getpid(), "metrics_port": 0}
        await asyncio.to_thread(Path(ready_path).write_text, json.dumps(ready))
        await server.wait_for_termination()

    asyncio.run(serve())
    return 0


def start_bare(workdir: Path, response: bytes) -> tuple[Any, dict[str, Any]]:
    path = workdir / "response.bin"
    path.write_bytes(response)
    ready = workdir / "bare-ready.json"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", str(path), str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the bare gRPC server did not start")
        time.sleep(0.05)
    return process, json.loads(ready.read_text())


# -------------------------------------------------------------------------------------- client


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stage_cpu_s(metrics_port: int) -> dict[str, float]:
    """The server's CPU seconds per stage so far (empty for a server without the counter), and
    its engine batches' image and batch counts under BATCH_SUM and BATCH_COUNT."""
    if not metrics_port:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - fixed local URL
        text = response.read().decode()
    stages: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == STAGE_METRIC:
                stage = sample.labels["stage"]
                stages[stage] = stages.get(stage, 0.0) + sample.value
            elif sample.name in (BATCH_SUM, BATCH_COUNT):
                stages[sample.name] = stages.get(sample.name, 0.0) + sample.value
    return stages


def check_answer(data: bytes) -> None:
    """Refuses to count a run whose answers are errors or lack a heatmap."""
    from google.protobuf import json_format

    from camserve.v1 import explain_pb2 as pb

    if data.startswith(b"{"):  # an HTTP/JSON answer
        response = json_format.Parse(data, pb.ExplainResponse())
    else:
        response = pb.ExplainResponse.FromString(data)
    if response.HasField("error"):
        raise RuntimeError(f"the server answered an error: {response.error.message}")
    if not response.results or not response.results[0].heatmaps:
        raise RuntimeError("the server answered without a heatmap")


class Window:
    """Counts answers and takes the server's CPU readings at the start and end of the window:
    every process of the server summed, and the engine processes on their own."""

    def __init__(
        self,
        pids: list[int],
        engine_pids: list[int],
        metrics_ports: list[int],
        frontend_pids: list[int] | None = None,
    ) -> None:
        self.pids, self.engine_pids, self.metrics_ports = pids, engine_pids, metrics_ports
        self.frontend_pids = frontend_pids or []
        self.answered = 0
        self.checked = 0
        self.stop = False

    def answer(self, data: bytes) -> None:
        self.answered += 1
        if self.checked < 3 or self.answered % 97 == 0:
            check_answer(data)
            self.checked += 1

    def reading(self) -> tuple[float, int, float, dict[str, float], float, float]:
        return (
            time.perf_counter(),
            self.answered,
            sum(process_cpu_s(pid) for pid in self.pids),
            _summed([stage_cpu_s(port) for port in self.metrics_ports]),
            sum(process_cpu_s(pid) for pid in self.engine_pids),
            sum(process_cpu_s(pid) for pid in self.frontend_pids),
        )


def _summed(readings: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for reading in readings:
        for name, value in reading.items():
            total[name] = total.get(name, 0.0) + value
    return total


async def _http(urls: list[str], body: bytes, concurrency: int, window: Window) -> None:
    """`concurrency` HTTP callers, each posting the JSON body again as soon as it is answered."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def caller(url: str) -> None:
            while not window.stop:
                async with session.post(url, data=body, headers=headers) as reply:
                    data = await reply.read()
                    if reply.status != 200:
                        raise RuntimeError(f"HTTP {reply.status}: {data[:500]!r}")
                window.answer(data)

        await asyncio.gather(*(caller(urls[i % len(urls)]) for i in range(concurrency)))


async def drive(
    addresses: list[str],
    http_urls: list[str],
    body: bytes,
    transport: str,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    window: Window,
    connections: int = 1,
    per_request: int = 1,
) -> dict[str, Any]:
    import grpc

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        # Distinct connections, so the kernel spreads them over a server's frontends.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [
        grpc.aio.insecure_channel(address, options=[*options, ("camserve.connection", index)])
        for address in addresses
        for index in range(connections)
    ]
    try:
        if transport == "http":
            tasks = [asyncio.create_task(_http(http_urls, body, concurrency, window))]
        elif transport == "unary":

            async def caller(channel: Any) -> None:
                call = channel.unary_unary(EXPLAIN)
                while not window.stop:
                    window.answer(await call(body, timeout=CALL_TIMEOUT_S))

            tasks = [
                asyncio.create_task(caller(channels[i % len(channels)])) for i in range(concurrency)
            ]
        else:  # one stream per server, the calls in flight shared between them
            share = max(1, concurrency // len(channels))
            tasks = [asyncio.create_task(_stream(c, body, share, window)) for c in channels]
        await asyncio.sleep(warmup_s)
        started = window.reading()
        await asyncio.sleep(duration_s)
        ended = window.reading()
        window.stop = True
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    seconds = ended[0] - started[0]
    images = (ended[1] - started[1]) * per_request
    cpu_ms = 1000 * (ended[2] - started[2])
    engine_ms = 1000 * (ended[4] - started[4])
    frontends_ms = 1000 * (ended[5] - started[5])
    batch_counts = [ended[3].pop(key, 0.0) - started[3].pop(key, 0.0) for key in BATCH_KEYS]
    stages = {name: 1000 * (ended[3][name] - started[3].get(name, 0.0)) for name in ended[3]}
    per_image = {name: round(ms / images, 3) for name, ms in stages.items()} if images else {}
    if images and stages:
        per_image["other"] = round((cpu_ms - sum(stages.values())) / images, 3)
    return {
        "ips": round(images / seconds, 2),
        "server_cpu_ms_per_image": round(cpu_ms / images, 3) if images else None,
        "server_cores": round(cpu_ms / 1000 / seconds, 2),
        # The engine process alone (None in the one-process layout, which has none).
        "engine_cpu_ms_per_image": (
            round(engine_ms / images, 3) if images and window.engine_pids else None
        ),
        # The frontend processes summed.
        "frontends_cpu_ms_per_image": (
            round(frontends_ms / images, 3) if images and window.frontend_pids else None
        ),
        "stages_ms_per_image": per_image,
        "images": images,
        # Engine batches over the window (the server's batch-size histogram).
        "mean_batch": round(batch_counts[0] / batch_counts[1], 2) if batch_counts[1] else None,
    }


async def _stream(channel: Any, body: bytes, window_size: int, window: Window) -> None:
    """One ExplainStream keeping `window_size` requests in flight until the window stops."""
    call = channel.stream_stream(EXPLAIN_STREAM)(timeout=CLIENT_TIMEOUT_S)
    slots = asyncio.Semaphore(window_size)

    async def write() -> None:
        while not window.stop:
            await slots.acquire()
            await call.write(body)
        await call.done_writing()

    writer = asyncio.create_task(write())
    async for data in call:
        window.answer(data)
        slots.release()
    await writer


def client_main(spec_path: str) -> int:
    """The client process: reads its case, drives the server, prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    body = Path(spec["body"]).read_bytes()
    window = Window(spec["pids"], spec["engine_pids"], spec["metrics_ports"], spec["frontend_pids"])
    result = asyncio.run(
        drive(
            spec["addresses"],
            spec["http_urls"],
            body,
            spec["transport"],
            spec["concurrency"],
            spec["warmup_s"],
            spec["duration_s"],
            window,
            spec["connections"],
            spec["per_request"],
        )
    )
    print(json.dumps(result))
    return 0


def run_client(
    workdir: Path, servers: list[dict[str, Any]], body: bytes, **case: Any
) -> dict[str, Any]:
    """Runs one case in a fresh client process against the servers their ready files describe
    (calls spread evenly over them, as a load balancer would)."""
    body_path = workdir / "request.bin"
    body_path.write_bytes(body)
    spec = {
        "addresses": [f"127.0.0.1:{ready['port']}" for ready in servers],
        "http_urls": [
            f"http://127.0.0.1:{ready.get('http_port')}/v1/models/tiny:explain" for ready in servers
        ],
        # A multi-process server: the supervisor and every child it lists.
        "pids": [pid for ready in servers for pid in _server_pids(ready)],
        "engine_pids": [ready["children"]["engine"] for ready in servers if "children" in ready],
        "frontend_pids": [
            pid
            for ready in servers
            for role, pid in ready.get("children", {}).items()
            if role.startswith("frontend")
        ],
        "metrics_ports": [ready.get("metrics_port", 0) for ready in servers],
        "body": str(body_path),
        **case,
    }
    spec_path = workdir / "client.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, __file__, "--client", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _server_pids(ready: dict[str, Any]) -> list[int]:
    return [ready["pid"], *ready.get("children", {}).values()]


def one_answer(ready: dict[str, Any], body: bytes) -> bytes:
    """The server's answer bytes to `body` (what the bare server then replays)."""
    import grpc

    options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
    with grpc.insecure_channel(f"127.0.0.1:{ready['port']}", options=options) as channel:
        answer: bytes = channel.unary_unary(EXPLAIN)(body, timeout=CALL_TIMEOUT_S)
    return answer


# ----------------------------------------------------------------------------------- reporting


def render(result: dict[str, Any]) -> str:
    stages = sorted({s for row in result["ceiling"] for s in row["stages_ms_per_image"]})
    header = f"{'input':<8} {'output':<8} {'transport':<9} {'images/s':>9} {'CPU ms/img':>10}"
    header += f" {'frontends':>9} {'engine':>7} {'batch':>6}"
    header += "".join(f" {stage:>10}" for stage in stages)
    if any("bare_ips" in row for row in result["ceiling"]):
        header += f" {'bare img/s':>10} {'bare ms':>8}"
    if any("baseline_ips" in row for row in result["ceiling"]):
        header += f" {'base img/s':>10} {'base ms':>8} {'ms ratio':>8}"
    lines = [
        f"camserve serving ceiling: tiny CNN, {result['processes']} server(s) of "
        f"{_layout(result['frontends'])}, {result['connections']} connection(s) per server, "
        f"{result['images_per_request']} image(s) per request, "
        f"{result['concurrency']} calls in flight, {result['duration_s']:g} s per case, "
        f"{result['cores']} cores",
        "CPU ms/img: the server's CPU time per image answered, every process summed; stage "
        "columns split it; frontends: the frontend processes summed; engine: the engine "
        "process alone; batch: the engine's mean batch",
        "",
        header,
    ]
    for row in result["ceiling"]:
        line = (
            f"{row['input']:<8} {row['output']:<8} {row['transport']:<9} {row['ips']:>9.1f} "
            f"{_fmt(row['server_cpu_ms_per_image']):>10}"
            f" {_fmt(row.get('frontends_cpu_ms_per_image')):>9}"
            f" {_fmt(row.get('engine_cpu_ms_per_image')):>7}"
            f" {_fmt(row.get('mean_batch')):>6}"
        )
        line += "".join(f" {_fmt(row['stages_ms_per_image'].get(s)):>10}" for s in stages)
        if "bare_ips" in row:
            line += f" {row['bare_ips']:>10.1f} {_fmt(row['bare_cpu_ms_per_image']):>8}"
        if "baseline_ips" in row:
            before, after = row["baseline_cpu_ms_per_image"], row["server_cpu_ms_per_image"]
            ratio = after / before if before and after else None
            line += f" {row['baseline_ips']:>10.1f} {_fmt(before):>8} {_fmt(ratio):>8}"
        lines.append(line)
    return "\n".join(lines + http_ratios(result["ceiling"]))


def http_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Per input and output: server CPU per image over HTTP/JSON over that of unary gRPC."""
    cpu = {(r["input"], r["output"], r["transport"]): r["server_cpu_ms_per_image"] for r in rows}
    lines = []
    for (image, output, transport), http in cpu.items():
        grpc_cpu = cpu.get((image, output, "unary"))
        if transport == "http" and http and grpc_cpu:
            lines.append(
                f"HTTP/JSON vs gRPC unary, {image} -> {output}: {http / grpc_cpu:.2f}x CPU"
            )
    return ["", *lines] if lines else []


def _layout(frontends: int) -> str:
    return f"{frontends} frontend(s) + 1 engine process" if frontends else "one process"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="camserve's serving ceiling: images/s and server CPU per image when the "
        "model costs nothing"
    )
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS))
    parser.add_argument("--outputs", nargs="+", choices=OUTPUTS, default=list(OUTPUTS))
    parser.add_argument("--transports", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (32)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before measuring")
    parser.add_argument("--batch", type=int, default=32, help="the model's max_batch_size (32)")
    parser.add_argument(
        "--preprocess-threads",
        type=int,
        default=0,
        help="server CPU pool threads (0: the server's default, one per core, at most 4)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the load, each with the whole model (1); CPU per image "
        "sums them",
    )
    parser.add_argument(
        "--frontends",
        type=int,
        default=0,
        help="gRPC frontend processes per server beside its engine process (0: one process)",
    )
    parser.add_argument(
        "--images-per-request",
        type=int,
        default=1,
        help="images in each request (1); images/s and CPU per image count every image",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=0,
        help="client connections per server (0: 4 per frontend, else 1), so that the kernel "
        "spreads them over the frontends",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another camserve checkout (e.g. a git worktree of an older commit): each case is "
        "also measured on its server, just before this one's, and the table shows both",
    )
    parser.add_argument("--bare", action="store_true", help="add a bare grpc.aio reference")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--json-file", type=Path, help="also write the JSON document here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", nargs=2, help=argparse.SUPPRESS)
    return parser


def cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    return [
        (image, output, transport)
        for image in args.inputs
        for output in args.outputs
        for transport in args.transports
    ]


def connections(args: argparse.Namespace) -> int:
    return args.connections or (4 * args.frontends if args.frontends else 1)


def measure_all(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from serving import stop_server

    images = input_images(workdir)
    bodies = {
        (i, o): request_bytes(images[i], o, args.images_per_request)
        for i in args.inputs
        for o in args.outputs
    }
    json_bodies = {key: json_body(body) for key, body in bodies.items()}
    timing = {
        "concurrency": args.concurrency,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "connections": connections(args),
        "per_request": args.images_per_request,
    }
    rows = []
    started = []
    try:
        for index in range(args.processes):
            server_dir = workdir / f"server-{index}"
            server_dir.mkdir(exist_ok=True)
            started.append(start_camserve(server_dir, args))
        servers = [ready for _, ready in started[: args.processes]]
        baseline: list[dict[str, Any]] = []
        if args.baseline is not None:
            baseline_dir = workdir / "baseline"
            baseline_dir.mkdir(exist_ok=True)
            started.append(start_camserve(baseline_dir, args, args.baseline))
            baseline = [started[-1][1]]
        for image, output, transport in cases(args):
            body = (json_bodies if transport == "http" else bodies)[(image, output)]
            log(f"{image} -> {output} over {transport}")
            row: dict[str, Any] = {
                "input": image,
                "output": output,
                "transport": transport,
                "frontends": args.frontends,
            }
            if baseline and transport != "http":  # just before, so both see the same machine
                before = run_client(workdir, baseline, body, transport=transport, **timing)
                row["baseline_ips"] = before["ips"]
                row["baseline_cpu_ms_per_image"] = before["server_cpu_ms_per_image"]
                cpu = _fmt(before["server_cpu_ms_per_image"])
                log(f"  baseline {before['ips']:.1f} images/s, {cpu} ms CPU")
            row.update(run_client(workdir, servers, body, transport=transport, **timing))
            rows.append(row)
            log(f"  {row['ips']:.1f} images/s, {_fmt(row['server_cpu_ms_per_image'])} ms CPU")
        answers = {k: one_answer(servers[0], body) for k, body in bodies.items() if args.bare}
    finally:
        for process, _ in started:
            stop_server(process)
    for row in [r for r in rows if r["transport"] != "http"] if args.bare else []:
        bare_process, bare_ready = start_bare(workdir, answers[(row["input"], row["output"])])
        try:
            body = bodies[(row["input"], row["output"])]
            bare = run_client(workdir, [bare_ready], body, transport=row["transport"], **timing)
        finally:
            bare_process.kill()
            bare_process.wait()
        row["bare_ips"] = bare["ips"]
        row["bare_cpu_ms_per_image"] = bare["server_cpu_ms_per_image"]
    return rows


def main(argv: list[str] | None = None) -> int:
    from serving import usable_cores

    args = build_parser().parse_args(argv)
    if args.client:
        return client_main(args.client)
    if args.bare_server:
        return bare_server_main(*args.bare_server)
    if min(args.concurrency, args.batch, args.processes) < 1 or args.duration <= 0:
        raise SystemExit("--concurrency, --batch and --processes must be >= 1, --duration > 0")
    if args.frontends < 0 or args.connections < 0:
        raise SystemExit("--frontends and --connections must be >= 0")
    with tempfile.TemporaryDirectory(prefix="camserve-ceiling-") as tmp:
        rows = measure_all(args, Path(tmp))
    result = {
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "processes": args.processes,
        "frontends": args.frontends,
        "connections": connections(args),
        "images_per_request": args.images_per_request,
        "cores": usable_cores(),
        "ceiling": rows,
    }
    if args.json_file:
        args.json_file.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
