#!/usr/bin/env python
"""Kill -9 a tuning study at random moments, rerun the same command, and check the study survives:
exactly N finished trials, no configuration repeated, no trial or MLflow run left RUNNING.

Runs on the synthetic set in a temporary store (a tiny backbone is trained first):

  python scripts/study_chaos.py                       # 20 trials, 5 kills at random delays
  python scripts/study_chaos.py --workers 3 --kills 0 # 3 workers started at once on a new study
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tune_cmd(cache: Path, n_trials: int, study: str, storage: str | None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "tune.py"), "--dataset", "synthetic_lt", "--cache-dir", str(cache),
           "--n-trials", str(n_trials), "--study-name", study, "--stage2-epochs", "30",
           "--set", "stage2.milestones=[10, 20]", "--no-promote"]
    return cmd + (["--storage", storage] if storage else [])


def check_study(env: dict, tmp: Path, study: str, n_trials: int, storage: str | None) -> dict:
    """Counts of the study and its MLflow runs (in a subprocess-free way: this process reads the stores)."""
    os.environ.update(env)
    import mlflow
    import optuna

    from ladc import tracking
    from ladc.tuning import open_storage

    tracking.MLRUNS = tmp
    tracking.setup_tracking()
    st, _ = open_storage(storage, tmp / "optuna")
    s = optuna.load_study(study_name=study, storage=st)
    states = [t.state for t in s.trials]
    done = [t for t in s.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    configs = [tuple(sorted(t.params.items())) for t in s.trials if t.params]
    running_runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'")
    return {"finished": len(done), "failed": states.count(optuna.trial.TrialState.FAIL),
            "running_trials": states.count(optuna.trial.TrialState.RUNNING),
            "repeated_configs": len(configs) - len(set(configs)), "running_mlflow_runs": len(running_runs),
            "parents": len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'study'"))}


def wait_for_study(tmp: Path, storage: str | None, procs, limit: float = 300.0) -> float:
    """Seconds until this attempt writes to the study's storage, so that kills land inside the study,
    not in the start-up of a slow machine."""
    path = Path(storage[len("sqlite:///"):]) if storage and storage.startswith("sqlite:///") else \
        Path(storage) if storage else tmp / "optuna" / "journal.log"

    def size():  # size and modification time: an sqlite file may change without growing
        return (path.stat().st_size, path.stat().st_mtime_ns) if path.exists() else (0, 0)

    before, t0 = size(), time.time()
    while time.time() - t0 < limit and all(p.poll() is None for p in procs):
        if size() != before:  # this attempt has written to the study: it is past its start-up
            break
        time.sleep(0.1)
    return time.time() - t0


def journal_counts(tmp: Path, storage: str | None) -> str:
    """Trial states of the study, read in a child process (this one must not hold the stores open)."""
    code = ("import optuna, sys; from ladc.tuning import open_storage; from pathlib import Path; "
            "optuna.logging.set_verbosity(optuna.logging.ERROR); "
            "st, _ = open_storage(sys.argv[1] or None, Path(sys.argv[2]) / 'optuna'); "
            "s = optuna.load_study(study_name='chaos', storage=st); "
            "from collections import Counter; print(dict(Counter(t.state.name for t in s.trials)))")
    r = subprocess.run([sys.executable, "-c", code, storage or "", str(tmp)], capture_output=True, text=True,
                       cwd=ROOT)
    return r.stdout.strip() or "no study yet"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=5, help="kill -9 the study this many times at random delays")
    ap.add_argument("--workers", type=int, default=1, help="processes started at once for each attempt")
    ap.add_argument("--min-delay", type=float, default=0.0,
                    help="kills happen U(min-delay, max-delay) seconds after the study has started")
    ap.add_argument("--max-delay", type=float, default=4.0)
    ap.add_argument("--storage", help="sqlite:///... or a .log path (default: the journal under the temp store)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="ladc-chaos-") as d:
        tmp = Path(d)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "LADC_MLRUNS": str(tmp),
               "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        storage = args.storage.replace("TMP", str(tmp)) if args.storage else None
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "stage1", "--dataset", "synthetic_lt"], env=env,
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"backbone trained ({time.time() - t0:.0f}s)")
        cmd = tune_cmd(tmp / "cache", args.n_trials, "chaos", storage)
        for k in range(args.kills):
            procs = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for _ in range(args.workers)]
            started = wait_for_study(tmp, storage, procs)  # a loaded machine can take long to start
            delay = rng.uniform(args.min_delay, args.max_delay)
            time.sleep(delay)
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
            print(f"kill {k + 1}: SIGKILL {delay:.1f}s after the study started ({started:.0f}s after launch); "
                  f"study so far: {journal_counts(tmp, storage)}", flush=True)
        procs = [subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(args.workers)]
        outs = [p.communicate(timeout=1800) for p in procs]
        codes = [p.returncode for p in procs]
        for (out, err), code in zip(outs, codes):
            if code != 0:
                print(err[-3000:])
        res = check_study(env, tmp, "chaos", args.n_trials, storage)
        print(f"final run exit codes {codes}; {res}")
        ok = (all(c == 0 for c in codes) and res["finished"] == args.n_trials and res["repeated_configs"] == 0
              and res["running_trials"] == 0 and res["running_mlflow_runs"] == 0 and res["parents"] == 1)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
