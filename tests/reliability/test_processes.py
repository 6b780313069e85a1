"""Faults of the multi-process layout, through the real client and real processes.

One supervisor (an engine process and two gRPC frontends on one port, the tiny ten-class model)
is shared by the tests in order; each leaves it serving again before the next starts:

* the port: a port another socket listens on, or one a running server holds, is refused;
* kill -9 of the engine under load: every request in flight is answered UNAVAILABLE at once,
  health turns NOT_SERVING and back, a retrying client's request gets through the restart;
* kill -9 of one frontend: the other keeps serving (no failed call with retries on) and the
  supervisor restarts it;
* /dev/shm: the supervisor's rings exist exactly once, no kill adds an entry, a stop (also one
  during a restart) leaves none;
* the aggregated /metrics: one CPU series per live process, request counts of both frontends;
* SIGTERM of the whole layout as an operator runs it: every accepted request is answered, it
  exits 0 in time and leaves no child process and no shared memory behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from camserve.client import CamserveError, Client, RetryPolicy
from camserve.server.app import start_server
from camserve.server.settings import SettingsError
from tests._support.servers import (
    ServerThread,
    png_bytes,
    seeded_images,
    start_server_process,
    stop_process,
)
from tests._support.traffic import small_resnet, tiny_model

pytestmark = pytest.mark.timeout(180)
SHM = Path("/dev/shm")
IMAGE = png_bytes(seeded_images(1, size=(32, 32), seed=5)[0])
RESTART_S = 60.0  # the longest a restarted child may take to serve again on a loaded machine
CALL_S = 10.0  # each call's deadline
ANSWER_AFTER_KILL_S = 1.0  # requests in flight at an engine kill are failed within this
# Retries patient enough to outlast an engine restart (a few seconds here; the call's timeout,
# RESTART_S, bounds them).
THROUGH_RESTART = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.5)
FRONTENDS = ("frontend-0", "frontend-1")


# -- helpers -------------------------------------------------------------------------------


def own_segments(pid: int) -> set[str]:
    """The /dev/shm entries of the supervisor with process id `pid`."""
    return {entry.name for entry in SHM.iterdir() if entry.name.startswith(f"camserve-{pid}-")}


def segments_of(server: ServerThread) -> set[str]:
    """The /dev/shm entries of one supervisor (others may run in this process)."""
    prefix = server.server.segment_prefix
    return {entry.name for entry in SHM.iterdir() if entry.name.startswith(prefix)}


def shm_snapshot() -> set[str]:
    """Every /dev/shm entry but other processes' camserve rings (another run's servers)."""
    mine = f"camserve-{os.getpid()}-"
    return {
        entry.name
        for entry in SHM.iterdir()
        if entry.name.startswith(mine) or not entry.name.startswith("camserve-")
    }


def pids_of(server: ServerThread) -> dict[str, int] | None:
    """The supervisor's children by role; None while it cannot say (see the restart test)."""
    try:
        return dict(server.server.pids())
    except ValueError:  # "process object is closed": a restart in its backoff, see below
        return None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `condition` every 20 ms; the seconds it took, AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def health(client: Client) -> str:
    """grpc.health.v1 status of service "" (SERVING, NOT_SERVING), or the failing call's code."""
    try:
        return client.health_status(timeout=2.0)
    except CamserveError as exc:
        return exc.code.name


def fully_serving(server: ServerThread) -> bool:
    """Health SERVING on eight fresh connections (so, very likely, on both frontends)."""
    with Client(address=server.address, retry=None, connections=8) as client:
        return all(health(client) == "SERVING" for _ in range(8))


def wait_serving_again(server: ServerThread, role: str, old_pid: int) -> dict[str, int]:
    """Waits until the supervisor has a new `role` process and health is SERVING again."""

    def restarted() -> bool:
        pids = pids_of(server)
        return pids is not None and pids[role] not in (old_pid, 0)

    wait_for(restarted, RESTART_S, f"a new {role} process")
    wait_for(lambda: fully_serving(server), RESTART_S, "health SERVING on both frontends")
    pids = pids_of(server)
    assert pids is not None
    return pids


def explains_of(server: ServerThread, pid: int) -> float:
    """How many Explain calls the process `pid` answered OK, from its own counter file in the
    supervisor's Prometheus multiprocess directory (the aggregated registry sums them all)."""
    counters = Path(server.server.metrics.directory) / f"counter_{pid}.db"
    if not counters.exists():
        return 0.0
    with tempfile.TemporaryDirectory() as alone:
        shutil.copy(counters, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)
        value = registry.get_sample_value(
            "camserve_requests_total", {"rpc": "Explain", "code": "OK"}
        )
    return value or 0.0


def client_on_both_frontends(server: ServerThread, pids: dict[str, int], **options: Any) -> Client:
    """A Client(connections=4) whose connections reach both frontends (their answer counts
    show it); another is tried while all four land on one (1 time in 8)."""
    for _ in range(12):
        client = Client(address=server.address, connections=4, **options)
        counts = {role: explains_of(server, pids[role]) for role in FRONTENDS}
        explain_ok(client, 8)  # two calls on each connection
        if all(explains_of(server, pids[role]) > counts[role] for role in FRONTENDS):
            return client
        client.close()
    raise AssertionError("12 clients of 4 connections each all reached only one frontend")


def scrape(port: int) -> dict[str, Any]:
    """The families of GET /metrics on `port`, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def explain_ok(client: Client, count: int) -> None:
    for _ in range(count):
        explanation = client.explain(IMAGE, timeout=CALL_S)
        assert explanation.predictions


def gone(pid: int) -> bool:
    """Whether no process `pid` exists (it exited and was reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def listening_socket() -> socket.socket:
    """A plain TCP socket listening on a free 127.0.0.1 port (no SO_REUSEPORT): a stale server."""
    stale = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stale.bind(("127.0.0.1", 0))
    stale.listen()
    return stale


# -- the shared server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def processes(test_settings: Callable[..., Any]) -> Iterator[ServerThread]:
    """A supervisor with one engine process and two frontends serving the tiny model."""
    server = ServerThread(
        test_settings(
            frontends=2,
            models=(tiny_model(),),
            metrics_port=0,
            http_port=-1,
            shm_ring_mb=8,
            grace_period_s=2.0,
        )
    )
    yield server
    server.stop(grace=1.0)


# -- the port ------------------------------------------------------------------------------


def test_a_listening_socket_on_the_port_refuses_the_supervisor(
    test_settings: Callable[..., Any],
) -> None:
    before = own_segments(os.getpid())
    with listening_socket() as stale:
        port = stale.getsockname()[1]
        settings = test_settings(frontends=2, models=(tiny_model(),), port=port, http_port=-1)
        with pytest.raises(SettingsError, match=rf"port 127\.0\.0\.1:{port} is already in use"):
            asyncio.run(start_server(settings))
    assert own_segments(os.getpid()) == before  # refused before any ring was created


def test_a_second_server_on_a_running_servers_port_is_refused(
    processes: ServerThread, test_settings: Callable[..., Any]
) -> None:
    port = processes.port
    second = test_settings(frontends=2, models=(tiny_model(),), port=port, http_port=-1)
    with pytest.raises(SettingsError, match=rf"port 127\.0\.0\.1:{port} is already in use"):
        asyncio.run(start_server(second))
    # The single-process layout binds without SO_REUSEPORT (grpc.so_reuseport 0): refused too.
    single = test_settings(frontends=0, models=(tiny_model(),), port=port, http_port=-1)
    with pytest.raises(SettingsError, match=rf"port 127\.0\.0\.1:{port} is already in use"):
        asyncio.run(start_server(single))
    with Client(address=processes.address, retry=None, connections=4) as client:
        explain_ok(client, 8)  # the first keeps serving, on both frontends


# -- kill -9 of the engine -----------------------------------------------------------------


def test_engine_sigkill_under_load_fails_in_flight_requests_at_once_and_recovers(
    processes: ServerThread,
) -> None:
    before = pids_of(processes)
    assert before is not None
    shm_before = shm_snapshot()
    records: list[tuple[float, float, str]] = []  # (sent, answered, outcome) of every call
    killed = threading.Event()
    client = Client(address=processes.address, retry=None, connections=4, timeout=CALL_S)

    def load() -> None:
        # Sends until the first failure after the kill (not to spin on refusals meanwhile).
        for _ in range(100_000):
            sent = time.monotonic()
            try:
                client.explain(IMAGE, timeout=CALL_S)
                outcome = "OK"
            except CamserveError as exc:
                outcome = exc.code.name
            records.append((sent, time.monotonic(), outcome))
            if outcome != "OK" and killed.is_set():
                return

    with client, ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(load) for _ in range(8)]
        wait_for(lambda: len(records) >= 40, 30, "40 answered requests before the kill")
        kill_at = time.monotonic()
        os.kill(before["engine"], signal.SIGKILL)
        killed.set()
        for worker in workers:
            worker.result(timeout=CALL_S + 5)

    early = [r for r in records if r[1] < kill_at and r[2] != "OK"]
    assert not early, f"failures before the kill: {early}"
    in_flight = [r for r in records if r[0] < kill_at <= r[1]]
    after = [r for r in records if r[0] >= kill_at]
    late = max(r[1] - kill_at for r in in_flight + after)
    print(
        f"\nengine kill: {len(in_flight)} in flight, "
        f"{sum(r[2] == 'UNAVAILABLE' for r in in_flight)} of them UNAVAILABLE, "
        f"last answer {late:.3f}s after the kill"
    )
    assert in_flight
    # Each in-flight call is answered: UNAVAILABLE, or OK if the engine had already answered it.
    assert {r[2] for r in in_flight} <= {"OK", "UNAVAILABLE"}, in_flight
    assert any(r[2] == "UNAVAILABLE" for r in in_flight), in_flight
    # And every worker's first failure after the kill is UNAVAILABLE, within a second of it.
    assert {r[2] for r in records if r[1] >= kill_at and r[2] != "OK"} == {"UNAVAILABLE"}
    assert late < ANSWER_AFTER_KILL_S, [r for r in in_flight + after if r[1] - kill_at >= 1.0]

    # Health turns NOT_SERVING while the engine restarts; a request sent now, with patient
    # retries, gets through once it is back.
    with Client(address=processes.address, retry=None) as probe:
        wait_for(lambda: health(probe) == "NOT_SERVING", 10, "health NOT_SERVING after the kill")
    with Client(address=processes.address, retry=THROUGH_RESTART, timeout=RESTART_S) as patient:
        sent = time.monotonic()
        assert patient.explain(IMAGE).predictions
        through = time.monotonic() - sent
    print(f"a retrying request sent during the restart succeeded after {through:.2f}s")

    after_pids = wait_serving_again(processes, "engine", before["engine"])
    print(f"serving again {time.monotonic() - kill_at:.2f}s after the kill")
    assert after_pids["frontend-0"] == before["frontend-0"]
    assert after_pids["frontend-1"] == before["frontend-1"]
    with Client(address=processes.address, retry=None, connections=4) as client:
        explain_ok(client, 8)
    assert shm_snapshot() <= shm_before, shm_snapshot() - shm_before


# -- kill -9 of one frontend ---------------------------------------------------------------


def test_frontend_sigkill_the_other_keeps_serving_and_it_is_restarted(
    processes: ServerThread,
) -> None:
    before = pids_of(processes)
    assert before is not None
    shm_before = shm_snapshot()
    victim = "frontend-1"
    failures: list[str] = []
    answered: list[float] = []
    stop = threading.Event()
    # With the default retry policy; some of its connections are on the frontend to be killed.
    client = client_on_both_frontends(processes, before, timeout=CALL_S)

    def load() -> None:
        while not stop.is_set():
            try:
                client.explain(IMAGE, timeout=CALL_S)
                answered.append(time.monotonic())
            except CamserveError as exc:
                failures.append(str(exc))
            time.sleep(0.01)

    with client, ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load) for _ in range(4)]
        try:
            wait_for(lambda: len(answered) >= 20, 30, "20 answered requests before the kill")
            kill_at = time.monotonic()
            os.kill(before[victim], signal.SIGKILL)

            def restarted() -> bool:
                pids = pids_of(processes)
                return pids is not None and pids[victim] not in (before[victim], 0)

            wait_for(restarted, RESTART_S, f"a new {victim} process")
            respawned_at = time.monotonic()
            after_pids = pids_of(processes)
            assert after_pids is not None
            fresh = after_pids[victim]

            # The restarted frontend serves: new connections land on it and get answers.
            def fresh_one_answered() -> bool:
                with Client(address=processes.address, connections=4) as newcomer:
                    explain_ok(newcomer, 4)
                return explains_of(processes, fresh) > 0

            took = wait_for(fresh_one_answered, RESTART_S, f"the new {victim} to answer")
            # Answers between the kill and the new frontend's first: the other one's.
            during = sum(kill_at < t <= respawned_at + took for t in answered)
            more = len(answered) + 20
            wait_for(lambda: len(answered) >= more, 30, "the load going on")
        finally:
            stop.set()
            for worker in workers:
                worker.result(timeout=CALL_S * 5)
    print(
        f"\nfrontend kill: {len(answered)} answered, {during} while it restarted, "
        f"the new frontend answered {took:.2f}s after its respawn"
    )
    assert failures == []
    assert during > 0  # the other frontend kept serving
    assert after_pids["engine"] == before["engine"]
    assert after_pids["frontend-0"] == before["frontend-0"]
    assert fully_serving(processes)
    assert shm_snapshot() <= shm_before, shm_snapshot() - shm_before


# -- /dev/shm ------------------------------------------------------------------------------


def test_rings_exist_exactly_once_after_the_kills(processes: ServerThread) -> None:
    names = processes.server.segment_names
    assert len(names) == 4  # two rings per frontend
    assert len(set(names)) == len(names)
    assert segments_of(processes) == set(names)  # nothing else of this supervisor's


# -- the aggregated /metrics ---------------------------------------------------------------


def test_metrics_list_every_live_process_and_sum_both_frontends(processes: ServerThread) -> None:
    pids = pids_of(processes)
    assert pids is not None
    assert processes.server.metrics_port
    port = int(processes.server.metrics_port)
    expected = {
        ("engine", "0", str(pids["engine"])),
        ("frontend", "0", str(pids["frontend-0"])),
        ("frontend", "1", str(pids["frontend-1"])),
    }

    def cpu_series() -> set[tuple[str, str, str]]:
        family = scrape(port).get("camserve_process_cpu_seconds")
        if family is None:
            return set()
        return {(s.labels["role"], s.labels["index"], s.labels["pid"]) for s in family.samples}

    # One series per live process: the processes killed above are gone from it.
    wait_for(lambda: cpu_series() == expected, 10, f"CPU series of {expected}")
    for sample in scrape(port)["camserve_process_cpu_seconds"].samples:
        assert sample.value > 0

    def explains() -> float:
        family = scrape(port)["camserve_requests"]
        return sum(
            s.value
            for s in family.samples
            if s.name == "camserve_requests_total" and s.labels == {"rpc": "Explain", "code": "OK"}
        )

    total_before = explains()
    each_before = {role: explains_of(processes, pids[role]) for role in FRONTENDS}
    sent = 0
    for _ in range(12):  # a client's four connections all land on one frontend 1 time in 8
        with Client(address=processes.address, retry=None, connections=4) as client:
            explain_ok(client, 8)
        sent += 8
        each = {role: explains_of(processes, pids[role]) for role in each_before}
        if all(each[role] > each_before[role] for role in each):
            break
    print(f"\n{sent} calls: {each} (before {each_before})")
    assert all(each[role] > each_before[role] for role in each), "one frontend answered all"
    # The aggregated counter is the sum over both frontends (the dead ones' counts included).
    assert explains() - total_before == sent
    assert sum(each.values()) - sum(each_before.values()) == sent


# -- stop ------------------------------------------------------------------------------------


def test_stop_removes_every_segment(processes: ServerThread) -> None:
    pids = pids_of(processes)
    assert pids is not None
    assert segments_of(processes) == set(processes.server.segment_names)
    processes.stop(grace=1.0)
    assert segments_of(processes) == set()
    assert [role for role, pid in pids.items() if not gone(pid)] == []


def test_stop_during_a_restart_releases_everything(test_settings: Callable[..., Any]) -> None:
    """The supervisor is stopped while it waits to restart an engine that died right after
    its restart (the restart backoff): it still answers `pids()` and releases its rings."""
    before = own_segments(os.getpid())
    server = ServerThread(
        test_settings(
            frontends=1, models=(tiny_model(),), metrics_port=-1, http_port=-1, shm_ring_mb=1
        )
    )
    mine: set[str] = set()
    pids_error: str | None = None
    stop_error: str | None = None
    try:
        first = server.server.pids()["engine"]
        mine = own_segments(os.getpid()) - before
        assert len(mine) == 2
        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: (pids_of(server) or {}).get("engine") not in (first, 0, None),
            RESTART_S,
            "the engine's restart",
        )
        # It dies again at once: the next restart waits (RESTART_BACKOFF_S) before spawning.
        os.kill(server.server.pids()["engine"], signal.SIGKILL)
        time.sleep(0.25)
        try:
            server.server.pids()
        except ValueError as exc:
            pids_error = repr(exc)
    finally:
        try:
            server.stop(grace=1.0)
        except ValueError as exc:
            stop_error = repr(exc)
    left = own_segments(os.getpid()) & mine
    for name in left:  # not to leave them behind for the rest of the run
        (SHM / name).unlink(missing_ok=True)
    problems = {
        "pids() during the restart backoff raised": pids_error,
        "stop() during the restart backoff raised": stop_error,
        "segments left in /dev/shm after stop()": sorted(left) or None,
    }
    assert {what: got for what, got in problems.items() if got is not None} == {}


# -- SIGTERM of the whole layout -------------------------------------------------------------


def test_sigterm_drains_the_whole_layout(tmp_path: Path, resnet18_weights: Path) -> None:
    grace_s = 10.0
    model = small_resnet(resnet18_weights)
    config = tmp_path / "camserve.toml"
    config.write_text(
        f"""
[server]
frontends = 2
grace_period_s = {grace_s}
shm_ring_mb = 8
[[models]]
name = "{model.name}"
source = "{model.source}"
weights = "{Path(model.weights).as_posix()}"
labels = ""
resize = 0
crop = {model.crop}
max_batch_size = 4
max_delay_ms = 2
"""
    )
    ready = tmp_path / "ready.json"
    process, port = start_server_process(config, ready, stdout=subprocess.DEVNULL)
    try:
        children = json.loads(ready.read_text())["children"]
        assert sorted(children) == ["engine", "frontend-0", "frontend-1"]
        assert len(own_segments(process.pid)) == 4
        images = [png_bytes(image) for image in seeded_images(4, size=(64, 64))]
        with Client(address=f"127.0.0.1:{port}", retry=None, connections=4) as client:

            def send(index: int) -> str:
                try:
                    client.explain(images[index % 4], timeout=60)
                except CamserveError as exc:
                    return exc.code.name
                return "OK"

            with ThreadPoolExecutor(24) as pool:
                calls = [pool.submit(send, i) for i in range(24)]
                wait_for(lambda: any(c.done() for c in calls), 60, "a first answer")
                process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                answered_before = sum(c.done() for c in calls)
                outcomes = [c.result(timeout=grace_s + 10) for c in calls]
        exit_code = process.wait(timeout=grace_s + 10)
        exited_after = time.monotonic() - signalled
    finally:
        stop_process(process)
    print(
        f"\ndrain: {24 - answered_before} of 24 in flight at SIGTERM, {outcomes.count('OK')} OK, "
        f"exit {exit_code} after {exited_after:.2f}s"
    )
    assert answered_before < 24  # requests were in flight when the signal came
    # Accepted requests are answered; one not yet accepted is refused with UNAVAILABLE, never
    # cancelled, failed or left waiting.
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes.count("OK") >= 12, outcomes
    assert exit_code == 0
    assert exited_after < grace_s + 5
    assert own_segments(process.pid) == set()
    assert [role for role, pid in children.items() if not gone(pid)] == []


def test_the_installed_command_aggregates_every_childs_metrics(tmp_path: Path) -> None:
    """`camserve-server` as installed (a launcher script, which spawn re-imports in each child
    before the child's entry point runs): /metrics still lists the engine and the frontend."""
    command = Path(sys.executable).with_name("camserve-server")
    model = tiny_model()
    config = tmp_path / "camserve.toml"
    config.write_text(
        f"""
[server]
frontends = 1
log_level = "warning"
[[models]]
name = "{model.name}"
source = "{model.source}"
labels = ""
resize = 0
crop = {model.crop}
"""
    )
    ready = tmp_path / "ready.json"
    root = Path(__file__).resolve().parents[2]  # the test model's module, for the children
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [str(command), "--config", str(config), "--port", "0", "--metrics-port", "0"]
        + ["--http-port", "-1", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        wait_for(
            lambda: (ready.exists() and ready.stat().st_size > 0) or process.poll() is not None,
            RESTART_S,
            "ready file",
        )
        assert process.poll() is None, f"the server exited with {process.returncode}"
        url = f"http://127.0.0.1:{json.loads(ready.read_text())['metrics_port']}/metrics"

        def roles() -> set[str]:
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
                text = response.read().decode()
            return {
                sample.labels["role"]
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "camserve_process_cpu_seconds"
            }

        wait_for(lambda: roles() == {"engine", "frontend"}, 30, "both processes' series")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        stop_process(process)


def test_inputs_larger_than_the_ring_are_refused_with_the_setting_to_raise(
    server_factory: Callable[..., ServerThread],
) -> None:
    """A request whose model inputs cannot fit the frontend's 1 MiB ring at all is refused
    INVALID_ARGUMENT naming `shm_ring_mb`; a request that fits is served by the same server."""
    server = server_factory(
        frontends=1,
        shm_ring_mb=1,
        metrics_port=-1,
        http_port=-1,
        models=(tiny_model(crop=256, max_batch_size=8),),
    )
    big = [seeded_images(1, size=(256, 256), seed=i)[0] for i in range(8)]  # 8 x 192 KiB
    with Client(address=server.address, retry=None) as client:
        with pytest.raises(CamserveError) as refused:
            client.explain_batch([png_bytes(image) for image in big], timeout=CALL_S)
        assert refused.value.code.name == "INVALID_ARGUMENT"
        assert "shm_ring_mb" in str(refused.value)
        assert client.explain(png_bytes(big[0]), timeout=CALL_S).predictions
