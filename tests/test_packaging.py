"""
The package as a user gets it: a fresh virtual environment, `pip install`
of this checkout, and twistd finding the caps-broker plugin from anywhere.

A module-level test, so pytest runs it and trial does not collect it: it
starts no broker, so trial's CAPS_JSON=stdlib changes nothing in it, and a
second run would only repeat the same 17-21 s venv and pip install.
"""

import os
import subprocess
import tempfile
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fresh_venv_finds_plugin():
    """After pip install . in a new venv, twistd lists caps-broker, run from another directory."""
    with tempfile.TemporaryDirectory(prefix="caps-packaging-") as home:
        env_dir = os.path.join(home, "venv")
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = os.path.join(env_dir, "bin", "python")
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")
        }
        install = subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                ROOT,
            ],
            capture_output=True,
            env=env,
            timeout=600,
        )
        assert install.returncode == 0, install.stderr.decode()
        listing = subprocess.run(
            [os.path.join(env_dir, "bin", "twistd"), "--help"],
            capture_output=True,
            cwd=home,
            env=env,
            timeout=120,
        )
        assert listing.returncode == 0, listing.stderr.decode()
        assert b"caps-broker" in listing.stdout
        where = subprocess.run(
            [
                python,
                "-c",
                "import twisted.plugins.caps_broker as p; print(p.__file__)",
            ],
            capture_output=True,
            cwd=home,
            env=env,
            timeout=120,
        )
        assert where.stdout.decode().startswith(env_dir), where
