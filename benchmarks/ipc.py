"""The control channel between the frontends and the engine process: transports compared.

Every request crosses twice (request out, answer back) as one small pickled message; tensor
bytes never travel on this channel (they are in the shared-memory rings, `camserve.server.ipc`).
This measures, for each candidate transport, an echo child process (spawned) answering what a
parent on an asyncio event loop sends with `--window` messages in flight:

* `asyncio-unix`: asyncio streams over a Unix socket, 4-byte length prefix (what camserve uses);
* `mp-connection`: `multiprocessing.connection` over a Pipe; its calls block, so the event loop
  side sends from the loop and receives on a thread that hands answers back with
  `call_soon_threadsafe`;
* `zmq`: pyzmq's asyncio sockets (PAIR over ipc://), when pyzmq is installed.

It prints messages/s and the CPU microseconds per message of both processes together, and the
cost of the ring codec for a typical request (one 224x224 uint8 image) against pickling its
tensor inline. Usage: `python benchmarks/ipc.py [--messages 20000] [--window 32] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MESSAGE = pickle.dumps(
    ("explain", 1, "tiny", {"layer": "layer4", "methods": ("gradcam",)}, [0.5] * 60)
)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- echo children ---------------------------------------------------------------------------


def _echo_unix(path: str) -> None:
    async def serve() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    header = await reader.readexactly(4)
                    body = await reader.readexactly(int.from_bytes(header, "little"))
                    writer.write(header + body)
            except asyncio.IncompleteReadError:
                writer.close()

        server = await asyncio.start_unix_server(echo, path)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def _echo_pipe(connection: Any) -> None:  # noqa: ANN401 - a multiprocessing Connection
    try:
        while True:
            connection.send_bytes(connection.recv_bytes())
    except EOFError:
        pass


def _echo_zmq(address: str) -> None:
    import zmq

    socket = zmq.Context().socket(zmq.PAIR)
    socket.bind(address)
    while True:
        message = socket.recv()
        if message == b"":
            return
        socket.send(message)


# -- drivers ---------------------------------------------------------------------------------


async def _pipelined(send: Any, answers: asyncio.Queue[bytes], count: int, window: int) -> float:  # noqa: ANN401
    started = time.perf_counter()
    in_flight = 0
    sent = received = 0
    while received < count:
        while in_flight < window and sent < count:
            send(MESSAGE)
            sent += 1
            in_flight += 1
        await answers.get()
        received += 1
        in_flight -= 1
    return time.perf_counter() - started


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connects once the spawned child listens (it takes a moment to start)."""
    for _ in range(3000):
        try:
            return await asyncio.open_unix_connection(path)
        except OSError:
            await asyncio.sleep(0.01)
    raise RuntimeError("the echo child did not listen")


async def _unix(count: int, window: int, context: Any) -> tuple[float, int]:  # noqa: ANN401
    path = os.path.join(tempfile.mkdtemp(), "echo.sock")
    child = context.Process(target=_echo_unix, args=(path,), daemon=True)
    child.start()
    reader, writer = await _connect(path)
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def read() -> None:
        while True:
            header = await reader.readexactly(4)
            answers.put_nowait(await reader.readexactly(int.from_bytes(header, "little")))

    reading = asyncio.create_task(read())
    frame = len(MESSAGE).to_bytes(4, "little")
    seconds = await _pipelined(lambda m: writer.write(frame + m), answers, count, window)
    reading.cancel()
    writer.close()
    return seconds, child.pid or 0


async def _pipe(count: int, window: int, context: Any) -> tuple[float, int]:  # noqa: ANN401
    ours, theirs = context.Pipe()
    child = context.Process(target=_echo_pipe, args=(theirs,), daemon=True)
    child.start()
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    def receive() -> None:
        for _ in range(count):
            loop.call_soon_threadsafe(answers.put_nowait, ours.recv_bytes())

    threading.Thread(target=receive, daemon=True).start()
    seconds = await _pipelined(ours.send_bytes, answers, count, window)
    ours.close()
    return seconds, child.pid or 0


async def _zmq(count: int, window: int, context: Any) -> tuple[float, int]:  # noqa: ANN401
    import zmq
    import zmq.asyncio

    address = f"ipc://{tempfile.mkdtemp()}/echo"
    child = context.Process(target=_echo_zmq, args=(address,), daemon=True)
    child.start()
    socket = zmq.asyncio.Context().socket(zmq.PAIR)
    socket.connect(address)
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    async def read() -> None:
        while True:
            answers.put_nowait(await socket.recv())

    reading = asyncio.create_task(read())
    seconds = await _pipelined(lambda m: socket.send(m), answers, count, window)
    reading.cancel()
    await socket.send(b"")
    return seconds, child.pid or 0


TRANSPORTS = {"asyncio-unix": _unix, "mp-connection": _pipe, "zmq": _zmq}


def measure(name: str, count: int, window: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")

    async def run() -> dict[str, Any]:
        warm = await TRANSPORTS[name](200, window, context)  # children start and import
        del warm
        parent_before = _cpu_s(os.getpid())
        seconds, child = await TRANSPORTS[name](count, window, context)
        # The child's own CPU since it started: its start-up is small next to count messages.
        total = _cpu_s(os.getpid()) - parent_before + _cpu_s(child)
        return {
            "transport": name,
            "messages_per_s": round(count / seconds),
            "cpu_us_per_message": round(1e6 * total / count, 1),
        }

    return asyncio.run(run())


def codec_costs(repeats: int = 2000) -> dict[str, float]:
    """µs to send and receive one request's image: through the ring, and pickled inline."""
    from multiprocessing import shared_memory

    import torch

    from camserve.server.ipc.codec import dumps, loads
    from camserve.server.ipc.rings import ShmRing, segment_bytes

    image = torch.randint(0, 255, (3, 224, 224), dtype=torch.uint8)
    segment = shared_memory.SharedMemory(create=True, size=segment_bytes(64))
    ring = ShmRing(segment)
    try:
        started = time.perf_counter()
        for _ in range(repeats):
            loads(dumps(("explain", 1, [image]), ring), ring)
            ring.release(ring.written)
        ring_us = 1e6 * (time.perf_counter() - started) / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            pickle.loads(pickle.dumps(("explain", 1, [image])))  # noqa: S301 - our own bytes
        inline_us = 1e6 * (time.perf_counter() - started) / repeats
    finally:
        ring.close()
        segment.unlink()
    return {"ring_us": round(ring_us, 1), "pickled_inline_us": round(inline_us, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in TRANSPORTS if n != "zmq" or _has_zmq()]
    rows = [measure(name, args.messages, args.window) for name in names]
    result = {"window": args.window, "message_bytes": len(MESSAGE), "transports": rows}
    result["codec_224_uint8"] = codec_costs()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"control messages of {len(MESSAGE)} bytes, {args.window} in flight, echo child")
    print(f"{'transport':<14} {'msgs/s':>9} {'CPU us/msg':>11}")
    for row in rows:
        print(f"{row['transport']:<14} {row['messages_per_s']:>9} {row['cpu_us_per_message']:>11}")
    codec = result["codec_224_uint8"]
    print(
        f"one 224x224 uint8 image per request: ring codec {codec['ring_us']} us, "
        f"pickled inline {codec['pickled_inline_us']} us (send + receive, one process)"
    )
    return 0


def _has_zmq() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
    raise SystemExit(main())
