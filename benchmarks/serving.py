"""Serving benchmark: what the gRPC server with dynamic batching sustains, next to the engine alone.

One run, one model, one machine:

* offline: `CamEngine.explain` (Grad-CAM, layer4) on already-preprocessed tensors at batch B
  (`offline_ips`) and at batch 1 (`offline_b1_ips`), each in a fresh subprocess, median of
  `--repeats` timed runs after a warm-up;
* served: a `camserve.server` subprocess (TOML config, `--ready-file`, metrics on an ephemeral
  port) driven from this process by C closed-loop single-image callers (`camserve-loadtest`'s
  `run_load`, so client and server never share a process or a GIL; `--clients N` splits the
  callers over N client processes, for a GPU server one client process cannot keep busy), once
  with batching (max_batch_size B, max_delay_ms D) and once with max_batch_size 1, for each C.
  Each run warms up, then sends for `--duration` seconds. `mean_batch` is the server's own
  batch-size histogram (sum/count delta over the measured window), so it counts engine batches,
  not requests.

The model is torchvision's resnet18 (or resnet50) with seeded random weights saved as a state dict:
timing does not depend on what the weights are. Images are 224x224 JPEGs and the server uses
`resize = 0, crop = 224`, so preprocessing (decode, normalise) is real but small.

Threads: by default torch gets one intra-op thread fewer than the usable cores (at least 1), both
offline and in the server (`engine_threads`), so the load generator, gRPC and preprocessing keep a
core; on a 2-core machine that is 1 thread, and more threads would only fight the client. The
offline figures are measured alone on the machine, the served ones share it with the client: that
difference is part of what serving costs here.

Usage: `python benchmarks/serving.py [--batch 32] [--concurrency 1 8 32] [--duration 10] [--json]`;
`--ceiling` runs `benchmarks/ceiling.py` instead (what serving costs when the model costs nothing).
Everything listens on 127.0.0.1; every server process is stopped (SIGTERM, then kill).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from camserve.client.loadtest import LoadConfig, run_load, synthetic_images

MODELS = ("resnet18", "resnet50")
LAYER = "layer4"
CROP = 224
READY_TIMEOUT_S = 300.0  # model load and warm-up of a fresh server, on a slow shared machine
STOP_TIMEOUT_S = 15.0  # after SIGTERM; the server's grace period is shorter than this
WORKER_TIMEOUT_S = 900.0
GRACE_S = 5.0
CALL_TIMEOUT_S = 120.0  # per request: generous, a CPU batch of 32 can take seconds
RUN_KEYS = ("concurrency", "batching", "ips", "p50_ms", "p99_ms", "mean_batch")


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """Torch threads that leave one core to the load generator, gRPC and preprocessing."""
    return max(1, usable_cores() - 1)


# --------------------------------------------------------------------------- worker subprocesses


def _model_spec(model: str, weights: str, max_batch_size: int = 1) -> Any:
    """The server's own ModelSettings for the benchmark model, so offline builds it identically."""
    from camserve.server.settings import ModelSettings

    return ModelSettings(
        name=model,
        source=f"torchvision:{model}",
        weights=weights,
        labels="",
        resize=0,
        crop=CROP,
        max_batch_size=max_batch_size,
    )


def _describe_device(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu ({name}, {usable_cores()} cores)"


def worker_weights(model: str, path: str) -> dict[str, Any]:
    """Saves seeded random weights: reproducible, and no download needed."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(model, weights=None)
    torch.save(net.state_dict(), path)
    return {"weights": path}


def worker_offline(
    model: str, weights: str, batch: int, threads: int, repeats: int, min_run_s: float
) -> dict[str, Any]:
    """Images/s of the engine alone on preprocessed tensors: the ceiling the server works toward.

    Built through the server's own loading and preprocessing code, on the device the server would
    pick, so the only difference from serving is everything around the engine.
    """
    import torch

    from camserve.server.engine import CamEngine, RowRequest
    from camserve.server.models.loading import build_model, normalisation
    from camserve.server.preprocess import decode, prepare
    from camserve.server.records import InputRecipe

    torch.set_num_threads(threads)
    spec = _model_spec(model, weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = CamEngine(build_model(spec), device=device)
    mean, std = normalisation(spec)
    recipe = InputRecipe(resize=0, crop=CROP, mean=mean, std=std)
    tensors = [
        prepare(decode(data, "image", 10**8), recipe, keep_original=False).tensor
        for data in synthetic_images(count=16, size=CROP)
    ]
    images = torch.stack([tensors[i % len(tensors)] for i in range(batch)])
    rows = [RowRequest(layer=LAYER)] * batch
    for _ in range(2):  # the first calls probe the model and build kernels for this shape
        engine.explain_batch(images, rows)
    rates = []
    for _ in range(repeats):
        calls = 0
        started = time.perf_counter()
        while calls == 0 or time.perf_counter() - started < min_run_s:
            engine.explain_batch(images, rows)
            calls += 1
        rates.append(calls * batch / (time.perf_counter() - started))
    return {"device": _describe_device(device), "ips": statistics.median(rates), "runs": rates}


def run_worker(args: list[str]) -> dict[str, Any]:
    """Runs this file as a worker in a fresh interpreter and returns the JSON it prints."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------- server runs


def server_config(
    model: str,
    weights: str,
    max_batch_size: int,
    max_delay_ms: float,
    threads: int,
    prep: int,
    frontends: int = 0,
    adaptive: bool = True,
) -> str:
    """The TOML the server subprocess reads; json.dumps quotes strings the way TOML accepts."""
    return "\n".join(
        [
            "[server]",
            'host = "127.0.0.1"',
            'log_level = "warning"',  # one info line per batch is noise here, not load
            f"grace_period_s = {GRACE_S}",
            f"engine_threads = {threads}",
            f"preprocess_threads = {prep}",
            f"frontends = {frontends}",
            "",
            "[[models]]",
            f"name = {json.dumps(model)}",
            f"source = {json.dumps('torchvision:' + model)}",
            f"weights = {json.dumps(weights)}",
            'labels = ""',
            "resize = 0",
            f"crop = {CROP}",
            f"default_layer = {json.dumps(LAYER)}",
            f"max_batch_size = {max_batch_size}",
            f"max_delay_ms = {max_delay_ms}",
            f"adaptive_delay = {json.dumps(adaptive)}",
            "max_queue = 1024",
            "",
        ]
    )


def start_server(
    config: Path, workdir: Path, env: dict[str, str] | None = None, http: bool = True
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Starts `python -m camserve.server` (in `env`, default this process's environment) and
    waits for its ready file (ports, pid); `http=False` for a server without the HTTP port
    (another checkout's, older than it)."""
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camserve.server",
            "--config",
            str(config),
            "--port",
            "0",
            "--metrics-port",
            "0",
            *(["--http-port", "0"] if http else []),
            "--ready-file",
            str(ready),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (workdir / "server.log").read_text(errors="replace")[-4000:]
                raise RuntimeError(f"server exited with {process.returncode}:\n{tail}")
            if ready.exists():
                try:
                    return process, json.loads(ready.read_text())
                except json.JSONDecodeError:
                    pass  # caught mid-write; read again
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s")
    except BaseException:
        stop_server(process)
        raise


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful drain), then kill if it lingers; always reaps the process."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def scrape_batches(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the server's camserve_batch_size histogram, over all models."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - fixed local URL
        text = response.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "camserve_batch_size_sum":
                total += sample.value
            elif sample.name == "camserve_batch_size_count":
                count += sample.value
    return total, count


def load_config(
    address: str, concurrency: int, seconds: float, connections: int, seed: int = 0
) -> LoadConfig:
    """One closed-loop window of single-image calls on the benchmark's synthetic JPEGs."""
    return LoadConfig(
        server=address,
        images=synthetic_images(count=16, size=CROP, seed=seed),
        concurrency=concurrency,
        duration_s=seconds,
        timeout_s=CALL_TIMEOUT_S,
        connections=connections,
        seed=seed,
    )


def worker_load(address: str, concurrency: int, seconds: float, connections: int, seed: int) -> Any:
    """One client process's window: its report, for the parent to add up."""
    return asyncio.run(run_load(load_config(address, concurrency, seconds, connections, seed)))


async def load_window(
    address: str, concurrency: int, seconds: float, connections: int, clients: int
) -> dict[str, Any]:
    """`concurrency` callers for `seconds`: in this process, or split over `clients` processes
    (one Python client tops out near a few thousand calls/s, below what a GPU server answers).
    With several processes, throughput is their sum, p50 the request-weighted mean of theirs and
    p99 the worst of theirs (an upper bound of the merged p99)."""
    if clients <= 1:
        return await run_load(load_config(address, concurrency, seconds, connections))
    shares = [concurrency // clients + (i < concurrency % clients) for i in range(clients)]
    links = max(1, connections // clients)
    reports = await asyncio.gather(
        *(
            asyncio.to_thread(
                run_worker, ["load", "-", address, str(c), str(seconds), str(links), str(i)]
            )
            for i, c in enumerate(shares)
            if c > 0
        )
    )
    done = [r for r in reports if r["latency_ms"]["p50"] is not None]
    successes = [r["throughput_rps"] * r["duration_s"] for r in done]
    errors: dict[str, int] = {}
    for report in reports:
        for name, count in report["errors"].items():
            errors[name] = errors.get(name, 0) + count

    def weighted(value: Callable[[dict[str, Any]], float]) -> float | None:
        """The request-weighted mean of one figure over the processes that answered."""
        if not done:
            return None
        total = sum(value(r) * n for r, n in zip(done, successes, strict=True))
        return total / (sum(successes) or 1.0)

    return {
        "requests": sum(r["requests"] for r in reports),
        "errors": errors,
        "throughput_rps": sum(r["throughput_rps"] for r in reports),
        "latency_ms": {
            "p50": weighted(lambda r: r["latency_ms"]["p50"]),
            "p99": max((r["latency_ms"]["p99"] for r in done), default=None),
        },
        "mean_batch": weighted(lambda r: r["mean_batch"]),
    }


async def measure(
    address: str,
    metrics_port: int,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    connections: int = 1,
    clients: int = 1,
) -> dict[str, Any]:
    """Warm-up, then one closed-loop window; the histogram delta covers that window only."""
    if warmup_s > 0:
        await load_window(address, concurrency, warmup_s, connections, clients)
    before = await asyncio.to_thread(scrape_batches, metrics_port)
    report = await load_window(address, concurrency, duration_s, connections, clients)
    after = await asyncio.to_thread(scrape_batches, metrics_port)
    batches = after[1] - before[1]
    latency = report["latency_ms"]
    return {
        "ips": round(report["throughput_rps"], 2),
        "p50_ms": None if latency["p50"] is None else round(latency["p50"], 1),
        "p99_ms": None if latency["p99"] is None else round(latency["p99"], 1),
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
        "requests": report["requests"],
        "errors": report["errors"],
        "client_mean_batch": report["mean_batch"],  # per request: weighted toward big batches
    }


def serve_case(
    args: argparse.Namespace, weights: str, workdir: Path, concurrency: int, batching: bool
) -> dict[str, Any]:
    """One server subprocess, one concurrency, one batching setting; the server always stops."""
    config = workdir / "server.toml"
    config.write_text(
        server_config(
            args.model,
            weights,
            args.batch if batching else 1,
            args.max_delay_ms,
            args.threads,
            args.preprocess_threads,
            args.frontends,
            not args.fixed_delay,
        )
    )
    process, ready = start_server(config, workdir)
    try:
        result = asyncio.run(
            measure(
                f"127.0.0.1:{ready['port']}",
                int(ready["metrics_port"]),
                concurrency,
                args.warmup,
                args.duration,
                # Several connections, so the kernel spreads them over the frontends.
                max(4 * args.frontends, args.clients),
                args.clients,
            )
        )
    finally:
        stop_server(process)
    return {"concurrency": concurrency, "batching": batching, **result}


# ------------------------------------------------------------------------------------ reporting


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The readable table, derived ratios and the three targets, met or missed."""
    batch, delay = args.batch, args.max_delay_ms
    layout = f"{args.frontends} frontends + engine" if args.frontends else "one process"
    offline, offline_b1 = result["offline_ips"], result["offline_b1_ips"]
    lines = [
        f"model {result['model']} (Grad-CAM, {LAYER}, {CROP}x{CROP} JPEG)",
        f"device {result['device']}",
        f"torch threads {args.threads}, preprocess threads {args.preprocess_threads}, "
        f"B={batch}, max_delay_ms={delay:g} ({'fixed' if args.fixed_delay else 'adaptive'}), "
        f"{layout}, {args.clients} client process(es), "
        f"{args.duration:g} s per run after "
        f"{args.warmup:g} s warm-up",
        "",
        f"offline engine: batch {batch} {offline:.2f} images/s, batch 1 {offline_b1:.2f} images/s",
        "",
        f"{'C':>4}  {'batching':<9} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'mean batch':>10} {'per request':>11}  errors",
    ]
    for run in result["runs"]:
        errors = ", ".join(f"{k} {v}" for k, v in run.get("errors", {}).items()) or "0"
        lines.append(
            f"{run['concurrency']:>4}  {'on' if run['batching'] else 'off (B=1)':<9} "
            f"{run['ips']:>9.2f} {_fmt(run['p50_ms']):>9} {_fmt(run['p99_ms']):>9} "
            f"{_fmt(run['mean_batch'], 2):>10} {_fmt(run.get('client_mean_batch'), 2):>11}  "
            f"{errors}"
        )
    top = max(run["concurrency"] for run in result["runs"])
    on = next((r for r in result["runs"] if r["concurrency"] == top and r["batching"]), None)
    off = next((r for r in result["runs"] if r["concurrency"] == top and not r["batching"]), None)
    lines += [
        "",
        "mean batch: engine batches (server histogram); per request: the batch each request",
        "was in, averaged over requests (ExplainResponse.batch_size), which favours big batches",
        "",
        f"derived (C={top}):",
    ]
    hw_gain = offline / offline_b1 if offline_b1 else float("nan")
    if on is None:
        lines.append("  no batching run at this concurrency")
        return "\n".join(lines)
    compute_s = batch / offline if offline else float("inf")
    bound_ms = delay + 2 * compute_s * 1000
    ratio = on["ips"] / offline if offline else 0.0
    fill = (on["mean_batch"] or 0.0) / batch
    p99 = on["p99_ms"]
    lines += [
        f"  server(batching) / offline_ips   {ratio:.2f}",
        f"  mean_batch / B                   {fill:.2f}",
        f"  p99 {_fmt(p99)} ms vs max_delay + 2 x one batch ({compute_s * 1000:.0f} ms) "
        f"= {bound_ms:.0f} ms",
    ]
    if off is not None and off["ips"]:
        lines.append(
            f"  batching gain: server {on['ips'] / off['ips']:.2f}x "
            f"(batching / max_batch_size=1), hardware {hw_gain:.2f}x (offline B / offline 1)"
        )
    lines += [
        "",
        f"targets (C={top}, batching):",
        f"  server(batching) >= 0.8 x offline_ips: {ratio:.3f}  {_verdict(ratio >= 0.8)}",
        f"  mean batch >= 0.5 x B: {fill:.3f}  {_verdict(fill >= 0.5)}",
        f"  p99 <= max_delay + 2 x one batch: {_fmt(p99)} <= {bound_ms:.0f} ms  "
        f"{_verdict(p99 is not None and p99 <= bound_ms)}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the camserve server (dynamic batching) against the engine alone."
    )
    parser.add_argument("--batch", type=int, default=32, help="B: offline batch, max_batch_size")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop callers C"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per server run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per run")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="batching delay (5)")
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument(
        "--frontends",
        type=int,
        default=0,
        help="gRPC frontend processes beside the engine process (0: one process)",
    )
    parser.add_argument(
        "--fixed-delay",
        action="store_true",
        help="turn the batcher's adaptive wait off (max_delay_ms alone)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="torch intra-op threads, offline and in the server (default: cores - 1)",
    )
    parser.add_argument(
        "--preprocess-threads",
        type=int,
        default=min(4, usable_cores()),
        help="server decode/encode threads (default: min(4, cores))",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes sharing the C callers (1); more where one cannot keep up (GPU)",
    )
    parser.add_argument(
        "--unbatched",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve with max_batch_size 1, for the batching gain (default: yes)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="offline timed runs (median)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--json-file", type=Path, help="also write the JSON document here (with the table)"
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="measure the serving ceiling instead (benchmarks/ceiling.py; its options follow)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser


def worker_main(argv: list[str]) -> int:
    """`--worker weights MODEL PATH`, `--worker offline MODEL PATH B THREADS REPEATS` or
    `--worker load - ADDRESS C SECONDS CONNECTIONS SEED`."""
    kind, model, path, *rest = argv
    if kind == "load":
        concurrency, seconds, links, seed = rest
        result = worker_load(path, int(concurrency), float(seconds), int(links), int(seed))
    elif kind == "weights":
        result = worker_weights(model, path)
    else:
        batch, threads, repeats = (int(v) for v in rest)
        result = worker_offline(model, path, batch, threads, repeats, min_run_s=1.0)
    print(json.dumps(result))
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--ceiling" in argv:  # the serving ceiling has its own script and options
        import ceiling

        return ceiling.main([arg for arg in argv if arg != "--ceiling"])
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if min(args.batch, args.threads, args.repeats, args.clients) < 1 or args.duration <= 0:
        raise SystemExit("--batch, --threads, --repeats, --clients must be >= 1, --duration > 0")
    if hasattr(os, "getloadavg"):  # other work on the machine skews every figure below
        log(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="camserve-bench-") as tmp:
        workdir = Path(tmp)
        weights = str(workdir / f"{args.model}.pth")
        log(f"saving seeded {args.model} weights")
        run_worker(["weights", args.model, weights])
        offline: dict[int, dict[str, Any]] = {}
        for batch in (args.batch, 1):
            log(f"offline engine, batch {batch}")
            offline[batch] = run_worker(
                ["offline", args.model, weights, str(batch), str(args.threads), str(args.repeats)]
            )
            log(f"  {offline[batch]['ips']:.2f} images/s")
        runs = []
        for concurrency in args.concurrency:
            for batching in (True, False) if args.unbatched else (True,):
                log(f"server, C={concurrency}, batching {'on' if batching else 'off'}")
                run = serve_case(args, weights, workdir, concurrency, batching)
                log(
                    f"  {run['ips']:.2f} images/s, p50 {_fmt(run['p50_ms'])} ms, "
                    f"p99 {_fmt(run['p99_ms'])} ms, mean batch {_fmt(run['mean_batch'], 2)}"
                )
                if run["errors"]:
                    log(f"  errors: {run['errors']}")
                runs.append(run)
    result = {
        "device": offline[args.batch]["device"],
        "model": args.model,
        "offline_ips": round(offline[args.batch]["ips"], 2),
        "offline_b1_ips": round(offline[1]["ips"], 2),
        "runs": runs,
    }
    if hasattr(os, "getloadavg"):
        log(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    document = {**result, "runs": [{key: run[key] for key in RUN_KEYS} for run in runs]}
    if args.json_file:
        args.json_file.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document) if args.json else render(result, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
