"""mTLS and tokens on a real loopback PS (server/auth.py): no credentials, no model, task or status."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from gradwire import protocol
from gradwire.channel import client_channel
from gradwire.protocol import SERVICE_NAME
from gradwire.status import fetch_status, is_serving
from gradwire.v1 import exchange_pb2 as pb
from gradwire.worker.config import WorkerConfig
from gradwire.worker.loop import Worker

TOKENS = {"w0": "token-of-worker-zero-0123456789", "w1": "token-of-worker-one-0123456789"}
ROOT = Path(__file__).resolve().parents[2]


def _make_certs(out: Path, workers=("w0", "w1")) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and one client certificate per worker."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)

    def issue(stem, cn, usage, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))

    issue("server", "ps", ExtendedKeyUsageOID.SERVER_AUTH,
          [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    for w in workers:
        issue(w, w, ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


@pytest.fixture
def certs(tmp_path) -> Path:
    return _make_certs(tmp_path)


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# worker_id:token\n" + "".join(f"{w}:{t}\n" for w, t in TOKENS.items()))
    return path


def _tls(certs: Path, who: str | None = "w0", token: str = "") -> dict:
    out = {"tls_ca": str(certs / "ca.pem"), "token": token}
    if who:
        out |= {"tls_cert": str(certs / f"{who}.pem"), "tls_key": str(certs / f"{who}.key")}
    return out


def _open_train(channel: grpc.Channel, worker_id: str):
    call = channel.stream_stream(f"/{SERVICE_NAME}/Train", request_serializer=pb.WorkerMessage.SerializeToString,
                                 response_deserializer=pb.ServerMessage.FromString)
    hello = pb.WorkerMessage(hello=pb.Hello(protocol=protocol.PROTOCOL, requested_worker_id=worker_id, codecs=["dense"]))
    return call(iter([hello]), timeout=10)


def _mtls_server(make_server, certs, token_file):
    return make_server(workers=2, rounds=2, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                       tls_ca=str(certs / "ca.pem"), token_file=str(token_file))


def test_workers_with_certificates_and_tokens_train_over_mutual_tls(make_server, certs, token_file):
    running = _mtls_server(make_server, certs, token_file)
    import threading

    results = {}

    def run(w):
        config = WorkerConfig(server=f"localhost:{running.port}", worker_id=w, connect_timeout_s=30,
                              **{k: v for k, v in _tls(certs, w, TOKENS[w]).items()})
        results[w] = Worker(config).run()

    threads = [threading.Thread(target=run, args=(w,)) for w in TOKENS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results[w].finished for w in TOKENS)
    assert running.summary()["rounds"] == 2


def test_without_a_client_certificate_the_tls_handshake_fails(make_server, certs, token_file):
    running = _mtls_server(make_server, certs, token_file)
    with client_channel(f"localhost:{running.port}", [], **_tls(certs, None, TOKENS["w0"])) as channel:
        with pytest.raises(grpc.RpcError) as err:
            fetch_status(channel, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            next(_open_train(channel, "w0"))


def test_a_certificate_without_a_token_gets_unauthenticated_and_nothing_else(make_server, certs, token_file):
    running = _mtls_server(make_server, certs, token_file)
    with client_channel(f"localhost:{running.port}", [], **_tls(certs, "w0")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            fetch_status(channel, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = _open_train(channel, "w0")
        with pytest.raises(grpc.RpcError) as err:
            next(replies)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert is_serving("", SERVICE_NAME, channel=channel)  # health stays open: it tells nothing more
    assert not running.engine.records


def test_a_wrong_token_is_refused_and_an_id_cannot_be_squatted(make_server, certs, token_file):
    running = _mtls_server(make_server, certs, token_file)
    with client_channel(f"localhost:{running.port}", [], **_tls(certs, "w0", "not-a-token-of-anyone-000")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            fetch_status(channel, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # w1's own token over w0's certificate, or w0's credentials asking for w1's id: refused
    for who, token, asked in (("w0", TOKENS["w0"], "w1"), ("w0", TOKENS["w1"], "w1")):
        with client_channel(f"localhost:{running.port}", [], **_tls(certs, who, token)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                next(_open_train(channel, asked))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert not running.engine.records


def test_a_shared_token_without_tls_on_loopback(make_server):
    running = make_server(workers=1, rounds=1, token="a-shared-token-0123456789")
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            fetch_status(channel, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with client_channel(f"127.0.0.1:{running.port}", [], token="a-shared-token-0123456789") as channel:
        assert fetch_status(channel, timeout=5).protocol == protocol.PROTOCOL
    assert "a-shared-token" not in running.engine.config.to_json()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_gen_certs_script_makes_certificates_the_ps_and_a_worker_accept(make_server, tmp_path, token_file):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_certs.sh"), str(tmp_path / "c"), "ps", "w0"], check=True,
                   capture_output=True)
    certs = tmp_path / "c"
    running = _mtls_server(make_server, certs, token_file)
    with client_channel(f"localhost:{running.port}", [], **_tls(certs, "w0", TOKENS["w0"])) as channel:
        assert fetch_status(channel, timeout=5).protocol == protocol.PROTOCOL


def test_with_credentials_on_the_unauthenticated_metrics_endpoint_must_listen_on_loopback():
    from gradwire.server.auth import AuthError
    from gradwire.server.config import ServerConfig

    with pytest.raises(AuthError, match="bind it to 127.0.0.1"):
        ServerConfig(token="a-shared-token-0123456789", metrics_address="0.0.0.0:9100")
    assert ServerConfig(token="a-shared-token-0123456789", metrics_address="127.0.0.1:9100")
    assert ServerConfig(metrics_address="0.0.0.0:9100")  # no credentials: as before


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_compose_credentials_the_shared_worker_cert_the_token_file_and_the_ps_cert_as_a_client(make_server, tmp_path):
    """What docker-compose.tls.yml mounts (`gen_certs.sh DIR ps worker`): workers share a certificate
    and read the token from the file GRADWIRE_TOKEN_FROM names; `gradwire bytes` asks for Status inside
    the PS container with the PS's own certificate, so that certificate must work as a client's too."""
    import os
    import sys

    from gradwire.bytes_report_docker import _STATUS_SNIPPET

    certs = tmp_path / "c"
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_certs.sh"), str(certs), "ps", "worker"], check=True,
                   capture_output=True)
    token = (certs / "token").read_text().strip()
    assert len(token) == 64 and (certs / "server.key").stat().st_mode & 0o077 == 0
    running = make_server(workers=2, rounds=2, tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"),
                          tls_ca=str(certs / "ca.pem"), token=token)
    address = f"127.0.0.1:{running.port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_")}
    for who in ("worker", "server"):
        env |= {"GRADWIRE_TLS_CA": str(certs / "ca.pem"), "GRADWIRE_TLS_CERT": str(certs / f"{who}.pem"),
                "GRADWIRE_TLS_KEY": str(certs / f"{who}.key"), "GRADWIRE_TOKEN_FROM": str(certs / "token")}
        done = subprocess.run([sys.executable, "-c", _STATUS_SNIPPET, address], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (who, done.stderr[-2000:])
        assert '"protocol": "gradwire.v1"' in done.stdout
    env.pop("GRADWIRE_TOKEN_FROM")  # a certificate alone is not enough
    done = subprocess.run([sys.executable, "-c", _STATUS_SNIPPET, address], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "UNAUTHENTICATED" in done.stderr


def test_the_token_comes_from_gradwire_token_or_the_file_gradwire_token_from(tmp_path, monkeypatch):
    from gradwire.channel import AuthError, token_from_environment

    monkeypatch.delenv("GRADWIRE_TOKEN", raising=False)
    monkeypatch.delenv("GRADWIRE_TOKEN_FROM", raising=False)
    assert token_from_environment() == ""
    (tmp_path / "token").write_text("from-the-file-0123456789\n")
    monkeypatch.setenv("GRADWIRE_TOKEN_FROM", str(tmp_path / "token"))
    assert token_from_environment() == "from-the-file-0123456789"
    monkeypatch.setenv("GRADWIRE_TOKEN", "from-the-environment-0123")
    assert token_from_environment() == "from-the-environment-0123"
    monkeypatch.delenv("GRADWIRE_TOKEN")
    monkeypatch.setenv("GRADWIRE_TOKEN_FROM", str(tmp_path / "missing"))
    with pytest.raises(AuthError, match="cannot read the token"):
        token_from_environment()
