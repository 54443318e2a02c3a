"""What a user sees in the MLflow UI and in report.html, checked in headless Chromium against a real ``mlflow ui``
serving the store a real audit wrote (``browsable_audit``)."""

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from raymia.tracking import HEADLINE_METRICS, HEADLINE_SECTION, RUNS_VIEW_KEY
from tests.browser import chromium, missing_browser, mlflow_ui, shoot

pytestmark = pytest.mark.skipif(missing_browser() is not None, reason=str(missing_browser()))
WAIT = 90_000  # ms: the UI's first render on a loaded 2-core machine


@pytest.fixture(scope="module")
def site(browsable_audit, tmp_path_factory):
    """The audit's store behind ``mlflow ui``, one Chromium, and the ids the pages are about."""
    outcome, raw = browsable_audit
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    children = {c.info.run_name: c for c in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'")}
    shots = tmp_path_factory.mktemp("shots")
    with mlflow_ui(outcome.tracking_uri) as base, chromium() as browser:
        yield {"base": base, "browser": browser, "exp": parent.info.experiment_id, "parent": parent,
               "children": children, "outcome": outcome, "shots": shots}


def _page(site, path):
    page = site["browser"].new_page(viewport={"width": 1280, "height": 760})
    page.goto(site["base"] + path, wait_until="load", timeout=WAIT)
    return page


def _hide_assistant(page):
    """Close MLflow's assistant side panel so that screenshots show the page."""
    button = page.locator("button[aria-label='Close']").last
    if button.count():
        button.click()
        page.wait_for_timeout(300)


def test_experiment_opens_on_the_runs_table_with_parent_and_children(site):
    # the experiment link every raymia doc gives: MLflow 3.17 picks its page by the workflow type (GenAI by default)
    page = _page(site, f"/#/experiments/{site['exp']}?workflowType=machine_learning")
    page.get_by_text("browse-audit", exact=True).first.wait_for(timeout=WAIT)
    assert "/runs" in page.url  # redirected to the training-runs table, not the GenAI overview
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the parent's expander
    for name in ("mlp", "mlp+diffence"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=WAIT)
    page.get_by_text("digits.target_members").first.wait_for(timeout=WAIT)  # the Dataset column
    page.close()


def test_raymias_saved_view_shows_the_headline_metrics_as_columns(site):
    # MLflow's default columns hold no metric; the view raymia writes to the experiment adds the headline ones
    page = _page(site, f"/#/experiments/{site['exp']}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
                       "&workflowType=machine_learning")
    page.get_by_text("browse-audit", exact=True).first.wait_for(timeout=WAIT)
    _hide_assistant(page)
    header = page.locator("[role='columnheader']")
    for metric in HEADLINE_METRICS:
        header.filter(has_text=metric).first.wait_for(timeout=WAIT)
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    page.get_by_text("mlp+diffence", exact=True).first.wait_for(timeout=WAIT)
    auc = site["children"]["mlp"].data.metrics["mia.best.auc"]
    page.get_by_text(str(auc)[:6]).first.wait_for(timeout=WAIT)  # a child's value in the table (shown unrounded)
    shoot(page, "mlflow-runs", site["shots"])
    page.close()


def test_raymias_saved_view_opens_the_charts_on_privacy_against_utility(site):
    # MLflow's chart view draws one chart per metric (over a hundred for an audit, alphabetically); raymia's view
    # puts the accuracy-vs-AUC scatter and the headline bars first and collapses the rest
    page = _page(site, f"/#/experiments/{site['exp']}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
                       "&compareRunsMode=CHART&workflowType=machine_learning")
    page.get_by_text(HEADLINE_SECTION, exact=True).first.wait_for(timeout=WAIT)
    _hide_assistant(page)
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # the children's values
    page.get_by_text("test_acc vs. mia.best.auc", exact=True).first.wait_for(timeout=WAIT)
    for metric in HEADLINE_METRICS:
        page.get_by_text(metric, exact=True).first.wait_for(timeout=WAIT)
    sections = {name: page.locator("[role='button'][aria-expanded]").filter(has_text=name).first
                for name in (HEADLINE_SECTION, "Model metrics")}
    assert sections[HEADLINE_SECTION].get_attribute("aria-expanded") == "true"
    assert sections["Model metrics"].get_attribute("aria-expanded") == "false"  # every other metric, collapsed
    shoot(page, "mlflow-charts", site["shots"])
    page.close()


def test_child_run_page_shows_the_roc_figure_and_the_dataset(site):
    child = site["children"]["mlp"]
    page = _page(site, f"/#/experiments/{site['exp']}/runs/{child.info.run_id}?workflowType=machine_learning")
    page.get_by_text("digits.target_members").first.wait_for(timeout=WAIT)
    page.get_by_text(re.compile(r"^members$", re.I)).first.wait_for(timeout=WAIT)  # the dataset's context
    _hide_assistant(page)
    shoot(page, "mlflow-child-run", site["shots"])
    page.close()
    page = _page(site, f"/#/experiments/{site['exp']}/runs/{child.info.run_id}/artifacts/plots/roc_loglog.png"
                       "?workflowType=machine_learning")
    page.get_by_text("roc_loglog.png").first.wait_for(timeout=WAIT)  # the artifact tree shows the figure...
    page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth >= 300)",
                           timeout=WAIT)  # ...and the viewer has decoded it (the ROC PNG; icons are smaller)
    _hide_assistant(page)
    shoot(page, "mlflow-roc", site["shots"])
    page.close()


def test_registered_model_page_shows_the_champion_alias(site):
    page = _page(site, "/#/models/raymia-digits?workflowType=machine_learning")
    page.get_by_text(re.compile(r"^@?\s*champion$")).first.wait_for(timeout=WAIT)  # the alias tag, not prose
    assert page.get_by_text("Version 1").count() >= 1
    _hide_assistant(page)
    shoot(page, "mlflow-champion", site["shots"])
    page.close()


def test_report_html_shows_every_figure_and_every_row(site, tmp_path):
    outcome = site["outcome"]
    client = MlflowClient(outcome.tracking_uri)
    rows = json.loads(open(client.download_artifacts(outcome.run_id, "frontier.json", str(tmp_path))).read())
    page = site["browser"].new_page(viewport={"width": 1280, "height": 760})
    page.goto(outcome.report_path.as_uri(), wait_until="load")
    images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert images == [True] * (1 + len(rows))  # the frontier and one ROC per configuration, all decoded
    first_cells = page.eval_on_selector_all("table tr td:first-child", "els => els.map(e => e.innerText.replace('★', '').trim())")
    assert sorted(first_cells) == sorted(r["configuration"] for r in rows)
    shoot(page, "report", site["shots"])
    page.close()
