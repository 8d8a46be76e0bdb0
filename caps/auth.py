"""
Logging in, with twisted.cred: the password file's hashes, the checker
that reads it, and the realm that turns a clientId into its permissions.

A password file has one line per client, C{clientId:hash}; the hash is
C{scrypt$N$r$p$salt$key} (salt and key in base64).  scrypt is in Python's
standard library (no compiled dependency to install), is memory-hard (a
guesser's GPU gains little), and keeps its cost parameters in every entry,
so they can be raised later without invalidating the old ones.  bcrypt
would need a package and ignores everything past a password's 72nd byte.
"""

import base64
import hashlib
import hmac
import os
import secrets

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import threads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, classImplements, implementer

from caps.acl import Permissions
from caps.frames import NAME

# scrypt's cost: 2**14 rounds of 8 x 1 KiB blocks: 16 MiB and about 40 ms
# a check on this machine (the parameters RFC 7914 and OWASP suggest).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
KEY_BYTES = 32
SALT_BYTES = 16
SCHEME = "scrypt"


class PasswordFileError(Exception):
    """
    A password file that cannot be read or has a malformed line.
    """


def hash_password(password, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P):
    """
    The stored form of C{password} (a str), with a fresh random salt.
    """
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, n, r, p)
    return "$".join((SCHEME, str(n), str(r), str(p), _b64(salt), _b64(key)))


def check_password(password, stored):
    """
    Whether C{password} (bytes) matches the stored hash C{stored}; C{False}
    for a malformed hash.  Takes as long as scrypt does: run it off the
    reactor thread.
    """
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != SCHEME:
            return False
        salt = base64.b64decode(salt, validate=True)
        key = base64.b64decode(key, validate=True)
        actual = _scrypt(password, salt, int(n), int(r), int(p), len(key))
    except ValueError:
        return False
    return hmac.compare_digest(actual, key)


def _scrypt(password, salt, n, r, p, length=KEY_BYTES):
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=256 * 1024 * 1024
    )


def _b64(data):
    return base64.b64encode(data).decode("ascii")


# Checked against when a clientId has no entry, so that an unknown
# clientId takes as long to refuse as a wrong password.
_DUMMY = hash_password(secrets.token_hex(16))


def parse_password_file(text, where="password file"):
    """
    The entries of a password file: clientId -> stored hash.

    @raise PasswordFileError: for a line that is not C{clientId:hash}.
    """
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # clientIds may hold ":", hashes never do.
        client_id, sep, stored = line.rpartition(":")
        if not sep or not NAME.match(client_id) or not stored.startswith(SCHEME + "$"):
            raise PasswordFileError(
                f"{where}, line {number}: not clientId:{SCHEME}$... "
                "(make entries with python -m caps.passwd)"
            )
        entries[client_id] = stored
    return entries


def read_password_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return parse_password_file(f.read(), where=str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise PasswordFileError(f"cannot read password file {path}: {e}") from None


@implementer(ICredentialsChecker)
class PasswordFile:
    """
    Checks clientIds and passwords against a file of scrypt hashes.  The
    file is read again when it changes, so C{python -m caps.passwd} takes
    effect without a restart; if it becomes unreadable or malformed, the
    entries last read stay in use (and the problem is logged).

    @param check: runs L{check_password} and returns a L{Deferred} of its
        result; by default in the reactor's thread pool.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, path, check=None):
        self.path = path
        self._check = check or (
            lambda password, stored: threads.deferToThread(
                check_password, password, stored
            )
        )
        self._stamp = None
        self._entries = read_password_file(path)
        self._stamp = self._stat()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self):
        stamp = self._stat()
        if stamp is not None and stamp != self._stamp:
            try:
                self._entries = read_password_file(self.path)
            except PasswordFileError as e:
                self.log.error(
                    "{problem}; keeping the entries read before", problem=str(e)
                )
            self._stamp = stamp
        return self._entries

    def requestAvatarId(self, credentials):
        username = credentials.username
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        stored = self._current().get(username)
        d = self._check(password, stored or _DUMMY)

        def checked(ok):
            if ok and stored is not None:
                return username.encode("utf-8")
            raise UnauthorizedLogin("wrong clientId or password")

        return d.addCallback(checked)


class IClient(Interface):
    """
    A logged-in client: its clientId and what it may do (a
    L{caps.acl.Permissions}).
    """

    client_id = Attribute("the clientId it logged in as")

    def publish_refusal(event, to):
        """
        Why it may not publish C{event} to C{to}, or L{None}.
        """

    def consume_refusal(client_id, event):
        """
        Why it may not consume (C{client_id}, C{event}), or L{None}.
        """


@implementer(IRealm)
class Realm:
    """
    Gives each logged-in clientId its permissions from the ACL.

    @param acl: a L{caps.acl.ACL} or L{caps.acl.OpenACL}.
    """

    def __init__(self, acl):
        self.acl = acl

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IClient not in interfaces:
            raise NotImplementedError("CAPS knows only IClient avatars")
        client_id = (
            avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        )
        if not NAME.match(client_id):
            # A checker (unix:, say) accepted a name that is no clientId.
            raise UnauthorizedLogin(f"{client_id!r} is not a clientId")
        return IClient, self.acl.permissions(client_id), _logout


def _logout():
    pass


classImplements(Permissions, IClient)
