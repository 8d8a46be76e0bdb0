"""
The package as a user gets it: a fresh virtual environment, `pip install`
of this checkout, and twistd finding the caps-broker plugin from anywhere.
"""

import os
import subprocess
import tempfile
import venv

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagingTests(SynchronousTestCase):
    def test_fresh_venv_finds_plugin(self):
        """After pip install . in a new venv, twistd lists caps-broker, run from another directory."""
        scratch = tempfile.TemporaryDirectory(prefix="caps-packaging-")
        self.addCleanup(scratch.cleanup)
        home = scratch.name
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
        self.assertEqual(install.returncode, 0, install.stderr.decode())
        listing = subprocess.run(
            [os.path.join(env_dir, "bin", "twistd"), "--help"],
            capture_output=True,
            cwd=home,
            env=env,
            timeout=120,
        )
        self.assertEqual(listing.returncode, 0, listing.stderr.decode())
        self.assertIn(b"caps-broker", listing.stdout)
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
        self.assertTrue(where.stdout.decode().startswith(env_dir), where)
