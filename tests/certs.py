"""
Throwaway certificates for the TLS tests, made during the test run: a CA,
and a server key and certificate signed by it.  No private key is ever
committed.  EC keys (P-256) keep it fast: a few milliseconds each.
"""

import datetime
import ipaddress

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.python.filepath import FilePath

SERVER_NAMES = ("localhost", "127.0.0.1")


@attrs.frozen
class Certificates:
    """
    Paths (C{str}) of the PEM files L{make_certificates} wrote.

    @ivar ca_dir: a directory holding only the CA certificate, for
        C{tls:...:trustRoots=DIR}.
    """

    ca_cert: str
    ca_dir: str
    server_key: str
    server_cert: str


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _builder(subject, issuer, public_key, now):
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certificates(directory, names=SERVER_NAMES, ca_name="CAPS test CA"):
    """
    Write a new CA certificate, and a server key and certificate for
    C{names} (DNS names or IP addresses, as subjectAltNames) signed by that
    CA, into C{directory} (a L{FilePath} or a C{str}; created if needed).

    @return: their L{Certificates}.
    """
    directory = FilePath(directory) if isinstance(directory, str) else directory
    ca_dir = directory.child("ca")
    ca_dir.makedirs(ignoreExistingDirectory=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = _name(ca_name)
    ca_cert = (
        _builder(ca_subject, ca_subject, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(names[0]), ca_subject, key.public_key(), now)
        .add_extension(
            x509.SubjectAlternativeName([_alt_name(n) for n in names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_path = ca_dir.child("ca.pem")
    key_path = directory.child("server.key.pem")
    cert_path = directory.child("server.pem")
    ca_path.setContent(_pem(ca_cert))
    cert_path.setContent(_pem(cert))
    key_path.setContent(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Certificates(
        ca_cert=ca_path.path,
        ca_dir=ca_dir.path,
        server_key=key_path.path,
        server_cert=cert_path.path,
    )
