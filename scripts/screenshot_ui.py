#!/usr/bin/env python
"""Regenerate the web-UI screenshots of the docs: ``docs/asset_graph.png`` and ``docs/asset_checks.png``.

    python scripts/screenshot_ui.py [--out-dir docs] [--root DIR] [--pages graph,checks] [--scale 1.5]

1. installs Debian's ``chromium`` when no chromium is on the PATH (``apt-get``; needs root);
2. starts ``dagster dev -w workspace.yaml`` on 127.0.0.1 (a free port) for a scratch pipeline instance
   (``DAGSTER_HOME``, data and models directories under ``--root``; default a temporary directory that
   is removed at the end), in its own process group;
3. clicks "Materialize all" the way the UI does (the GraphQL mutation of the end-to-end test
   ``sentinel_pipeline_tests/test_webserver_e2e.py``, with its small pipeline: small synthetic market,
   2 epochs per model) and waits for the run to succeed, so that the graph shows materialised assets
   and check badges; skipped when the instance under ``--root`` already has a successful run;
4. drives headless chromium over the DevTools protocol (``websockets``, which dagster-webserver already
   depends on): sets the UI's own display preferences in the page's localStorage (navigation collapsed,
   vertical graph, node facets: status, checks, kinds), opens the global asset lineage with every group
   expanded and the ``bundle_verified`` check of ``bundle_mlp_two_head`` with its per-check table, waits
   until the live data has rendered, and captures PNGs. The scratch directory's absolute path is cut
   from the text on the page first, so the images name no machine paths (``models/<bundle>`` instead);
5. stops chromium and the server (SIGTERM to the server's process group).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from websockets.sync.client import connect

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sentinel_pipeline_tests.test_webserver_e2e import (  # noqa: E402  (needs the repo on sys.path)
    RUN_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    DagsterDev,
    dagster_dev,
    free_port,
    launch_materialize_all,
    wait_for_run,
)

PAGES = ("graph", "checks")
SUCCESSFUL_RUNS_QUERY = "{ runsOrError(filter: {statuses: [SUCCESS]}) { ... on Runs { results { runId } } } }"
# what the "Join the Dagster community" dialog's Skip button records (in $DAGSTER_HOME/.nux/)
SET_NUX_SEEN = "mutation { setNuxSeen }"
# the UI's own display preferences (localStorage keys of dagster-webserver 1.13)
UI_PREFERENCES = {
    "dagster-nav-collapsed": True,
    "asset-graph-direction": "vertical",
    "asset-node-facets": ["status", "checks", "kind-tag", "unsynced-tag"],
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def chromium_binary() -> str:
    """The chromium on the PATH, installing Debian's package when there is none."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    print("installing chromium (apt-get)", flush=True)
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    found = shutil.which("chromium")
    if not found:
        raise SystemExit("chromium is still not on the PATH after apt-get install")
    return found


class Page:
    """One chromium tab, driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def goto(self, url: str, ready: str = "true", timeout: float = 60.0, settle: float = 2.0) -> None:
        """Open ``url`` and wait until the JS expression ``ready`` is true, then ``settle`` seconds more."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not self.eval(f"document.readyState === 'complete' && !!({ready})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}: page not ready after {timeout:.0f}s ({ready})")
            time.sleep(0.5)
        time.sleep(settle)

    def strip_text(self, prefix: str) -> None:
        """Cut ``prefix`` from every text node of the page."""
        self.eval(
            "(() => { const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);"
            f" const p = {json.dumps(prefix)};"
            " while (w.nextNode()) { const n = w.currentNode;"
            " if (n.nodeValue.includes(p)) n.nodeValue = n.nodeValue.split(p).join(''); } })()"
        )

    def screenshot(self, out: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))


@contextmanager
def browser(chromium: str, width: int, height: int, scale: float) -> Iterator[Page]:
    """A headless chromium (own process group, throwaway profile) and its first tab."""
    port = free_port()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            with connect(_devtools_page_url(port), max_size=2**28) as ws:
                page = Page(ws)
                page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                          deviceScaleFactor=scale, mobile=False)
                yield page
        finally:
            _stop_group(proc)


def _devtools_page_url(port: int, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"chromium's DevTools endpoint on port {port} did not come up in {timeout:.0f}s")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to chromium's process group (renderers, zygote, crashpad), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # let the rest of the group exit before the profile is removed
        break


def ensure_materialised(server: DagsterDev, repos: dict[str, Any]) -> None:
    runs = server.graphql(SUCCESSFUL_RUNS_QUERY)["runsOrError"].get("results", [])
    if runs:
        print(f"instance already has {len(runs)} successful run(s); not materialising again", flush=True)
        return
    run_id = launch_materialize_all(server, repos)
    print(f"materialising everything (run {run_id}) ...", flush=True)
    wait_for_run(server, run_id, RUN_TIMEOUT_S)


def capture(page: Page, server: DagsterDev, repos: dict[str, Any], which: str, out: Path, root: Path) -> None:
    assets = repos["nodes"][0]["assetNodes"]
    page.goto(server.url + "/asset-groups", settle=0.5)
    for key, value in UI_PREFERENCES.items():
        page.eval(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")
    if which == "graph":
        groups = sorted({a["groupName"] for a in assets})
        expanded = ",".join(f"global@global:{g}" for g in groups)  # group ids of the lineage page
        materialised = f"document.body.innerText.split('Materialized').length > {len(assets)}"
        page.goto(f"{server.url}/asset-groups?expanded={quote(expanded, safe=',')}", ready=materialised)
    else:
        page.goto(f"{server.url}/assets/bundle_mlp_two_head?view=checks&checkDetail=bundle_verified",
                  ready="document.body.innerText.includes('Passed')")
        page.eval("Array.from(document.querySelectorAll('a,button,span'))"
                  ".find(e => e.textContent.trim() === '[Show Markdown]').click()")
        time.sleep(1.5)
    page.strip_text(f"{root}/")
    page.screenshot(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs")
    parser.add_argument("--root", type=Path, default=None,
                        help="pipeline instance directory to use (and keep); default: a temporary one")
    parser.add_argument("--pages", default=",".join(PAGES), help=f"comma-separated subset of {list(PAGES)}")
    parser.add_argument("--graph-size", default="1500x1400", help="viewport WIDTHxHEIGHT of the graph page")
    parser.add_argument("--checks-size", default="1500x1100", help="viewport WIDTHxHEIGHT of the checks page")
    parser.add_argument("--scale", type=float, default=1.5, help="device pixel ratio of the PNGs")
    args = parser.parse_args(argv)
    pages = args.pages.split(",")
    unknown = sorted(set(pages) - set(PAGES))
    if unknown:
        parser.error(f"unknown pages {unknown}; known: {list(PAGES)}")

    chromium = chromium_binary()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sentinel-ui-") as scratch:
        root = (args.root or Path(scratch)).resolve()
        with dagster_dev(root) as server:
            repos = server.wait_ready(STARTUP_TIMEOUT_S)
            ensure_materialised(server, repos)
            server.graphql(SET_NUX_SEEN)
            for which in pages:
                size = args.graph_size if which == "graph" else args.checks_size
                width, height = (int(v) for v in size.lower().split("x"))
                out = args.out_dir / f"asset_{which}.png"
                with browser(chromium, width, height, args.scale) as page:
                    capture(page, server, repos, which, out, root)
                print(f"wrote {out}", flush=True)
        if server.needed_sigkill:
            print(f"warning: dagster dev needed SIGKILL ({server.survivors})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
