"""Local services on 127.0.0.1 (Prefect server, the deployments' serve process, MLflow UI).

`python -m mcdm.services start|stop NAME` is what `make prefect-up|prefect-down|mlflow-ui|mlflow-down`
call. Each service runs in its own session with a pid file and a log under ``--run-dir``; `stop`
signals exactly the process group of that pid (never a process found by name).

The Prefect server runs flows that execute commands in this checkout, so it answers only callers
that hold the checkout's secret: an auth string generated once per Prefect home (``<home>/auth``,
mode 0600, the folder 0700; the home is ``.prefect/`` of the checkout unless ``PREFECT_HOME`` says
otherwise, both git-ignored), required by the server (``PREFECT_SERVER_API_AUTH_STRING``) and sent by
every client we start (``PREFECT_API_AUTH_STRING``). CORS admits only the server's own origin and
CSRF protection is on (Prefect's clients fetch their token themselves). ``start prefect-server`` also
writes ``prefect.toml`` (0600, git-ignored) at the checkout's root, which the ``prefect`` CLI reads
when run from there; ``stop prefect-server`` removes it.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mcdm.errors import McdmError
from mcdm.tracking.store import tracking_uri

PROJECT_DIR = Path.cwd()


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


PREFECT_CLIENT_CONFIG = "prefect.toml"  # read by the `prefect` CLI from the directory it runs in
AUTH_USER = "mcdm"


def prefect_home(project_dir: Path) -> Path:
    return Path(os.environ.get("PREFECT_HOME") or project_dir / ".prefect")


def prefect_auth(project_dir: Path) -> str:
    """The auth string of this checkout's Prefect server: ``mcdm:<random>``, made on first use in
    ``<home>/auth`` (0600; the home 0700, so neither the secret nor the server's database is readable
    by other local users)."""
    home = prefect_home(project_dir)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    path = home / "auth"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
    return path.read_text().strip()


def prefect_client_env(port: int, project_dir: Path) -> dict[str, str]:
    """What a Prefect client of this checkout's server needs (the serve process, a worker, the CLI)."""
    return {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_API_AUTH_STRING": prefect_auth(project_dir),
            "PREFECT_HOME": str(prefect_home(project_dir))}


def prefect_server_env(port: int, project_dir: Path) -> dict[str, str]:
    """The server's settings: auth required, CORS limited to its own origin, CSRF protection on."""
    origins = f"http://127.0.0.1:{port},http://localhost:{port}"
    return {"PREFECT_HOME": str(prefect_home(project_dir)),
            "PREFECT_SERVER_API_AUTH_STRING": prefect_auth(project_dir),
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": origins,
            "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"}


def write_client_config(port: int, project_dir: Path) -> Path:
    """``prefect.toml`` at the checkout's root (0600): the CLI run from there finds the server and its secret."""
    env = prefect_client_env(port, project_dir)
    path = project_dir / PREFECT_CLIENT_CONFIG
    text = (f"# written by `make prefect-up` (mcdm.services); git-ignored: it holds the server's secret\n"
            f"[api]\nurl = \"{env['PREFECT_API_URL']}\"\nauth_string = \"{env['PREFECT_API_AUTH_STRING']}\"\n")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    path.chmod(0o600)
    return path


def service_command(name: str, port: int, project_dir: Path) -> tuple[list[str], dict[str, str], str]:
    """(argv, extra env, health URL or log marker) of a named service."""
    api = f"http://127.0.0.1:{port}/api"
    if name == "prefect-server":
        return ([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                prefect_server_env(port, project_dir), f"{api}/health")
    if name == "prefect-serve":
        return ([sys.executable, str(project_dir / "flows" / "serve.py")], prefect_client_env(port, project_dir),
                "log:deployments")
    if name == "mlflow-ui":
        return ([_bin("mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", tracking_uri(project_dir)], {}, f"http://127.0.0.1:{port}/health")
    raise McdmError(f"unknown service {name!r} (prefect-server, prefect-serve, mlflow-ui)")


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(check: str, log: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise McdmError(f"service exited with {proc.returncode}: {' | '.join(tail)}")
        if check.startswith("log:"):
            text = log.read_text(errors="replace") if log.exists() else ""
            if check[4:] in text.lower():
                return
        else:
            try:
                with urllib.request.urlopen(check, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    raise McdmError(f"service not ready after {timeout:.0f} s (see {log})")


def start(name: str, port: int, run_dir: Path, project_dir: Path = PROJECT_DIR, timeout: float = 120.0) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    pid_file = _pid_file(run_dir, name)
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"{name}: already running (pid {pid_file.read_text().strip()})")
        return int(pid_file.read_text())
    argv, extra, check = service_command(name, port, project_dir)
    log = run_dir / f"{name}.log"
    env = {**os.environ, **extra}
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, cwd=project_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid_file.write_text(str(proc.pid))
    try:
        wait_ready(check, log, proc, timeout)
    except McdmError:
        stop(name, run_dir)
        raise
    where = check if not check.startswith("log:") else f"log {log}"
    print(f"{name}: running (pid {proc.pid}, {where})")
    return proc.pid


def stop(name: str, run_dir: Path, timeout: float = 20.0) -> bool:
    pid_file = _pid_file(run_dir, name)
    if not pid_file.exists():
        print(f"{name}: not running (no pid file)")
        return False
    pid = int(pid_file.read_text())
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)  # the session we started: the service and its children
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    print(f"{name}: stopped (pid {pid})")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mcdm.services")
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("name")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--run-dir", default="run")
    args = p.parse_args(argv)
    try:
        if args.action == "start":
            start(args.name, args.port, Path(args.run_dir).resolve())
            if args.name == "prefect-server":  # `make prefect-up`: the CLI of this checkout finds the server
                print(f"{args.name}: the prefect CLI run from {PROJECT_DIR} reads "
                      f"{write_client_config(args.port, PROJECT_DIR)}")
        else:
            stop(args.name, Path(args.run_dir).resolve())
            if args.name == "prefect-server":
                (PROJECT_DIR / PREFECT_CLIENT_CONFIG).unlink(missing_ok=True)
    except McdmError as err:
        print(f"{args.name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
