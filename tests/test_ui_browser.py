"""Issue 8: the runs are comparable in the MLflow UI as it is, seen through headless Chromium.

A store with two tiny real distill runs (the student alone, seeds 1 and 2, on digits) is served
by ``mlflow server`` on 127.0.0.1; the test checks that the experiment page lists both runs and,
with the tag column ``config_sha256`` switched on in the column picker as a person would, shows
their hashes; and that the compare page of the two runs shows the metric ``test/acc`` of both.
Screenshots of both pages are saved in a pytest tmp dir (paths printed). The server is started
in its own process group and stopped through its PID in a ``finally`` block.
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
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_helpers import TINY_DISTILL, use_isolated_store

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver "
                "(apt-get install -y chromium chromium-driver; .ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SERVER_START_S = 150
PAGE_WAIT_S = 90
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1920,1080")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """Two FINISHED distill runs (method ce, seeds 1 and 2) in a fresh sqlite store."""
    from mlflow.tracking import MlflowClient

    from asib_core.pipeline.distill import run_distill

    work = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, work)
        results = [run_distill("quickstart", TINY_DISTILL + [f"experiment.seed={s}", "method=ce"]) for s in (1, 2)]
        client = MlflowClient()
        runs = [client.get_run(r.run_id) for r in results]
    yield {"work": work, "uri": f"sqlite:///{work / 'mlflow.db'}", "runs": runs,
           "experiment_id": runs[0].info.experiment_id}


@pytest.fixture(scope="module")
def server(tiny_store):
    """``mlflow server`` on the store, bound to 127.0.0.1; stopped by its PID afterwards."""
    port = _free_port()
    log_path = tiny_store["work"] / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tiny_store["uri"],
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tiny_store["work"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: uvicorn + job runner
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 10})
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server not ready after {SERVER_START_S}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield base
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its PID), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:  # children that outlived the parent (same group)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _body(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def _wait(driver, condition, what: str, timeout: float = PAGE_WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what} on {driver.current_url}; page text:\n{_body(driver)[:4000]}")


def _close_assistant(driver) -> None:
    """Close the MLflow Assistant side panel (it hides half of the page in a screenshot)."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def _screenshot(driver, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    assert path.stat().st_size > 10_000


def test_rest_api_lists_the_runs_with_their_tags(server, tiny_store):
    answer = _post(f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": [tiny_store["experiment_id"]]})
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in answer["runs"]}
    for run in tiny_store["runs"]:
        assert tags[run.info.run_id]["config_sha256"] == run.data.tags["config_sha256"]
        assert tags[run.info.run_id]["step"] == "distill"


def test_experiment_page_lists_runs_with_config_sha256(server, tiny_store, browser, shots):
    runs = tiny_store["runs"]
    browser.get(f"{server}/#/experiments/{tiny_store['experiment_id']}/runs?workflowType=machine_learning")
    name = runs[0].info.run_name  # "quickstart ce resnet8 <- CE", both runs
    assert all(r.info.run_name == name for r in runs)
    _wait(browser, lambda d: f"{len(runs)} matching runs" in _body(d) and _body(d).count(name) == len(runs),
          "both runs in the runs table")
    # switch the tag column on as a person would: Columns -> search -> the tag config_sha256
    button = _wait(browser, lambda d: next((b for b in d.find_elements(By.TAG_NAME, "button")
                                            if b.text.strip() == "Columns"), None), "the Columns button")
    button.click()
    search = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']"),
                   "the column search box")
    search.send_keys("config_sha256")
    tag_node = _wait(browser, lambda d: next(iter(d.find_elements(
        By.XPATH, "//span[starts-with(@title, 'Tags')]/ancestor::div[contains(@class, 'treenode')]"
                  "/following-sibling::div//span[@title='config_sha256']")), None), "the config_sha256 tag column")
    tag_node.click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    shas = [r.data.tags["config_sha256"] for r in runs]
    assert len(set(shas)) == 2 and all(len(s) == 64 for s in shas)
    _wait(browser, lambda d: all(s in _body(d) for s in shas), "both config_sha256 values in the table")
    _close_assistant(browser)
    browser.execute_script("""
        const cells = [...document.querySelectorAll("[role='columnheader']")]
            .filter(c => c.textContent.trim().startsWith("config_sha256"));
        if (cells.length) cells[0].scrollIntoView({block: "nearest", inline: "center"});""")
    _screenshot(browser, shots / "experiment_page.png")


def _metric_row(driver, name: str):
    """The values of one metric row of the compare page's (virtualised) metrics table; scrolls
    the table down until the row is rendered. None while it is not there yet."""
    return driver.execute_script("""
        const name = arguments[0];
        const link = [...document.querySelectorAll("a[title='Plot chart']")]
            .find(a => a.textContent.trim() === name);
        const grids = [...document.querySelectorAll(".ReactVirtualized__Grid")];
        if (!link) {
            grids.forEach(g => { if (getComputedStyle(g).overflowY !== "hidden") g.scrollTop += 90; });
            return null;
        }
        const cell = link.parentElement;
        const names = cell.closest(".ReactVirtualized__Grid");
        for (const g of grids) {
            if (g === names) continue;
            const cells = [...g.querySelectorAll("div")]
                .filter(c => c.style.top === cell.style.top && c.style.left !== "");
            if (cells.length) {
                cells.sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
                return cells.map(c => c.textContent.trim());
            }
        }
        return null;
    """, name)


def test_compare_page_shows_a_metric_of_both_runs(server, tiny_store, browser, shots):
    runs = tiny_store["runs"]
    ids = [r.info.run_id for r in runs]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([tiny_store["experiment_id"]])})
    browser.get(f"{server}/#/compare-runs?{query}")
    _wait(browser, lambda d: f"Comparing {len(ids)} Runs" in _body(d), "the compare page")
    text = _body(browser)
    assert all(run_id in text for run_id in ids)
    values = _wait(browser, lambda d: _metric_row(d, "test/acc"), "the test/acc row of the metrics table")
    expected = [r.data.metrics["test/acc"] for r in runs]
    assert len(values) == len(expected), values
    for shown, value in zip(values, expected):  # the UI rounds (3 decimals / 4 significant digits)
        assert float(shown) == pytest.approx(value, abs=6e-4, rel=1e-3), (values, expected)
    _close_assistant(browser)
    # for the screenshot: the page scrolled to the metrics table, the table to the row, with
    # the name and both values side by side on the screen
    _wait(browser, lambda d: _show_metric_row(d, "test/acc"), "the test/acc row on screen, aligned")
    _screenshot(browser, shots / "compare_page.png")


def _show_metric_row(driver, name: str) -> bool:
    return driver.execute_script("""
        const link = [...document.querySelectorAll("a[title='Plot chart']")]
            .find(a => a.textContent.trim() === arguments[0]);
        if (!link) return false;
        const cell = link.parentElement;
        const names = cell.closest(".ReactVirtualized__Grid");
        const values = [...document.querySelectorAll(".ReactVirtualized__Grid")]
            .find(g => g !== names && getComputedStyle(g).overflowY !== "hidden");
        if (!values) return false;
        names.scrollIntoView({block: "center"});
        const top = Math.min(parseFloat(cell.style.top), values.scrollHeight - values.clientHeight);
        if (Math.abs(values.scrollTop - top) > 1 || Math.abs(names.scrollTop - top) > 1) {
            values.scrollTop = top;  // both columns of the table, as a person scrolls it
            names.scrollTop = top;
            return false;  // look again after the grids re-render
        }
        const y = cell.getBoundingClientRect().top;
        const shown = [...values.querySelectorAll("div")]
            .filter(c => c.style.top === cell.style.top && c.style.left !== "");
        return shown.length > 0 && shown.every(c => Math.abs(c.getBoundingClientRect().top - y) < 8);
    """, name)


def test_registered_model_page_lists_the_students_versions(server, tiny_store, browser, shots):
    """Issue 15: every distill run registers its student; the registry page of that name lists one
    version per run, each linked to the run that made it."""
    from mlflow.tracking import MlflowClient

    runs = tiny_store["runs"]
    name = runs[0].data.tags["asib.registered_model"].split("/")[1]   # models:/<name>/<version>
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tiny_store["uri"])
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    browser.get(f"{server}/#/models/{urllib.parse.quote(name)}")
    _wait(browser, lambda d: name in _body(d) and all(f"Version {v.version}" in _body(d) for v in versions),
          "the registered model with both versions")
    _close_assistant(browser)
    _screenshot(browser, shots / "registered_model_page.png")
