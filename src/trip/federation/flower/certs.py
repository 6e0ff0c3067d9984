"""`trip flower certs DIR`: what a TLS federation with SuperNode authentication needs, made with `cryptography`:

- ca.crt, ca.key: a private certificate authority (give ca.crt to every SuperNode and `flwr` user);
- server.pem, server.key: the SuperLink's certificate, signed by the CA, valid for localhost, 127.0.0.1 and
  the given hosts (the names the SuperNodes use to reach the SuperLink);
- node<i>.key, node<i>.pub: one EC P-384 key pair per SuperNode in OpenSSH format (Flower's format); the
  public key is registered with `flwr supernode register node<i>.pub`, the private key stays at the site.

Existing files are never overwritten unless asked (`force`): a new CA or new node keys lock every SuperNode out."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trip.errors import TripError

DAYS = 365


def make_certs(folder: Path, hosts: list[str], nodes: int, force: bool = False) -> list[Path]:
    """Write the CA, the SuperLink certificate and `nodes` SuperNode key pairs; the files written."""
    if folder.is_file():
        raise TripError(f"{folder} is a file: give `trip flower certs` a folder (it makes it if needed)")
    names = ["ca.crt", "ca.key", "server.pem", "server.key",
             *(f"node{i}.{ext}" for i in range(nodes) for ext in ("key", "pub"))]
    links = [name for name in names if (folder / name).is_symlink()]
    if links:  # even a dangling one: writing through it would put a private key outside the folder
        raise TripError(f"{folder} holds symbolic links {', '.join(links)}: `trip flower certs` writes its keys only "
                        f"as files of their own in the folder; remove the links (or choose another folder)")
    existing = [name for name in names if (folder / name).exists()]
    if existing and not force:
        raise TripError(f"{folder} already holds {', '.join(existing)}: new ones would lock out the SuperNodes "
                        f"that use them; choose another folder, or pass --force to replace them")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _make(folder, hosts, nodes)
    except OSError as err:
        raise TripError(f"cannot write the certificates into {folder} ({err.strerror}: {err.filename}): choose "
                        f"a writable folder") from None


def _make(folder: Path, hosts: list[str], nodes: int) -> list[Path]:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("trip federation CA", ca_key.public_key(), ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("trip SuperLink", server_key.public_key(), ca_key, ca_cert, sans=_sans(hosts))
    written = [_write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
               _write(folder / "ca.key", _pem_key(ca_key), private=True),
               _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
               _write(folder / "server.key", _pem_key(server_key), private=True)]
    for i in range(nodes):
        written += node_keys(folder / f"node{i}.key")
    return written


def node_keys(private_path: Path) -> list[Path]:
    """An EC P-384 SuperNode key pair: `private_path` and the public key beside it (.pub), OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [_write(private_path, private, private=True), _write(private_path.with_suffix(".pub"), public + b"\n")]


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(name: str, public_key, signer: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 ca: bool = False, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    if sans:
        builder = (builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW  # a link put there since the check is refused
    fd = os.open(path, flags, 0o600 if private else 0o644)  # never readable
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        path.chmod(0o600)  # a file --force replaces keeps its old mode otherwise
    return path
