"""Security properties through real servers: safe weights loading, TLS and mutual TLS, bearer
tokens, and a loopback-only default bind.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from camserve.client import Client, TLSConfig, Unauthenticated, Unavailable
from camserve.server.models.loading import ModelLoadError, load_state_dict
from camserve.server.settings import ModelSettings, Settings, load_settings
from tests._support.servers import ServerThread, png_bytes, seeded_images, seeded_model
from tests._support.traffic import small_resnet

pytestmark = pytest.mark.timeout(120)

IMAGE = png_bytes(seeded_images(1, size=(48, 48), seed=5)[0])
ServerFactory = Callable[..., ServerThread]


# ----------------------------------------------------------------------------- weights files


class WritesMarker:
    """Unpickling this runs `exec`, which writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class RunsShell:
    """Unpickling this runs `os.system("touch <marker>")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


def save_exec_in_state_dict(path: Path, marker: Path) -> None:
    state = seeded_model("resnet18").state_dict()
    state["fc.bias"] = WritesMarker(marker)  # type: ignore[assignment]
    torch.save(state, path)


def save_shell_in_legacy_format(path: Path, marker: Path) -> None:
    torch.save({"fc.weight": RunsShell(marker)}, path, _use_new_zipfile_serialization=False)


def save_plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"fc.weight": WritesMarker(marker)}))


def save_whole_module_with_payload(path: Path, marker: Path) -> None:
    model = seeded_model("resnet18")
    model.payload = WritesMarker(marker)  # type: ignore[assignment]
    torch.save(model, path)


PAYLOADS = {
    "exec-inside-state-dict": save_exec_in_state_dict,
    "os-system-legacy-format": save_shell_in_legacy_format,
    "plain-pickle-file": save_plain_pickle,
    "whole-module-pickle": save_whole_module_with_payload,
}


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Unpickled by plain pickle, both payloads do run code, so the refusals below mean
    something."""
    for payload in (WritesMarker(tmp_path / "a"), RunsShell(tmp_path / "b")):
        pickle.loads(pickle.dumps(payload))  # noqa: S301 - the point of the test
    assert (tmp_path / "a").exists()
    assert (tmp_path / "b").exists()


@pytest.mark.parametrize("save", PAYLOADS.values(), ids=list(PAYLOADS))
def test_weights_that_would_run_code_are_refused_unread(
    tmp_path: Path, save: Callable[[Path, Path], None]
) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "resnet18.pth"
    save(weights, marker)

    with pytest.raises(ModelLoadError) as direct:
        load_state_dict(str(weights))
    assert "refused unread" in str(direct.value)
    assert "state_dict" in str(direct.value)

    model = ModelSettings(name="evil", source="torchvision:resnet18", weights=str(weights))
    with pytest.raises(ModelLoadError) as startup:
        ServerThread(Settings(port=0, metrics_port=-1, http_port=0, models=(model,)))
    assert str(weights) in str(startup.value)
    assert not marker.exists(), "loading the weights ran code from the file"


def test_safe_weights_in_a_checkpoint_dict_still_load(tmp_path: Path) -> None:
    """The refusal is not a blanket one: a plain `{"state_dict": ...}` checkpoint loads."""
    weights = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": seeded_model("resnet18").state_dict()}, weights)
    state = load_state_dict(str(weights))
    assert state["fc.weight"].shape == (1000, 512)


# -------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server and client certificate it signed, and a rogue CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signing_key = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate, key: Any = None) -> tuple[Path, Path]:
    cert_path = folder / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    if key is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in range(6)}
    ca = _certificate("camserve test CA", keys[0], None)
    server = _certificate(
        "localhost", keys[1], (ca, keys[0]), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _certificate("client", keys[2], (ca, keys[0]), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue = _certificate("rogue CA", keys[3], None)
    rogue_client = _certificate(
        "client", keys[4], (rogue, keys[3]), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    ca_path, _ = _write(folder, "ca", ca)
    server_paths = _write(folder, "server", server, keys[1])
    client_paths = _write(folder, "client", client, keys[2])
    rogue_path, _ = _write(folder, "rogue-ca", rogue)
    rogue_client_paths = _write(folder, "rogue-client", rogue_client, keys[4])
    return Pki(ca_path, *server_paths, *client_paths, rogue_path, *rogue_client_paths)


def explain_with(address: str, **client_options: Any) -> int:
    """The top class of one explain call with a fresh, non-retrying client."""
    with Client(address=address, retry=None, timeout=10, **client_options) as client:
        return client.explain(IMAGE).top.index


def test_tls_server_answers_tls_clients_and_refuses_others(
    server_factory: ServerFactory, resnet18_weights: Path, pki: Pki
) -> None:
    server = server_factory(
        models=(small_resnet(resnet18_weights),),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    trusted = TLSConfig(root_certificates=pki.ca)
    top = explain_with(server.address, tls=trusted)
    assert top >= 0
    by_name = TLSConfig(root_certificates=pki.ca.read_bytes(), server_name="localhost")
    assert explain_with(server.address, tls=by_name) == top
    with Client(address=server.address, tls=trusted, retry=None, timeout=10) as client:
        assert client.health()

    with pytest.raises(Unavailable):
        explain_with(server.address)  # plaintext
    with pytest.raises(Unavailable):
        explain_with(server.address, tls=TLSConfig(root_certificates=pki.rogue_ca))


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(
    server_factory: ServerFactory, resnet18_weights: Path, pki: Pki
) -> None:
    server = server_factory(
        models=(small_resnet(resnet18_weights),),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )
    with pytest.raises(Unavailable):
        explain_with(server.address, tls=TLSConfig(root_certificates=pki.ca))
    rogue = TLSConfig(
        root_certificates=pki.ca,
        certificate_chain=pki.rogue_client_cert,
        private_key=pki.rogue_client_key,
    )
    with pytest.raises(Unavailable):
        explain_with(server.address, tls=rogue)
    with pytest.raises(Unavailable):
        explain_with(server.address)
    signed = TLSConfig(
        root_certificates=pki.ca, certificate_chain=pki.client_cert, private_key=pki.client_key
    )
    assert explain_with(server.address, tls=signed) >= 0


# ------------------------------------------------------------------------------ bearer token


def check_token_enforced(address: str, token: str, **client_options: Any) -> None:
    """Explain, ListModels and the stream need the token; health does not."""
    with Client(address=address, retry=None, timeout=10, **client_options) as anonymous:
        with pytest.raises(Unauthenticated, match="missing bearer token"):
            anonymous.explain(IMAGE)
        with pytest.raises(Unauthenticated):
            anonymous.models()
        with pytest.raises(Unauthenticated):
            list(anonymous.explain_many([IMAGE]))
        assert anonymous.health()
    wrong = Client(address=address, retry=None, timeout=10, token=token + "x", **client_options)
    with wrong, pytest.raises(Unauthenticated, match="invalid bearer token"):
        wrong.explain(IMAGE)
    with Client(address=address, retry=None, timeout=10, token=token, **client_options) as ok:
        assert ok.explain(IMAGE).top.index >= 0
        assert [model.name for model in ok.models()] == ["resnet18"]
        assert len(list(ok.explain_many([IMAGE, IMAGE]))) == 2


def test_bearer_token_from_settings(server_factory: ServerFactory, resnet18_weights: Path) -> None:
    server = server_factory(models=(small_resnet(resnet18_weights),), auth_token="s3cret")
    check_token_enforced(server.address, "s3cret")


def test_bearer_token_from_a_file_over_tls(
    server_factory: ServerFactory, resnet18_weights: Path, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file-7f3a\n")  # the trailing newline is not part of it
    server = server_factory(
        models=(small_resnet(resnet18_weights),),
        auth_token_file=str(token_file),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
    )
    check_token_enforced(
        server.address, "from-a-file-7f3a", tls=TLSConfig(root_certificates=pki.ca)
    )


# ------------------------------------------------------------------------------------ bind


def test_default_bind_is_loopback_only() -> None:
    assert Settings().host == "127.0.0.1"
    assert load_settings([], {}).host == "127.0.0.1"
