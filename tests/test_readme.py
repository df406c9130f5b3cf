"""The README's first-run block, pasted in order into a new shell in an empty folder: the project's
commands and MLflow's own (`pyfunc.load_model` by alias, `mlflow models serve` and a request) must all
work against the same store, with nothing but the README's environment."""

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import ROOT
from test_tune import free_port


def readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-test: begin -->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_first_run_block_works_as_written(tmp_path):
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LADC_"))}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"
    servers, outputs = [], []
    try:
        for line in readme_block():
            cmd = line.split("  #")[0].strip().replace("5001", port)
            if cmd.startswith("export "):
                key, value = cmd[len("export "):].split("=", 1)
                env[key] = value
                continue
            # the README is read from the repository root: its scripts are there
            cmd = re.sub(r"^python (train|tune)\.py", lambda m: f"{sys.executable} {ROOT / (m.group(1) + '.py')}", cmd)
            cmd = re.sub(r"^python ", f"{sys.executable} ", cmd)
            if cmd.endswith("&"):
                servers.append(subprocess.Popen(shlex.split(cmd[:-1]), cwd=tmp_path, env=env, start_new_session=True,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                continue
            r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            assert "Traceback" not in r.stderr, f"{line}\n{r.stderr[-3000:]}"
            outputs.append(r.stdout)
    finally:
        for s in servers:
            os.killpg(s.pid, signal.SIGTERM)
            s.wait(timeout=30)
    assert "ladc-synthetic_lt" in "".join(outputs) or "champion" in "".join(outputs)
    assert re.search(r"\[\d \d\]", outputs[3]), outputs[3]  # pyfunc.load_model by alias: two class ids
    assert '"predictions"' in outputs[-1], outputs[-1]  # the served model answered
    assert not (tmp_path / "mlflow.db").exists()  # MLflow's own commands used the project's store
