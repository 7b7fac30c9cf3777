"""A throwaway PostgreSQL cluster for tests: ``initdb`` in a temporary directory, ``pg_ctl start`` on a free
loopback port with its unix socket in the same directory, one database per name, then ``pg_ctl stop`` and the
directory removed. The server refuses to run as root, so under root every command runs as the ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from kdops.proc import free_port

PG_BIN = Path(os.environ.get("KDOPS_PG_BIN", "/usr/lib/postgresql/15/bin"))


def missing() -> str:
    """Why no cluster can be started here ('' when one can)."""
    if not all((PG_BIN / b).is_file() for b in ("initdb", "pg_ctl", "postgres", "createdb")):
        return f"PostgreSQL server binaries not found in {PG_BIN} (set KDOPS_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' OS user to run the server as"
    return ""


class PostgresCluster:
    """Superuser ``postgres``, a random password over TCP (scram-sha-256); trust only on the private socket."""

    def __init__(self, databases: tuple[str, ...] = ()):
        self.databases, self.port, self.password = databases, free_port(), secrets.token_hex(16)
        self.root: Path | None = None

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL: ``postgresql`` (psycopg2, MLflow) or ``postgresql+asyncpg`` (Prefect)."""
        return f"{driver}://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        out = subprocess.run([*as_postgres, *cmd], cwd=self.root, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr[-2000:]}")

    def start(self) -> "PostgresCluster":
        # not pytest's tmp_path: its parents are root-only (0700), which the postgres user cannot traverse
        self.root = Path(tempfile.mkdtemp(prefix="kdops-pg-"))
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        data = self.root / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                  "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}")
        pwfile.unlink()
        # a throwaway cluster: durability settings off, it is removed at the end anyway
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(self.root / "server.log"),
                  "-w", "-t", "60", "-o", opts, "start")
        for name in self.databases:
            self._run(str(PG_BIN / "createdb"), "-h", str(self.root), "-p", str(self.port), "-U", "postgres",
                      name)
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60",
                          "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
