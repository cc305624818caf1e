"""Stage scripts run by forking a process that has already imported torch, transformers, peft and TRL.

`python stages/sft.py` spends about 7 s of CPU importing those libraries before its first line runs, and the
stage and DVC tests start several hundred such scripts. A test worker therefore keeps a fork server
(`python -m tests.warm SOCKET`) that has imported the libraries the stages import (tests/stage_imports.py) and
then only forks: a client sends it a command line, working directory, environment and its three standard
streams (as file descriptors over a Unix socket); the forked child takes them and does what the interpreter
would with the same command: it puts the script's folder first on sys.path, runs the script as `__main__`, and
ends as a script ends (non-daemon threads joined, atexit handlers run, an uncaught exception printed as a
traceback with status 1, SystemExit's code otherwise), sending the status back.

Two clients: `run()` in tests/conftest.py (and `qatune` in the chat tests), for the commands tests start
themselves; and a `python` first on PATH (`shim_dir()`), for the commands DVC starts from dvc.yaml. The server
never runs a torch operation, so no OpenMP or tokenizer thread pool exists when it forks, and it imports no
qatune module, so a stage's code digest covers what the stage imported. Libraries read some variables when they
are imported (HF_HUB_OFFLINE, WANDB_MODE, HF_HOME, ...), so each environment, less what a shell, pytest or DVC
adds (PWD, SHLVL, PYTEST_CURRENT_TEST, DVC_*), has its own server, started in it on first use (at most
MAX_SERVERS per worker). QATUNE_TEST_SUBPROCESS=1 turns the forking off.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOCKET_VAR, ENV_VAR, PYTHON_VAR = "QATUNE_WARM_SOCKET", "QATUNE_WARM_ENV", "QATUNE_WARM_PYTHON"
# Set by a shell, pytest, or torch when something imports its compiler (the server's imports set it too).
IGNORED = ("PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")
IGNORED += (SOCKET_VAR, ENV_VAR, PYTHON_VAR)

# The `python` DVC finds first on PATH: stdlib only, started with -IS (~20 ms). A `python SCRIPT.py ...`
# whose environment is the server's goes to the server; anything else becomes the real interpreter.
SHIM = """#!{python} -IS
import hashlib, json, os, socket, struct, sys
real = os.environ["{python_var}"]
args = sys.argv[1:]
def same_env():
    env = {{k: v for k, v in os.environ.items() if k not in {ignored!r} and not k.startswith("DVC_")}}
    text = json.dumps(env, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest() == os.environ.get("{env_var}")
if args and args[0].endswith(".py") and not args[0].startswith("-") and same_env():
    try:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(os.environ["{socket_var}"])
    except OSError:
        conn = None
    if conn is not None:
        msg = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(msg)) + msg], [0, 1, 2])
        status = conn.recv(4)
        os._exit(struct.unpack("!i", status)[0] if len(status) == 4 else 1)
os.execv(real, [real, *args])
"""


def env_key(env: dict[str, str]) -> str:
    kept = {k: v for k, v in env.items() if k not in IGNORED and not k.startswith("DVC_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


MAX_SERVERS = 2  # per test worker, each ~0.6 GB: the tests' environment and the latest other one


def _write_shim(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(
        SHIM.format(
            python=sys.executable,
            python_var=PYTHON_VAR,
            env_var=ENV_VAR,
            socket_var=SOCKET_VAR,
            ignored=IGNORED,
        )
    )
    shim.chmod(0o755)
    return folder


_bin: Path | None = None


def shim_dir() -> Path:
    """This worker's folder with the `python` shim, first on the commands' PATH."""
    global _bin
    if _bin is None:
        _bin = _write_shim(Path(tempfile.mkdtemp(prefix="qatune-warm-")) / "bin")
    return _bin


class Server:
    """A fork server for one environment: its socket and process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qatune-warm-"))
        self.socket = str(self.dir / "s")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.warm", self.socket], cwd=ROOT, env=env, stdin=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"the warm test server did not start ({self.proc.returncode})")
            time.sleep(0.05)
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def call(self, argv: list[str], cwd: Path, env: dict[str, str], fds: list[int]) -> int:
        msg = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(self.socket)
            socket.send_fds(conn, [struct.pack("!I", len(msg)) + msg], fds)
            status = conn.recv(4)
        return struct.unpack("!i", status)[0] if len(status) == 4 else -signal.SIGKILL


_servers: dict[str, Server] = {}  # by env_key, least recently used first
_failed = False


def enabled() -> bool:
    return os.environ.get("QATUNE_TEST_SUBPROCESS") != "1"


def prepare(env: dict[str, str]) -> dict[str, str]:
    """`env` for a test's command, with a server for exactly that environment (started on first use, the least
    recently used one closed beyond MAX_SERVERS) and its `python` first on PATH, so that DVC's
    `python stages/...` is forked too."""
    global _failed
    if not enabled() or _failed:
        return env
    base = {k: v for k, v in env.items() if k not in (SOCKET_VAR, ENV_VAR, PYTHON_VAR)}
    out = {**base, "PATH": f"{shim_dir()}{os.pathsep}{base['PATH']}"}
    key = env_key(out)
    server = _servers.pop(key, None)
    if server is None:
        while len(_servers) >= MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        try:
            server = Server(out)
        except RuntimeError as err:  # every command then runs as a new process: slower, the same results
            print(f"tests/warm.py: {err}; running scripts as new processes", file=sys.stderr)
            _failed = True
            return env
    _servers[key] = server
    return out | {SOCKET_VAR: server.socket, ENV_VAR: key, PYTHON_VAR: sys.executable}


def script_argv(cmd: list[str]) -> list[str] | None:
    """The script and its arguments: `python SCRIPT.py ...`, or a console script of this environment (its
    `qatune`); None for anything else."""
    if len(cmd) >= 2 and cmd[0] == sys.executable:
        return cmd[1:] if cmd[1].endswith(".py") and not cmd[1].startswith("-") else None
    exe = Path(cmd[0]) if cmd else None
    if exe and exe.parent == Path(sys.executable).parent and exe.is_file():
        with open(exe, "rb") as f:
            first = f.readline()
        return cmd if first.startswith(b"#!") and b"python" in first else None
    return None


def forkable(cmd: list[str], env: dict[str, str]) -> bool:
    return script_argv(cmd) is not None and env.get(ENV_VAR) in _servers and env_key(env) == env[ENV_VAR]


def run_script(
    cmd: list[str], cwd: Path, env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess:
    """`cmd` forked by the server; what subprocess.run(capture_output=True, text=True, input=input) gives."""
    server, argv = _servers[env[ENV_VAR]], script_argv(cmd)
    assert argv is not None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given:
        given.write((input or "").encode())
        given.seek(0)
        code = server.call(argv, cwd, env, [given.fileno(), out.fileno(), err.fileno()])
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
    return subprocess.CompletedProcess(cmd, code, *texts)


# --------------------------------------------------------------------------- the server


def _child(conn: socket.socket, request: dict, fds: list[int], imported: dict[str, str]) -> None:
    import runpy
    import threading
    import traceback

    for fd, target in zip((0, 1, 2), fds, strict=True):
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(
        {**imported, **request["env"]}
    )  # what the imports set, as they would have in a new process
    script, *args = request["argv"]
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    path = os.path.abspath(script)
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")  # __file__ absolute, as Python sets it
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:
        tb = exc.__traceback__  # from the script's own frame on, as the interpreter prints it (no runpy)
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        code = 1
    try:
        threading._shutdown()  # what the interpreter does at exit, before the atexit handlers
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a stream the script closed
                stream.flush()
        try:
            conn.sendall(struct.pack("!i", code))
        finally:
            os._exit(code)


def serve(path: str) -> None:
    before = dict(os.environ)
    import tests.stage_imports  # noqa: F401  (the point of the server)

    imported = {k: v for k, v in os.environ.items() if before.get(k) != v}

    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)
    listener.listen(16)
    listener.settimeout(2.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while os.getppid() == parent:  # the test worker is gone: so is its server
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        head, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        (size,) = struct.unpack("!I", head[:4])
        body = head[4:]
        while len(body) < size:
            body += conn.recv(size - len(body))
        if os.environ.get("QATUNE_WARM_LOG"):  # which commands were forked, for a look at the savings
            with open(os.environ["QATUNE_WARM_LOG"], "a") as log:
                log.write(" ".join(json.loads(body)["argv"]) + "\n")
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            listener.close()
            _child(conn, json.loads(body), fds, imported)
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
