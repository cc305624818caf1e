"""The warm stage server (tests/warm.py) runs a script as the interpreter would: the same exit status, output,
traceback, working directory, arguments, environment, standard input and exit handlers as a new process."""

import os
import subprocess
import sys

import pytest

from tests import warm

SCRIPTS = {
    "prints": "import sys\nprint('out')\nprint('err', file=sys.stderr)\n",
    "exit_code": "import sys\nsys.exit(3)\n",
    "exit_message": "import sys\nsys.exit('stopped: bad input')\n",
    "raises": "def f():\n    raise ValueError('boom')\n\nf()\n",
    "where": (
        "import os, sys\nprint(os.getcwd(), sys.argv[1:], os.environ.get('HF_HUB_OFFLINE'))\n"
        "print(__name__, os.path.basename(__file__), os.path.isabs(__file__), os.path.basename(sys.path[0]))\n"
    ),
    "stdin": "import sys\nprint(sys.stdin.read().upper())\n",
    # a stage's provenance digests the qatune modules it imported: the server must have imported none
    "qatune_modules": "import sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'qatune'))\n",
    "at_exit": "import atexit, threading, time\natexit.register(lambda: print('atexit ran'))\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), print('thread joined'))).start()\n",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_forked_script_behaves_as_a_new_process(name, tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / f"{name}.py").write_text(SCRIPTS[name])
    cmd = [sys.executable, f"scripts/{name}.py", "a", "b c"]
    env = warm.prepare(dict(os.environ))
    assert warm.forkable(cmd, env)
    given = "some input\n" if name == "stdin" else None
    forked = warm.run_script(cmd, tmp_path, env, given)
    real = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, input=given or "")
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode or real.stdout or real.stderr  # each script shows something


def test_each_environment_has_its_own_server(tmp_path):
    """Libraries read some variables when imported: a command with another environment is forked by a server
    started in that environment, never by one whose libraries were imported under other values."""
    env = warm.prepare(dict(os.environ))
    assert warm.forkable([sys.executable, "x.py"], env)
    assert not warm.forkable([sys.executable, "x.py"], {**env, "HF_HOME": str(tmp_path)})
    assert not warm.forkable([sys.executable, "-m", "dvc", "repro"], env)
    assert not warm.forkable(["git", "status"], env)
    other = warm.prepare({**os.environ, "HF_HOME": str(tmp_path)})
    assert warm.forkable([sys.executable, "x.py"], other) and other[warm.SOCKET_VAR] != env[warm.SOCKET_VAR]
    (tmp_path / "x.py").write_text("import huggingface_hub.constants as c\nprint(c.HF_HOME)\n")
    assert warm.run_script([sys.executable, "x.py"], tmp_path, other).stdout.strip() == str(tmp_path)
    # DVC's commands reach a server through the `python` first on PATH
    assert env["PATH"].split(os.pathsep)[0] == other["PATH"].split(os.pathsep)[0] == str(warm.shim_dir())
