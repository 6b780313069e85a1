"""Mutual TLS on the HTTP port: the gRPC server's client CA admits only the clients it signed."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from camserve.server.settings import LimitsSettings
from tests._support.servers import ServerThread, gated_settings

pytestmark = pytest.mark.timeout(120)
Key = ec.EllipticCurvePrivateKey


def _signed(subject: str, key: Key, issuer: tuple[x509.Certificate, Key] | None) -> Any:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if subject == "server":
        address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        builder = builder.add_extension(x509.SubjectAlternativeName([address]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_only_clients_with_a_certificate_from_the_ca_get_answers(
    server_factory: Callable[..., ServerThread], tmp_path: Path
) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    ca = _signed("camserve test CA", keys[0], None)
    ca_file, _ = _write(tmp_path, "ca", ca, keys[0])
    server_files = _write(tmp_path, "server", _signed("server", keys[1], (ca, keys[0])), keys[1])
    client_files = _write(tmp_path, "client", _signed("client", keys[2], (ca, keys[0])), keys[2])
    server = server_factory(
        models=(gated_settings(),),
        limits=LimitsSettings(max_images_per_request=2),
        metrics_port=-1,
        tls_cert_file=server_files[0],
        tls_key_file=server_files[1],
        tls_client_ca_file=ca_file,
    )
    url = f"https://127.0.0.1:{server.server.http_port}/v1/models"
    anonymous = ssl.create_default_context(cafile=ca_file)
    known = ssl.create_default_context(cafile=ca_file)
    known.load_cert_chain(*client_files)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(url, ssl=known) as reply:
            assert reply.status == 200
            assert [m["name"] for m in (await reply.json())["models"]] == ["gated"]
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url, ssl=anonymous) as reply:
                await reply.read()
