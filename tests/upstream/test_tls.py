"""TLS to an upstream: verified against the trust store given, SNI and host name checked."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_aiohttp import AiohttpServer

from gateway.forward.upstream import UpstreamUnreachable
from tests.upstream.peers import PoolFactory, fetch


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def tls_server(aiohttp_server: AiohttpServer, tmp_path: Path
                     ) -> tuple[int, Path, list[int]]:
    cert_path, key_path = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    peers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(body=b"secure " + request.path.encode())

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, ssl=server_ctx)
    assert server.port is not None
    return server.port, cert_path, peers


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_tls_to_a_trusted_certificate(aiohttp_server: AiohttpServer, tmp_path: Path,
                                            make_pool: PoolFactory, host: str) -> None:
    port, cert_path, peers = await tls_server(aiohttp_server, tmp_path)
    pool = make_pool(ssl_context=ssl.create_default_context(cafile=str(cert_path)))
    for i in range(2):
        resp, body = await fetch(pool, f"https://{host}:{port}", f"/{i}")
        assert (resp.status, body) == (200, b"secure /%d" % i)
    assert len(peers) == 2 and len(set(peers)) == 1


async def test_tls_to_an_untrusted_certificate_is_unreachable(
        aiohttp_server: AiohttpServer, tmp_path: Path, make_pool: PoolFactory) -> None:
    port, _, peers = await tls_server(aiohttp_server, tmp_path)
    pool = make_pool(connect_timeout=2.0)
    started = time.monotonic()
    with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED") as caught:
        await fetch(pool, f"https://localhost:{port}")
    assert time.monotonic() - started < 1.0
    assert not isinstance(caught.value, ssl.SSLError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert peers == []
    assert pool.open_connections == 0
