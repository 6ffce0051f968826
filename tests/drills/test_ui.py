"""The Airflow UI in a real browser: headless Chromium against the real api-server of a drill stack.

Checks what a user sees: the connection form for type ``modelroute`` (the provider's fields, the API
key masked) and the "ModelRoute execution" extra link of a finished run's tasks, which must open
that run's execution (on the local server's dashboard page, so it works offline). Screenshots go to
``build/ui/``; the README shows the connection form's.

    .venv/bin/python -m pytest tests/drills/test_ui.py -m drill -q -s
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.airflow_versions import AIRFLOW_V_3_0_PLUS
from tests.drills.browser import MISSING_REASON, headless_chromium
from tests.drills.harness import EXAMPLE_DAG, REPO, AirflowStack

pytestmark = [
    pytest.mark.drill,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not AIRFLOW_V_3_0_PLUS, reason="the UI drill runs Airflow 3's api-server and React UI"
    ),
    pytest.mark.skipif(MISSING_REASON is not None, reason=MISSING_REASON or ""),
]

SCREENSHOTS = REPO / "build" / "ui"
README_IMAGE = REPO / "docs" / "images" / "connection-form.png"
#: Generous: the api-server on a busy 2-core machine can take seconds per page.
WAIT = 60
RUN_ID = "ui-drill"
#: The provider's extra fields (``conn-fields``), under "Extra Fields".
EXTRA_FIELDS = (
    "Read timeout (seconds)",
    "Connect timeout (seconds)",
    "Max retries",
    "Retry deadline (seconds)",
    "Dashboard URL",
    "Allow http/loopback storage URLs (local testing only)",
)


class UiStack(AirflowStack):
    """The drill stack with the UI's connection Test button switched on."""

    def _prepare_home(self) -> None:
        super()._prepare_home()
        self.env["AIRFLOW__CORE__TEST_CONNECTION"] = "Enabled"


@pytest.fixture(scope="module")
def stack() -> Iterator[AirflowStack]:
    """A drill stack with one finished run of the example DAG."""
    stack = UiStack()
    try:
        stack.start()
        assert stack.api is not None
        stack.api.unpause(EXAMPLE_DAG)
        destination = stack.local_destination("ui")[0]
        stack.trigger(EXAMPLE_DAG, RUN_ID, {"prompt": "ui drill", "destination": destination})
        assert stack.wait_for_runs(EXAMPLE_DAG, [RUN_ID], timeout=420)[RUN_ID].state == "success"
    except BaseException:
        print(f"\nThe UI drill stack failed; its home is kept at {stack.home}\n{stack.tails(60)}")
        stack.stop()
        raise
    yield stack
    stack.stop()
    stack.cleanup()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with headless_chromium() as driver:
        yield driver


def wait_until(driver: Any, what: str, condition: Any) -> Any:
    """Wait for ``condition``; on time-out, keep a screenshot and say what the page showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(condition)
    except TimeoutException:
        shot = SCREENSHOTS / f"timed-out-{''.join(c if c.isalnum() else '-' for c in what)}.png"
        driver.save_screenshot(str(shot))
        shown = driver.find_element(By.TAG_NAME, "body").text[-1500:]
        raise AssertionError(f"waited {WAIT} s for {what} ({shot}); the page showed:\n{shown}") from None


def visible(driver: Any, xpath: str, what: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions

    return wait_until(driver, what, expected_conditions.visibility_of_element_located((By.XPATH, xpath)))


def label_input(driver: Any, label: str) -> Any:
    """The form control a visible label belongs to (Chakra labels point at it with ``for``)."""
    element = visible(driver, f"//label[normalize-space()='{label}']", f"the field labelled {label!r}")
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element.get_attribute("for"))


def test_connection_form_shows_the_provider_fields_with_the_key_masked(
    stack: AirflowStack, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{stack.api.base_url}/connections")  # type: ignore[union-attr]
    visible(browser, "//button[contains(., 'Add Connection')]", "the Add Connection button").click()
    visible(browser, "//input[@name='connection_id']", "the Connection ID field").send_keys("modelroute_ui")
    kind = visible(browser, "//input[@role='combobox']", "the Connection Type field")
    kind.click()
    kind.send_keys("ModelRoute")
    visible(browser, "//*[@role='option'][normalize-space()='ModelRoute']", "the ModelRoute type").click()

    key = stack.modelroute_info["api_key"]  # the local server's: the Test button below really connects
    api_key = label_input(browser, "API key")
    assert api_key.get_attribute("type") == "password"  # masked while typed and shown
    assert api_key.get_attribute("placeholder") == "sk_<64 hex>_<8 hex>"
    api_key.send_keys(key)
    label_input(browser, "Base URL").send_keys(stack.modelroute_info["base_url"])
    port = label_input(browser, "Port")  # filled in, so that the Test button works (see README)
    assert "Test button" in port.get_attribute("placeholder")
    port.send_keys(stack.modelroute_info["base_url"].rpartition(":")[2])
    dialog = browser.find_element(By.XPATH, "//*[@role='dialog']")
    dialog.screenshot(str(SCREENSHOTS / "connection-form.png"))
    assert key not in browser.find_element(By.TAG_NAME, "body").text

    visible(browser, "//button[normalize-space()='Extra Fields']", "the Extra Fields section").click()
    for label in EXTRA_FIELDS:  # each of the provider's extra fields is on the form
        visible(browser, f"//label[normalize-space()='{label}']", f"the extra field {label!r}")
    timeout = browser.find_element(By.XPATH, "//input[@name='element_timeout']")
    timeout.send_keys(Keys.CONTROL, "a")
    timeout.send_keys("20", Keys.TAB)
    dialog.screenshot(str(SCREENSHOTS / "connection-form-extras.png"))
    browser.find_element(By.XPATH, "//button[normalize-space()='Save']").click()
    visible(browser, "//*[normalize-space()='modelroute_ui']", "the saved connection in the list")
    saved = stack.api._json("GET", "/api/v2/connections/modelroute_ui")  # type: ignore[union-attr]
    assert (saved["conn_type"], saved["host"]) == ("modelroute", stack.modelroute_info["base_url"])
    assert json.loads(saved["extra"])["timeout"] in (20, "20")


def test_the_test_button_works_for_a_connection_saved_with_its_port(
    stack: AirflowStack, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{stack.api.base_url}/connections")  # type: ignore[union-attr]
    row = visible(browser, "//tr[.//*[normalize-space()='modelroute_ui']]", "the connection's row")
    row.find_element(By.XPATH, ".//button[@aria-label='Test Connection']").click()
    toast = visible(
        browser, "//*[@role='status'][string-length(normalize-space()) > 0]", "the Test button's answer"
    )
    browser.save_screenshot(str(SCREENSHOTS / "test-button.png"))
    assert f"Connected to ModelRoute at {stack.modelroute_info['base_url']}" in toast.text


@pytest.mark.parametrize("task_id", ["submit", "wait"])
def test_extra_link_opens_the_runs_execution(stack: AirflowStack, browser: Any, task_id: str) -> None:
    [execution_id] = stack.server.execution_ids()  # the run's one execution
    expected = f"{stack.modelroute_info['base_url']}/executions/{execution_id}"
    browser.get(f"{stack.api.base_url}/dags/{EXAMPLE_DAG}/runs/{RUN_ID}/tasks/{task_id}/details")  # type: ignore[union-attr]
    link = visible(browser, "//a[normalize-space()='ModelRoute execution']", f"{task_id}'s extra link")
    browser.save_screenshot(str(SCREENSHOTS / f"extra-link-{task_id}.png"))
    assert link.get_attribute("href") == expected

    browser.get(expected)  # the link works offline: the local server's dashboard page
    visible(browser, "//strong[@id='status'][normalize-space()='COMPLETED']", "the execution page")
    assert execution_id in browser.title
    browser.save_screenshot(str(SCREENSHOTS / "dashboard-page.png"))


def test_the_docs_show_the_connection_form() -> None:
    assert "images/connection-form.png" in (REPO / "docs" / "connections.md").read_text()
    assert README_IMAGE.exists() and README_IMAGE.stat().st_size < 150_000
