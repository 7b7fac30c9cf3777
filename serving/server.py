"""Run the real ``tritonserver`` shipped in the nvidia-pytriton wheel, or attach to an external Triton.

Why each piece of the launch is there (shared NOTES.md):
- the Python-backend stub links the system ``libpython``; ``LD_LIBRARY_PATH`` starts with the running
  interpreter's LIBDIR so the stub gets the same Python, then ``nvidia_pytriton.libs``;
- ``PYTHONPATH`` lists the venv's site-packages and the repository root: the editable install of kdops
  is a ``.pth`` import finder, which PYTHONPATH entries do not process;
- the backend directory is built per server in its work dir (links + the stub for this Python copied
  in), so the installed wheel is never modified;
- ``--disable-auto-complete-config``: configs are complete, and auto-complete would start an extra stub
  per load (~5 s of CPU on 2 cores);
- the model-repository API (load/unload/index) requires a header key, so whoever can reach the
  inference port cannot load code.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

from kdops.proc import die_with_parent, free_port

ADMIN_HEADER = "kdops-admin-key"


class ServerError(RuntimeError):
    """The server could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServerConfig:
    repository: str = field(default="", metadata={"help": "Model repository directory (required)."})
    url: str = field(default="", metadata={"help": "Attach to this external Triton (host:port, HTTP) instead of starting one."})
    grpc_url: str = field(default="", metadata={"help": "gRPC host:port of the attached Triton (model control goes there)."})
    admin_key: str = field(default="", metadata={"help": "Key for the model-control API; empty: a random one (embedded) or $KDOPS_TRITON_ADMIN_KEY."})
    http_port: int = field(default=0, metadata={"help": "HTTP port (0: a free one)."})
    grpc_port: int = field(default=0, metadata={"help": "gRPC port (0: a free one)."})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus metrics port (0: a free one)."})
    log_file: str = field(default="", metadata={"help": "Server log file (empty: <work dir>/tritonserver.log)."})
    log_verbose: int = field(default=0, metadata={"help": "Triton --log-verbose level (1 shows load timings)."})
    startup_timeout_s: float = field(default=60.0, metadata={"help": "Seconds to wait for the server to be live."})
    exit_timeout_s: int = field(default=10, metadata={"help": "Seconds Triton waits for in-flight requests on stop."})
    load_models: tuple[str, ...] = field(default=(), metadata={"help": "Models to load at start-up."})
    extra_args: tuple[str, ...] = field(default=(), metadata={"help": "Further tritonserver flags, verbatim."})

    def __post_init__(self) -> None:
        if not self.repository and not self.url:
            raise ValueError("ServerConfig needs a repository (embedded) or a url (attach).")


def _site_dir() -> Path:
    dist = metadata.distribution("nvidia-pytriton")
    return Path(dist.locate_file("pytriton")).parent


def triton_paths() -> dict[str, Path]:
    """Locations inside the installed nvidia-pytriton wheel."""
    site = _site_dir()
    root = site / "pytriton" / "tritonserver"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {"bin": root / "bin" / "tritonserver", "python_backend": root / "backends" / "python",
             "stub": root / "python_backend_stubs" / py / "triton_python_backend_stub",
             "libs": site / "nvidia_pytriton.libs", "site": site}
    for k in ("bin", "stub", "libs"):
        if not paths[k].exists():
            raise ServerError(f"nvidia-pytriton is missing {paths[k]} (Python {py} supported?)")
    return paths



def server_env(paths: dict[str, Path]) -> dict[str, str]:
    import kdops

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [libdir, str(paths["libs"]), env.get("LD_LIBRARY_PATH", "")] if p)
    repo_root = str(Path(kdops.__file__).resolve().parent.parent)
    site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env["PYTHONPATH"] = ":".join([repo_root, *sorted(site), env.get("PYTHONPATH", "")]).rstrip(":")
    # The stub embeds Python in isolated mode (PYTHONPATH ignored, measured) and finds its prefix by
    # looking up "python3" on PATH: with this venv's bin/ first, getpath reads its pyvenv.cfg and the
    # stub gets this venv's site-packages (numpy 1.x, torch) instead of the base interpreter's.
    env["PATH"] = ":".join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class TritonServer:
    """An embedded tritonserver process (or an attached external one); a context manager.

    ``url`` is ``127.0.0.1:<http port>``; ``admin_headers`` go with every model-control call.
    """

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.admin_key = cfg.admin_key or os.environ.get("KDOPS_TRITON_ADMIN_KEY", "") or secrets.token_urlsafe(24)
        self.url = cfg.url
        self.grpc_url = cfg.grpc_url
        self.metrics_url = ""
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._ports: list[int] = []  # kept across a restart: clients and deployments hold the URLs

    @property
    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: self.admin_key}

    @property
    def repository(self) -> Path:
        return Path(self.cfg.repository).resolve()

    def _backend_dir(self, paths) -> Path:
        bdir = self.workdir / "backends" / "python"
        bdir.mkdir(parents=True)
        for f in paths["python_backend"].iterdir():
            if f.is_file():
                (bdir / f.name).symlink_to(f)
        shutil.copy2(paths["stub"], bdir / "triton_python_backend_stub")
        return bdir.parent

    def command(self) -> list[str]:
        paths = triton_paths()
        ports = self._ports or [self.cfg.http_port or free_port(), self.cfg.grpc_port or free_port(),
                                self.cfg.metrics_port or free_port()]
        self._ports = ports
        self.url, self.grpc_url = f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
        self.metrics_url = f"127.0.0.1:{ports[2]}"
        restricted = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
        cmd = [str(paths["bin"]), f"--model-repository={self.repository}", "--model-control-mode=explicit",
               "--disable-auto-complete-config", f"--backend-directory={self._backend_dir(paths)}",
               "--http-address=127.0.0.1", f"--http-port={ports[0]}",
               "--grpc-address=127.0.0.1", f"--grpc-port={ports[1]}",
               "--metrics-address=127.0.0.1", f"--metrics-port={ports[2]}",
               f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
               f"--log-file={self.log_path}", f"--log-verbose={self.cfg.log_verbose}",
               f"--exit-timeout-secs={self.cfg.exit_timeout_s}", "--strict-readiness=false"]
        cmd += [f"--load-model={m}" for m in self.cfg.load_models]
        return cmd + list(self.cfg.extra_args)

    def start(self) -> "TritonServer":
        if self.cfg.url:  # attach: nothing to start, just check it answers
            self.wait_live()
            return self
        if self.proc is not None:
            raise ServerError("server already started")
        self.repository.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="kdops-triton-"))
        self.log_path = Path(self.cfg.log_file).resolve() if self.cfg.log_file else self.workdir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        out = open(self.workdir / "stdout.log", "ab")
        # Own session: stop() can signal the server and its stubs together, and nothing else. The kernel
        # sends SIGTERM if this process dies without running stop() (a SIGKILL leaves no orphan server).
        self.proc = subprocess.Popen(cmd, env=server_env(triton_paths()), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=die_with_parent)
        out.close()
        try:
            self.wait_live()
        except ServerError:
            self.stop()
            raise
        return self

    @property
    def died(self) -> bool:
        """An embedded server whose process has exited without ``stop()``."""
        return self.proc is not None and self.proc.poll() is not None

    def restart(self, models: Sequence[str] = ()) -> float:
        """Start a dead (or live) embedded server again on the same ports and repository, then load ``models``
        (explicit model control: a fresh server serves nothing); returns the seconds it took."""
        if self.cfg.url:
            raise ServerError("an attached Triton is not ours to restart")
        t0 = time.monotonic()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stubs the dead server left behind hold the ports
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for _ in range(50):  # the killed server's sockets may linger a moment
            if all(_port_free(p) for p in self._ports):
                break
            time.sleep(0.2)
        self.start()
        from serving.client import ServingClient

        client = ServingClient(self.url, admin_key=self.admin_key, grpc_url=self.grpc_url)
        for m in models:
            client.load(m)
        return time.monotonic() - t0

    def wait_live(self) -> None:
        import urllib.request

        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/live", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServerError(f"Triton at {self.url} not live after {self.cfg.startup_timeout_s:.0f} s; {self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        texts = []
        for p in (self.log_path, self.workdir / "stdout.log" if self.workdir else None):
            if p and p.exists():
                texts.append("\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(texts)

    def pids(self) -> list[int]:
        """The server and its stub processes (for memory measurements)."""
        if self.proc is None:
            return []
        out = subprocess.run(["ps", "-o", "pid=", "-s", str(self.proc.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.cfg.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session only
                self.proc.wait(timeout=10)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
