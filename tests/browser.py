"""The browser walkthrough shared by ``tests/test_browser.py`` and ``docs/screenshots.py``: headless
Chromium (Debian's ``chromium`` package; Playwright cannot download its own browser here) driven by
Playwright against the Prefect and MLflow UIs, a screenshot after every step."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

VIEWPORT = {"width": 1400, "height": 1000}
UI_TIMEOUT_MS = 120_000  # a loaded 2-core machine renders slowly


def chromium_path() -> str:
    """``$GROUNDUP_CHROMIUM``, else Debian's ``chromium`` on PATH; skips (naming both) when neither exists."""
    path = os.environ.get("GROUNDUP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("needs a Chromium binary: apt-get install chromium, or set GROUNDUP_CHROMIUM")
    return path


@contextlib.contextmanager
def browser_page(failure_shots: Path | str = "browser-failure") -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport=VIEWPORT)
            context.set_default_timeout(UI_TIMEOUT_MS)
            yield context.new_page()
        except BaseException:
            for number, page in enumerate(context.pages):  # what each page showed when the test failed
                with contextlib.suppress(Exception):
                    page.screenshot(path=f"{failure_shots}-{number}.png")
            raise
        finally:
            browser.close()


class Shots:
    """Numbered full-page screenshots in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.taken: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, page, name: str) -> Path:
        path = self.folder / f"{len(self.taken) + 1:02d}-{name}.png"
        page.wait_for_timeout(500)  # let the last render settle
        page.screenshot(path=str(path), full_page=False)
        self.taken.append(path)
        return path


# ---------------------------------------------------------------------------------------------------------
# Prefect UI
# ---------------------------------------------------------------------------------------------------------


def start_from_run_form(page, prefect_url: str, deployment_id: str, field: str, value: str, shots: Shots) -> str:
    """Open the deployment's custom-run form, set one field of its settings, submit, and follow the
    confirmation's "View run" to the new flow run; returns its id."""
    page.goto(f"{prefect_url}/deployments/deployment/{deployment_id}/run")
    label = page.get_by_text(f"{field} (Optional)", exact=True).first
    label.wait_for()
    label.locator("xpath=following::textarea[1] | following::input[1]").first.fill(value)
    shots(page, "prefect-run-form")
    page.get_by_role("button", name="Submit").click()
    # The confirmation toast's button (its container catches pointer events while it slides in).
    page.get_by_role("button", name="View run").first.dispatch_event("click")
    page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]{36}$"))
    shots(page, "prefect-run-started")
    return page.url.rsplit("/", 1)[-1]


def show_flow_run(page, prefect_url: str, flow_run_id: str, stages: set[str], shots: Shots) -> None:
    """The finished flow run's page: state Completed (no other end state shown), then its task runs, one
    completed run per stage."""
    page.goto(f"{prefect_url}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    for other in ("Cancelled", "Failed", "Crashed"):
        assert page.get_by_text(other, exact=True).count() == 0, f"the flow run page shows {other}"
    page.wait_for_timeout(5000)  # the run graph is drawn on a canvas, after the page has loaded
    shots(page, "prefect-flow-run")
    page.get_by_text("Task Runs", exact=True).first.click()
    page.get_by_text(f"({len(stages)} Completed)").first.wait_for()
    for stage in sorted(stages):
        page.get_by_text(stage, exact=True).first.wait_for()
    shots(page, "prefect-task-runs")


# ---------------------------------------------------------------------------------------------------------
# MLflow UI
# ---------------------------------------------------------------------------------------------------------


def close_assistant(page) -> None:
    """MLflow 3 opens its assistant panel beside every page; closed, the page gets the whole width."""
    close = page.get_by_role("button", name="Close", exact=True)
    with contextlib.suppress(Exception):
        close.first.click(timeout=3000)


def open_link(page, name: str):
    """Click the link named ``name``; links in MLflow descriptions open in a new tab, which is returned."""
    link = page.get_by_role("link", name=name, exact=True).first
    with page.context.expect_page() as opened:
        link.click()
    return opened.value


def follow_version_chain(page, mlflow_url: str, finetuned: str, base: str, text: str, text_sha256: str, shots: Shots) -> None:
    """From the finetuned version's description, click to its parent version, then to the run that recorded
    the raw text, whose dataset shows the text's digest."""
    from groundup.tracking.lineage import version_page

    page.goto(f"{mlflow_url}/{version_page(finetuned)}")
    page.get_by_text(f"Lineage of {finetuned}").wait_for()
    close_assistant(page)
    shots(page, "mlflow-finetuned-version")
    page = open_link(page, base)
    page.get_by_text(f"Lineage of {base}").wait_for()
    close_assistant(page)
    shots(page, "mlflow-base-version")
    page = open_link(page, text)
    page.wait_for_url(re.compile(r".*#/experiments/[^/]+/runs/[0-9a-f]{32}"))
    dataset = page.get_by_text(f"{text} ({text_sha256[:16]})", exact=True).first
    dataset.wait_for()
    close_assistant(page)
    dataset.scroll_into_view_if_needed()
    shots(page, "mlflow-text-dataset-run")
    dataset.click()  # the dataset's drawer: its digest and where it came from
    page.get_by_text(text_sha256[:16]).last.wait_for()
    shots(page, "mlflow-text-dataset")


def show_model_inputs(page, mlflow_url: str, experiment_id: str, run_id: str, base_name: str, shots: Shots) -> None:
    """The finetune run's page lists the base model among its logged models, as an input."""
    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}")
    row = page.get_by_role("row").filter(has_text=base_name).filter(has_text="Input").first
    row.wait_for()
    close_assistant(page)
    row.scroll_into_view_if_needed()
    shots(page, "mlflow-finetune-run-inputs")
