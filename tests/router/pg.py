"""A throwaway PostgreSQL cluster for tests: Debian's ``postgresql`` binaries
(``/usr/lib/postgresql/*/bin``; ``./dev setup`` installs the package where it may), a data
directory in a temporary folder, TCP on a free loopback port, trust authentication.
PostgreSQL refuses to run as root, so as root the cluster runs as ``nobody`` (``runuser``).
:func:`why_not` says why a cluster cannot start here (tests skip with that reason)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from tests.router.servers import free_port


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def why_not() -> str | None:
    """None when a cluster can be started, else the reason."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return ("PostgreSQL's server binaries are not installed (apt-get install postgresql; "
                "./dev setup does it where it may)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


class Cluster:
    """``start()`` a cluster, ``database()`` a fresh database URL in it, ``stop()``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="archroute-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout)[-800:]}")

    def start(self) -> Cluster:
        if self.as_user:
            shutil.chown(self.base, "nobody")
        self._run(pg_bin("initdb") or "initdb", "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-l",
                  str(self.base / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1", "start")
        return self

    def database(self) -> str:
        """A new, empty database's URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        try:
            self._run(pg_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-m", "fast", "-w",
                      "stop", timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def started_cluster():
    """A started throwaway cluster for a fixture to yield, stopped afterwards; the test is
    skipped, saying why, where none can start (no server binaries, or it did not come up)."""
    import pytest

    why = why_not()
    if why is not None:
        pytest.skip(why)
    c = Cluster()
    try:
        c.start()
    except (RuntimeError, OSError, TimeoutError) as exc:
        c.stop()
        pytest.skip(f"PostgreSQL did not start: {exc}")
    try:
        yield c
    finally:
        c.stop()
