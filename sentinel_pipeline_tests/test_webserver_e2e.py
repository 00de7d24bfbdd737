"""End to end through the web UI's API: ``dagster dev`` + GraphQL "Materialize all" + check results.

Starts ``dagster dev -w workspace.yaml`` on 127.0.0.1 (a free port) from the repository root, with a
temporary ``DAGSTER_HOME`` (holding ``deploy/dagster.yaml``) and temporary data / models directories
(``SENTINEL_DATA_DIR`` / ``SENTINEL_MODELS_DIR``), in its own process group. It then does over HTTP
what the UI's "Materialize all" button does: the ``LaunchPipelineExecution`` mutation on the implicit
asset job ``__ASSET_JOB`` with every asset and every asset check of the code location selected, plus
a ``runConfigData`` that shrinks the run (``pipeline_fixtures.cli_run_config``: small synthetic
market with a stronger planted signal, two epochs per model). It waits for the
run to succeed, reads every asset check's latest evaluation back (``bundle_verified`` on each bundle,
``train_serve_parity`` on each replay, the data checks) and compares them with the checks the code
defines, reads a bundle asset's materialisation metadata and checks that bundle on disk, and finally
stops the server with SIGTERM to its process group and asserts that every process of the group
exited without needing SIGKILL and that the port is closed.

``scripts/screenshot_ui.py`` reuses the server and launch helpers of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sentinel_pipeline_tests.pipeline_fixtures import cli_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 480.0
SHUTDOWN_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 6000
ASSET_JOB = "__ASSET_JOB"  # the implicit job the UI's Materialize buttons launch

REPOSITORIES_QUERY = """
query Repositories {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        pipelines { name }
        assetNodes {
          assetKey { path }
          groupName
          assetChecksOrError { ... on AssetChecks { checks { name jobNames } } }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

LAUNCH_MUTATION = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message reason } }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on PythonError { message stack }
  }
}
"""

RUN_STATUS_QUERY = """
query RunStatus($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status assetSelection { path } stepStats { stepKey status } }
    ... on PythonError { message }
  }
}
"""

RUN_FAILURES_QUERY = """
query RunFailures($runId: ID!) {
  logsForRun(runId: $runId, limit: 5000) {
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message stepKey level }
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { error { message } }
      }
    }
  }
}
"""

CHECK_RESULTS_QUERY = """
query CheckResults {
  assetNodes {
    assetKey { path }
    assetChecksOrError {
      __typename
      ... on AssetChecks {
        checks {
          name
          blocking
          executionForLatestMaterialization {
            runId
            status
            evaluation {
              success
              description
              metadataEntries {
                label
                ... on MarkdownMetadataEntry { mdStr }
                ... on TextMetadataEntry { text }
                ... on PathMetadataEntry { path }
              }
            }
          }
        }
      }
    }
  }
}
"""

MATERIALIZATION_QUERY = """
query LatestMaterialization($assetKey: AssetKeyInput!) {
  assetNodes(assetKeys: [$assetKey]) {
    assetMaterializations(limit: 1) {
      runId
      metadataEntries {
        label
        ... on PathMetadataEntry { path }
        ... on TextMetadataEntry { text }
        ... on MarkdownMetadataEntry { mdStr }
      }
    }
  }
}
"""


@dataclass
class DagsterDev:
    """A ``dagster dev`` process group started by :func:`dagster_dev`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    needed_sigkill: bool = False
    survivors: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- dagster dev log (last {LOG_TAIL_CHARS} chars) ---\n{text[-LOG_TAIL_CHARS:]}"

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        assert not payload.get("errors"), f"GraphQL errors: {payload['errors']}\n{self.log_tail()}"
        return payload["data"]

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Poll ``/server_info`` until it answers and the code location has loaded its repository."""
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with code {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    json.loads(response.read())
                repos = self.graphql(REPOSITORIES_QUERY)["repositoriesOrError"]
                if repos["__typename"] == "RepositoryConnection" and repos["nodes"]:
                    return repos
                last_error = f"code location not loaded: {repos}"
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last_error = repr(exc)
            time.sleep(1.0)
        raise AssertionError(f"dagster dev not ready after {timeout:.0f}s ({last_error})\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the process group (``dagster dev`` maps it to Ctrl-C and shuts its services down),
        wait for every process of the group; SIGKILL only as a last resort."""
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(self.proc, pgid, SHUTDOWN_TIMEOUT_S):
            self.survivors = _group_members(pgid)
            # a group that emptied between the wait and this look shut down, only slowly (a loaded machine)
            self.needed_sigkill = bool(self.survivors)
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(self.proc, pgid, 10.0)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the process group, from /proc (Linux); [] when it is unreadable."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _wait_group_gone(proc: subprocess.Popen[bytes], pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the group leader
        if proc.returncode is not None and not _group_members(pgid):
            return True
        time.sleep(0.5)
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _default_sigint() -> None:
    # a background shell starts its children with SIGINT ignored; dagster dev maps SIGTERM onto the
    # SIGINT handler, so without this it would ignore SIGTERM too
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def dagster_dev(root: Path) -> Iterator[DagsterDev]:
    """``dagster dev`` on a free port for the pipeline instance under ``root`` (``dagster_home/`` with
    ``deploy/dagster.yaml``, ``data/``, ``models/``); stopped on exit, whatever happened."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(REPO_ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(home),
        "SENTINEL_DATA_DIR": str(root / "data"),
        "SENTINEL_MODELS_DIR": str(root / "models"),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("SENTINEL_RAW_DIR", None)
    env.pop("SENTINEL_QUALITY_GATES", None)
    port = free_port()
    log_path = root / "dagster_dev.log"
    command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_sigint)
    server = DagsterDev(proc, port, log_path)
    try:
        yield server
    finally:
        server.stop()


def _expected_checks() -> set[tuple[str, str]]:
    """(asset, check) of every asset check the code location defines."""
    from sentinel_pipeline.definitions import CHECKS

    return {(spec.asset_key.to_user_string(), spec.name) for c in CHECKS for spec in c.check_specs}


def launch_materialize_all(server: DagsterDev, repos: dict[str, Any]) -> str:
    """The UI's "Materialize all": every asset and the checks the asset job runs, on ``__ASSET_JOB``."""
    (repo,) = repos["nodes"]
    assert ASSET_JOB in {p["name"] for p in repo["pipelines"]}
    assets = repo["assetNodes"]
    checks = [
        {"assetKey": {"path": a["assetKey"]["path"]}, "name": c["name"]}
        for a in assets
        for c in (a["assetChecksOrError"] or {}).get("checks", [])
        if ASSET_JOB in c["jobNames"]
    ]
    params = {
        "mode": "default",
        "executionMetadata": {"tags": []},
        # what "Materialize" -> "Open launchpad" would send: the small pipeline of the Dagster-level
        # tests (small synthetic market, 2 epochs)
        "runConfigData": cli_run_config(),
        "selector": {
            "repositoryLocationName": repo["location"]["name"],
            "repositoryName": repo["name"],
            "pipelineName": ASSET_JOB,
            "assetSelection": [{"path": a["assetKey"]["path"]} for a in assets],
            "assetCheckSelection": checks,
        },
    }
    result = server.graphql(LAUNCH_MUTATION, {"executionParams": params})["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", f"launch failed: {result}\n{server.log_tail()}"
    return str(result["run"]["runId"])


def _run_failure_report(server: DagsterDev, run_id: str) -> str:
    events = server.graphql(RUN_FAILURES_QUERY, {"runId": run_id})["logsForRun"].get("events", [])
    lines = [
        f"{e.get('stepKey')}: {e.get('message')} {(e.get('error') or {}).get('message', '')}"
        for e in events
        if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent")
    ]
    return "\n".join(lines[-20:])


def wait_for_run(server: DagsterDev, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = server.graphql(RUN_STATUS_QUERY, {"runId": run_id})["runOrError"]
        assert run["__typename"] == "Run", f"run {run_id}: {run}"
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(3.0)
    assert run.get("status") == "SUCCESS", (
        f"run {run_id} ended as {run.get('status')} (or timed out after {timeout:.0f}s); steps: "
        f"{run.get('stepStats')}\nfailures:\n{_run_failure_report(server, run_id)}\n{server.log_tail()}"
    )
    return run


def _metadata(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["label"]: e.get("path", e.get("text", e.get("mdStr"))) for e in entries}


@pytest.mark.slow
def test_materialize_all_through_the_webserver(tmp_path: Path) -> None:
    from sentinel_pipeline.training.families import variants_of_kind

    VARIANTS = variants_of_kind("windows")
    from sentinel_pipeline.verification import require_verified

    with dagster_dev(tmp_path) as server:
        repos = server.wait_ready(STARTUP_TIMEOUT_S)
        run_id = launch_materialize_all(server, repos)
        run = wait_for_run(server, run_id, RUN_TIMEOUT_S)

        # every asset of the graph was selected and every step succeeded
        all_assets = {tuple(a["assetKey"]["path"]) for a in repos["nodes"][0]["assetNodes"]}
        assert {tuple(k["path"]) for k in run["assetSelection"]} == all_assets
        assert run["stepStats"] and all(s["status"] == "SUCCESS" for s in run["stepStats"]), run["stepStats"]

        # every check the code defines was evaluated in this run on the new materialisation, and passed
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for node in server.graphql(CHECK_RESULTS_QUERY)["assetNodes"]:
            asset = "/".join(node["assetKey"]["path"])
            for check in (node["assetChecksOrError"] or {}).get("checks", []):
                results[(asset, check["name"])] = check
        assert set(results) == _expected_checks()
        for variant in VARIANTS:
            assert (f"bundle_{variant}", "bundle_verified") in results
            assert (f"replay_{variant}", "train_serve_parity") in results
            assert results[(f"bundle_{variant}", "bundle_verified")]["blocking"]
        for (asset, name), check in sorted(results.items()):
            execution = check["executionForLatestMaterialization"]
            assert execution is not None, f"{asset}:{name} has no evaluation"
            assert execution["runId"] == run_id, f"{asset}:{name} evaluated in another run"
            evaluation = execution["evaluation"] or {}
            assert execution["status"] == "SUCCEEDED" and evaluation.get("success"), (
                f"{asset}:{name} {execution['status']}: {evaluation.get('description')}")
        for variant in VARIANTS:
            verified = _metadata(results[(f"bundle_{variant}", "bundle_verified")]
                                 ["executionForLatestMaterialization"]["evaluation"]["metadataEntries"])
            assert verified["failed_checks"] == "none"
            assert "| check | passed | detail |" in verified["checks"]
            assert "| False |" not in verified["checks"], verified["checks"]

        # the bundle the UI shows for the MLP exists in the temporary models directory and is verified
        materialization = server.graphql(MATERIALIZATION_QUERY, {"assetKey": {"path": ["bundle_mlp_two_head"]}})
        (node,) = materialization["assetNodes"]
        (latest,) = node["assetMaterializations"]
        assert latest["runId"] == run_id
        bundle = Path(_metadata(latest["metadataEntries"])["bundle_path"])
        assert bundle.is_dir() and bundle.parent == tmp_path / "models", bundle
        require_verified(bundle)  # raises unless verification.json passed and the manifest still holds
        assert (bundle / "records" / "replay_report.json").is_file()  # the replay ran on this bundle

    assert not server.needed_sigkill, f"processes {server.survivors} ignored SIGTERM\n{server.log_tail()}"
    assert server.proc.returncode is not None
    assert not port_open(server.port), f"port {server.port} still open after shutdown"
