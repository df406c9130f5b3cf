#!/usr/bin/env python
"""Headless-browser check of the MLflow UI: does it tell the story a user needs?

In a temporary store it runs the project's own tuning command on the synthetic set (a tiny backbone is
trained first; the best model is registered as ladc-synthetic_lt with alias `champion`), starts
`mlflow ui` on 127.0.0.1, and lets Debian's Chromium (headless) screenshot and render:

  01-experiments.png             the experiments list
  02-experiment-link.png         the ladc-synthetic_lt experiment as the list links to it (#/experiments/ID)
  03-experiment-runs.png         its runs table in the model-training view (...?workflowType=machine_learning)
  04-model.png                   the registered model page (#/models/ladc-synthetic_lt)

(with the rendered DOM of each as .html and its visible text as .txt next to them), then checks:
the experiment opens in the model-training view (runs table) and not in the GenAI one (Overview/Traces),
the run names (`stage1 e6 remix s0 resnet8 if10`, `study-...`) appear, the model page shows `champion`.
Prints PASS/FAIL per check; exits 1 on any FAIL, 130 on Ctrl-C. The server is always stopped and the
temporary folder removed (unless --keep or --workdir).

  apt-get install -y chromium          # once
  python scripts/ui_check.py           # screenshots under /tmp/ui-check
  python scripts/ui_check.py --workdir /tmp/ui-store --keep   # keep the store; a rerun skips the tuning
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASET = "synthetic_lt"
NAME = f"ladc-{DATASET}"
ALIAS = "champion"
ML_VIEW = "machine_learning"

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

_children: list[subprocess.Popen] = []  # started here, stopped in cleanup()


def log(msg: str) -> None:
    print(msg, flush=True)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group this script started (the server forks workers), SIGKILL after grace."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd: list[str], **kw) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _children.append(proc)
    return proc


def run(cmd: list[str], timeout: float, **kw) -> int:
    proc = start(cmd, **kw)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, grace=2)
        raise
    finally:
        stop(proc, grace=2)


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-n:])
    except OSError:
        return ""


# --- the store -------------------------------------------------------------------------------------------

def has_champion(uri: str) -> bool:
    from mlflow import MlflowClient
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(NAME, ALIAS)
        return True
    except Exception:
        return False


def tune(work: Path, env: dict, n_trials: int, timeout: float) -> None:
    cmd = [sys.executable, str(ROOT / "tune.py"), "--dataset", DATASET, "--n-trials", str(n_trials),
           "--cache-dir", str(work / "cache")]
    log(f"running: {' '.join(cmd)}   (cwd {work}; log {work / 'tune.log'})")
    t0 = time.time()
    with open(work / "tune.log", "w") as out:
        rc = run(cmd, timeout, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"tune.py failed (exit {rc}):\n{tail(work / 'tune.log')}")
    log(f"  done in {time.time() - t0:.0f} s: " + tail(work / "tune.log", 1))


def store_facts(uri: str) -> dict:
    """What the UI should show, read through the MLflow API."""
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(NAME)
    if exp is None:
        raise SystemExit(f"no experiment {NAME} in {uri}")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    top = [r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags]
    mv = c.get_model_version_by_alias(NAME, ALIAS)
    return {"exp_id": exp.experiment_id, "exp_kind": exp.tags.get("mlflow.experimentKind"),
            "top_runs": top, "n_runs": len(runs), "champion_version": mv.version}


# --- the server and the browser ---------------------------------------------------------------------------

def start_ui(uri: str, port: int, work: Path, env: dict, timeout: float = 180) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port)]
    log(f"starting: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port {port}")
    out = open(work / "mlflow-ui.log", "w")
    proc = start(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow ui exited ({proc.returncode}):\n{tail(work / 'mlflow-ui.log')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    log(f"  answering on http://127.0.0.1:{port}")
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer within {timeout:.0f} s:\n{tail(work / 'mlflow-ui.log')}")


class Browser:
    def __init__(self, exe: str, work: Path, budget_ms: int):
        self.exe, self.work, self.budget = exe, work, budget_ms

    def _cmd(self, *extra: str) -> list[str]:
        profile = tempfile.mkdtemp(prefix="chromium-", dir=self.work)  # fresh profile: a first-time user
        return [self.exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra]

    def screenshot(self, url: str, png: Path) -> None:
        cmd = self._cmd(f"--screenshot={png}", "--window-size=1600,1000",
                        f"--virtual-time-budget={self.budget}", url)
        run(cmd, 120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not png.exists():
            raise SystemExit(f"chromium wrote no screenshot for {url}")

    def dom(self, url: str) -> str:
        out = self.work / "dom.html"
        with open(out, "w") as f:
            run(self._cmd("--dump-dom", f"--virtual-time-budget={self.budget}", url), 120,
                stdout=f, stderr=subprocess.DEVNULL)
        return out.read_text(errors="replace")


class Page:
    """The rendered DOM of one page: its title, visible text, links and the route the app settled on."""

    def __init__(self, dom: str):
        self.dom = dom
        m = re.search(r"<title>(.*?)</title>", dom, re.S)
        self.title = html.unescape(m.group(1)).strip() if m else ""
        body = re.sub(r"<(script|style|svg)\b[^>]*>.*?</\1>", " ", dom, flags=re.S | re.I)
        body = re.sub(r"<[^>]+>", "\n", body)
        self.lines = [t for t in (html.unescape(x).strip() for x in body.splitlines()) if t]
        self.text = "\n".join(self.lines)
        self.hrefs = [html.unescape(h) for h in re.findall(r'href="([^"]*)"', dom)]

    def route(self) -> str | None:
        """The app's current route: the Settings link carries it as returnTo."""
        for h in self.hrefs:
            q = urllib.parse.urlparse(h.lstrip("#")).query
            rt = urllib.parse.parse_qs(q).get("returnTo")
            if rt:
                return rt[0]
        return None

    def workflow_type(self) -> str | None:
        """genai or machine_learning: the current route's, else the one the side-nav links carry."""
        r = self.route()
        if r:
            wt = urllib.parse.parse_qs(urllib.parse.urlparse(r).query).get("workflowType")
            if wt:
                return wt[0]
        kinds = [urllib.parse.parse_qs(urllib.parse.urlparse(h.lstrip("#")).query).get("workflowType", [None])[0]
                 for h in self.hrefs if "/experiments/" in h]
        kinds = [k for k in kinds if k]
        return max(set(kinds), key=kinds.count) if kinds else None

    def has(self, s: str) -> bool:
        return s in self.text


def view_of(p: Page) -> tuple[bool, str]:
    """(is the model-training view, what shows it). The GenAI view opens on Overview (usage, traces, tokens)
    with side-nav links ?workflowType=genai; the model-training one on the runs table (a "Run Name" column)."""
    wt = p.workflow_type()
    genai_signs = [s for s in ("Token Usage", "Observability", "Tool calls", "Detect Issues") if p.has(s)]
    table = p.has("Run Name")
    ok = wt == ML_VIEW and table and p.title.startswith("Runs")
    how = (f"title {p.title!r}, route {p.route()!r}, workflowType {wt!r}, runs table {'yes' if table else 'no'}"
           + (f", GenAI-only content {genai_signs}" if genai_signs else ""))
    return ok, how


# --- the check ---------------------------------------------------------------------------------------------

def check(args, work: Path) -> int:
    exe = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit("no chromium: apt-get install -y chromium (or pass --chromium PATH)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, LADC_MLRUNS=str(work / "mlruns"), PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_REGISTRY_URI", None)
    os.environ.update(MLFLOW_TRACKING_URI=uri, LADC_MLRUNS=str(work / "mlruns"))

    if (work / "mlruns" / "mlflow.db").exists() and has_champion(uri):
        log(f"reusing the store in {work} ({NAME}@{ALIAS} exists): no tuning")
    else:
        tune(work, env, args.n_trials, args.tune_timeout)
    facts = store_facts(uri)
    log(f"store: experiment {NAME} id {facts['exp_id']} (experimentKind {facts['exp_kind']}), "
        f"{facts['n_runs']} runs, top-level {facts['top_runs']}; {NAME}@{ALIAS} = v{facts['champion_version']}")

    port = args.port or free_port()
    server = start_ui(uri, port, work, env)
    base = f"http://127.0.0.1:{port}/"
    browser = Browser(exe, work, args.budget_ms)
    results: list[tuple[str, bool, str]] = []

    def record(name: str, ok: bool, how: str, warn_only: bool = False) -> None:
        results.append((name, ok or warn_only, how))
        log(f"{'PASS' if ok else 'WARN' if warn_only else 'FAIL'}  {name}: {how}")

    def visit(stem: str, frag: str) -> Page:
        url = base + "#/" + frag
        log(f"-- {url}")
        browser.screenshot(url, out / f"{stem}.png")
        p = Page(browser.dom(url))
        (out / f"{stem}.html").write_text(p.dom)
        (out / f"{stem}.txt").write_text(f"{url}\ntitle: {p.title}\nroute: {p.route()}\n\n{p.text}\n")
        return p

    try:
        exps = visit("01-experiments", "experiments")
        record("experiments list shows the experiment", exps.has(NAME),
               f"{NAME!r} {'in' if exps.has(NAME) else 'NOT in'} the list (title {exps.title!r})")
        link = next((h for h in exps.hrefs if re.fullmatch(rf"#/experiments/{facts['exp_id']}(\?.*)?", h)),
                    f"#/experiments/{facts['exp_id']}")
        log(f"   the list links {NAME} to {link}")

        first = visit("02-experiment-link", link[2:])
        ok, how = view_of(first)
        record("experiment link opens the model-training view", ok,
               how + ("" if ok else f"; the experiment tag mlflow.experimentKind={facts['exp_kind']} does not "
                      f"decide it: this MLflow ({mlflow_version()}) takes the view from the URL's workflowType, "
                      f"else the browser's saved GenAI/Model-training switch (default GenAI); "
                      f"{base}#/experiments/{facts['exp_id']}/runs?workflowType={ML_VIEW} opens the runs table"),
               warn_only=not args.strict_landing)

        runs = visit("03-experiment-runs", f"experiments/{facts['exp_id']}/runs?workflowType={ML_VIEW}")
        ok, how = view_of(runs)
        record("runs page (?workflowType=machine_learning) is the model-training view", ok, how)
        missing = [n for n in facts["top_runs"] if not runs.has(n)]
        stage1 = [n for n in facts["top_runs"] if n.startswith("stage1 ")]
        study = [n for n in facts["top_runs"] if n.startswith("study-")]
        record("run names appear in the runs table", bool(stage1 and study) and not missing,
               f"stage1 {stage1}, study {study}" + (f"; missing from the page: {missing}" if missing else "")
               + ("" if stage1 and study else "; expected a stage1 ... and a study-... run"))
        m = re.search(r"(\d+)\s*\n\s*matching runs", runs.text)
        if m:
            log(f"   the page counts {m.group(1)} matching runs (the store has {facts['n_runs']}; "
                f"trials are nested under their study)")

        model = visit("04-model", f"models/{NAME}")
        v = f"Version {facts['champion_version']}"
        alias = bool(re.search(rf"@\s*{ALIAS}\b", model.text))
        ok = model.has(NAME) and model.has(v) and alias
        record(f"model page shows {v} with @{ALIAS}", ok,
               f"title {model.title!r}; {v!r} {'shown' if model.has(v) else 'NOT shown'}; "
               f"alias @{ALIAS} {'shown' if alias else 'NOT shown'}")
    finally:
        stop(server)
        log("mlflow ui stopped")

    log(f"\nscreenshots (and .html/.txt of each) in {out.resolve()}:")
    for png in sorted(out.glob("0*.png")):
        log(f"  {png.resolve()}")
    failed = [n for n, ok, _ in results if not ok]
    log(f"\n{len(results) - len(failed)}/{len(results)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


def mlflow_version() -> str:
    import mlflow
    return mlflow.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/ui-check", help="folder for screenshots and DOM dumps "
                    "(default /tmp/ui-check)")
    ap.add_argument("--port", type=int, default=0, help="port for mlflow ui on 127.0.0.1 (default: a free one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (store, logs) and print it")
    ap.add_argument("--workdir", help="use this folder instead of a temporary one (never removed); when it "
                    f"already holds {NAME}@{ALIAS}, the tuning is skipped")
    ap.add_argument("--n-trials", type=int, default=4, help="trials of the tuning run (default 4)")
    ap.add_argument("--tune-timeout", type=float, default=1200, help="seconds for the tuning run (default 1200)")
    ap.add_argument("--budget-ms", type=int, default=15000, help="chromium --virtual-time-budget (default 15000)")
    ap.add_argument("--chromium", help="the browser (default: chromium on PATH)")
    ap.add_argument("--strict-landing", action="store_true",
                    help="fail (not warn) when a plain click on the experiment opens MLflow 3.x's GenAI view; the "
                         "project links to the model-training view instead, and MLflow 3.17 ignores the experiment tag")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="ladc-ui-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return check(args, work)
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    finally:
        for p in reversed(_children):
            stop(p, grace=3)
        for d in work.glob("chromium-*"):
            shutil.rmtree(d, ignore_errors=True)
        if args.keep or args.workdir:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
