"""
Add, change or delete a client's entry in a password file (for
C{twistd caps-broker --auth file:FILE}):

    python -m caps.passwd passwords.txt acme-widgets     # asks twice
    printf 's3cret\\n' | python -m caps.passwd --stdin passwords.txt acme-widgets
    python -m caps.passwd --delete passwords.txt acme-widgets

The file is replaced in one step (a reader never sees half of it) and is
readable by its owner only.
"""

import getpass
import os
import sys
import tempfile

from twisted.python import usage

from caps.auth import PasswordFileError, hash_password, read_password_file
from caps.frames import NAME

MIN_PASSWORD = 8


class Options(usage.Options):
    synopsis = "[--stdin | --delete] FILE CLIENTID"
    optFlags = [
        ["stdin", None, "Read the password from the first line of standard input."],
        ["delete", "d", "Remove CLIENTID's entry."],
    ]

    def parseArgs(self, path, client_id):
        if not NAME.match(client_id):
            raise usage.UsageError(f"{client_id!r} is not a valid clientId")
        self["path"] = path
        self["client_id"] = client_id

    def postOptions(self):
        if self["stdin"] and self["delete"]:
            raise usage.UsageError("--stdin and --delete do not go together")


def read_password(options, stdin=sys.stdin):
    if options["stdin"]:
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {options['client_id']}: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("caps.passwd: the passwords differ; nothing changed")
    if len(password) < MIN_PASSWORD:
        raise SystemExit(
            f"caps.passwd: a password needs at least {MIN_PASSWORD} characters"
        )
    return password


def update(path, client_id, stored):
    """
    Set C{client_id}'s entry to C{stored} (remove it if L{None}), keeping
    every other line as it was.

    @return: whether the file had an entry for C{client_id}.
    """
    if os.path.exists(path):
        read_password_file(path)  # refuse to rewrite a malformed file
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = []
    kept = [line for line in lines if line.strip().rpartition(":")[0] != client_id]
    found = len(kept) != len(lines)
    if stored is not None:
        kept.append(f"{client_id}:{stored}")
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".caps-passwd-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return found


def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit(f"{options}\nerror: {e}") from None
    path, client_id = options["path"], options["client_id"]
    try:
        if options["delete"]:
            if not update(path, client_id, None):
                raise SystemExit(f"caps.passwd: {path} has no entry for {client_id}")
            stdout.write(f"deleted {client_id} from {path}\n")
            return
        password = read_password(options, stdin)
        found = update(path, client_id, hash_password(password))
    except PasswordFileError as e:
        raise SystemExit(f"caps.passwd: {e}") from None
    stdout.write(f"{'changed' if found else 'added'} {client_id} in {path}\n")


if __name__ == "__main__":
    main()
