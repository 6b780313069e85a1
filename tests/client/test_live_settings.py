"""Client behaviour against a real server that needs its own settings: retries riding out a full
queue, a bearer token, TLS, and NOT_SERVING health (the refusals themselves are tested in
tests/reliability/test_deadlines.py).

The model is the test suite's gated net (`tests._support.gated_model`): while its gate is
closed a batch blocks inside the engine, so the queue fills exactly when the test says.
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from camserve.client import (
    Client,
    RetryPolicy,
    TLSConfig,
    Unauthenticated,
    Unavailable,
    cli,
)
from tests._support import gated_model
from tests._support.servers import gated_settings, png_bytes, seeded_images

IMAGE = png_bytes(seeded_images(1, size=(32, 32))[0])
GATED = gated_settings(max_queue=2)


@pytest.fixture
def gated_server(gated_server_factory):
    """A server whose only model blocks in its forward pass until the test opens the gate."""
    return gated_server_factory(max_queue=2)


@pytest.fixture
def open_server(server_factory):
    """A gated-model server with the gate open, for settings that are not about queueing."""

    def start(**settings):
        from camserve.server.settings import LimitsSettings

        gated_model.GATE.set()
        limits = LimitsSettings(max_images_per_request=GATED.max_queue)
        return server_factory(models=(GATED,), metrics_port=-1, limits=limits, **settings)

    return start


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def fill_queue(server, client: Client, pool: ThreadPoolExecutor):
    """One call blocked in the engine and two waiting: the queue (max 2) is full."""
    running = pool.submit(client.explain, IMAGE)
    assert gated_model.ENTERED.wait(10)
    queued = [pool.submit(client.explain, IMAGE) for _ in range(2)]
    registry = server.server.registry
    wait_until(lambda: registry.get("gated").queue_depth == 2)
    return [running, *queued]


def test_retries_ride_out_a_full_queue(gated_server) -> None:
    policy = RetryPolicy(max_attempts=20, initial_backoff_s=0.05, max_backoff_s=0.2)
    with (
        Client(address=gated_server.address, retry=None, timeout=30) as filler,
        # Retries over three connections: each attempt takes the next one.
        Client(address=gated_server.address, retry=policy, timeout=30, connections=3) as patient,
        ThreadPoolExecutor(3) as pool,
    ):
        pending = fill_queue(gated_server, filler, pool)
        opener = threading.Timer(0.4, gated_model.GATE.set)
        opener.start()
        started = time.monotonic()
        explanation = patient.explain(IMAGE)
        waited = time.monotonic() - started
        opener.join()
        for future in pending:
            future.result(30)
    assert explanation.model == "gated"
    assert waited >= 0.3  # it could only succeed once the gate opened


def test_the_bearer_token_is_required_and_checked(open_server, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    server = open_server(auth_token_file=str(token_file))
    with Client(address=server.address, retry=None) as anonymous:
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            anonymous.explain(IMAGE)
        assert anonymous.health()  # health stays open for container probes
    with (
        Client(address=server.address, token="wrong", retry=None) as wrong,
        pytest.raises(Unauthenticated, match="invalid bearer token"),
    ):
        wrong.models()
    with Client(address=server.address, token="s3cret") as trusted:
        assert trusted.explain(IMAGE).model == "gated"
        assert [m.name for m in trusted.models()] == ["gated"]
    with Client(address=server.address, token="s3cret", connections=3) as spread:
        assert [spread.explain(IMAGE).model for _ in range(3)] == ["gated"] * 3  # every channel
    assert cli.main(["models", "--server", server.address, "--token-file", str(token_file)]) == 0


def test_tls_with_a_private_certificate_authority(open_server, tmp_path) -> None:
    cert, key = self_signed_certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server = open_server(
        tls_cert_file=str(tmp_path / "cert.pem"), tls_key_file=str(tmp_path / "key.pem")
    )
    with Client(address=server.address, tls=TLSConfig(root_certificates=cert)) as client:
        assert client.explain(IMAGE).model == "gated"
    tls = TLSConfig(root_certificates=cert)
    with Client(address=server.address, tls=tls, connections=3) as spread:
        assert [spread.explain(IMAGE).model for _ in range(3)] == ["gated"] * 3  # every channel
    with (
        Client(address=server.address, retry=None, timeout=5) as plaintext,
        pytest.raises(Unavailable),
    ):
        plaintext.health()
    tls_args = ["--server", server.address, "--tls-ca", str(tmp_path / "cert.pem")]
    assert cli.main(["health", *tls_args]) == 0


def test_health_exits_1_when_not_serving(open_server, capsys) -> None:
    from grpc_health.v1 import health_pb2

    server = open_server()
    assert cli.main(["health", "--server", server.address]) == 0
    server.call(server.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    assert cli.main(["health", "--server", server.address]) == 1
    assert capsys.readouterr().err.strip().endswith("NOT_SERVING")
    with Client(address=server.address) as client:
        assert not client.health()
        assert client.health_status() == "NOT_SERVING"


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and localhost, and its key, both PEM."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "camserve test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
