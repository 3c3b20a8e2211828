"""What a user sees, in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright
against real ``prefect server`` and ``mlflow server`` on loopback, with the deployments served by
``groundup serve`` on tiny settings.

- Prefect UI: the pipeline deployment's run form, one field filled (the MLflow experiment), submitted; the
  flow run page shows the run Completed with one completed task run per stage.
- MLflow UI: from the finetuned version's description, links lead to its parent version and on to the run
  that recorded the raw text, whose dataset shows the text's digest; the finetune run lists the base model
  among its inputs.

Screenshots of every step go to ``<tmp_path>/screenshots`` (and are copied to ``$GROUNDUP_SCREENSHOTS_DIR``
when set: ``docs/screenshots.py`` regenerates the README's images that way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.browser import (
    Shots,
    browser_page,
    chromium_path,
    follow_version_chain,
    show_flow_run,
    show_model_inputs,
    start_from_run_form,
)
from tests.pipeline_fixtures import judge_reply, sources_dir, tiny_gpt2_dir, tiny_overrides
from tests.test_e2e_servers import PIPELINE, PrefectAPI, client_environment, served
from tests.test_e2e_servers import servers as servers_fixture
from tests.test_pipeline import ALWAYS, CACHED, check_mlflow_graph

servers = servers_fixture  # both UIs' servers, as the end-to-end test starts them

pytestmark = pytest.mark.slow

EXPERIMENT = "browser-test"
TEXT = "the-verdict.txt"
README_IMAGES = {  # screenshot step -> the README's image
    "prefect-run-form": "prefect-run-form.png",
    "prefect-task-runs": "prefect-flow-run.png",
    "mlflow-finetuned-version": "mlflow-model-version.png",
    "mlflow-finetune-run-inputs": "mlflow-run-inputs.png",
}


@pytest.fixture
def browser_available() -> None:
    """Chromium and Playwright first: without them the test skips before starting any server."""
    pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
    chromium_path()


def test_pipeline_started_from_the_prefect_form_and_its_lineage_clicked_through_in_mlflow(
    browser_available, servers, tmp_path, verdict_path, instruction_data_path, gpt2_vocab_dir
):
    out, started = servers
    sources = sources_dir(
        tmp_path / "sources", verdict_path, instruction_data_path, gpt2_vocab_dir, tiny_gpt2_dir(tmp_path / "hf")
    )
    shots = Shots(tmp_path / "screenshots")
    with browser_page(shots.folder / "failure") as page:
        walk_through(page, out, started["prefect"].url, started["mlflow"].url, sources, tmp_path, shots)
    target = os.environ.get("GROUNDUP_SCREENSHOTS_DIR")
    if target:
        for shot in shots.taken:
            step = shot.stem.split("-", 1)[1]
            if step in README_IMAGES:
                shutil.copyfile(shot, Path(target) / README_IMAGES[step])


def walk_through(page, out: Path, prefect_url: str, mlflow_url: str, sources: Path, tmp_path: Path, shots: Shots) -> None:
    from tests.chat_server import ChatServer

    api = PrefectAPI(prefect_url + "/api")
    with ChatServer(judge_reply) as judge:
        # Finetuning the model pretrained in the same run: its chain leads down to the raw text.
        overrides = [*tiny_overrides(out, judge.base_url), "finetune.base=pretrained"]
        with served(out, sources, overrides, client_environment(tmp_path), tmp_path / "serve.log") as serve:
            deployment = api.deployment(PIPELINE, serve)
            flow_run_id = start_from_run_form(page, prefect_url, deployment["id"], "Experiment", EXPERIMENT, shots)
            finished = api.wait(flow_run_id)
            assert finished["state_type"] == "COMPLETED", finished["state"]
            assert finished["parameters"]["config"]["experiment"] == EXPERIMENT  # the field filled in the form
            # While the serving process lives: stopping it marks the runs it still holds as cancelled.
            show_flow_run(page, prefect_url, flow_run_id, CACHED | ALWAYS, shots)

    client = MlflowClient(mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`groundup.flow_run_id` = '{flow_run_id}'")
    pipeline_run = next(r for r in runs if r.data.tags["mlflow.runName"] == "groundup-pipeline")
    stages = {r.data.tags.get("groundup.stage"): r for r in runs}
    base = pipeline_run.data.tags["groundup.model.pretrain"]
    check_mlflow_graph(client, pipeline_run.info.run_id, base)
    text_input = next(i for i in stages["data"].inputs.dataset_inputs if i.dataset.name == TEXT)
    text_sha256 = next(t.value for t in text_input.tags if t.key == "groundup.sha256")

    finetuned = pipeline_run.data.tags["groundup.model.finetune"]
    follow_version_chain(page, mlflow_url, finetuned, base, TEXT, text_sha256, shots)
    finetune_run = stages["finetune_groundup"].info.run_id
    show_model_inputs(page, mlflow_url, experiment.experiment_id, finetune_run, base.split("/")[0], shots)
