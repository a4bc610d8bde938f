"""The dashboard as an operator uses it, in headless Chromium: sign in, start a rollout from the form, watch
it converge without reloading, see a blocked container's alert appear in the live feed, abort a rollout.
Real agents on the private engine, the real broker, ``console serve`` as a process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.agentproc import wait_for
from tests.support.consolesvc import PASSWORD, USER, ConsoleService
from tests.support.fixtures.docker import ALLOWED, OTHER
from tests.support.fixtures.mosquitto import MosquittoBroker
from tests.support.fleet import Fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def service(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[ConsoleService]:
    svc = ConsoleService(tmp_path, mosquitto)
    try:
        yield svc
    finally:
        svc.stop()


def _text(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def test_operator_signs_in_rolls_out_watches_alerts_and_aborts(
    fleet: Fleet,
    service: ConsoleService,
    browser: webdriver.Chrome,
    busybox_images: dict[str, str],
) -> None:
    fleet.start(("gw-1", ["plant"], "enforce"), ("gw-2", ["plant"], "enforce"))
    service.start()
    wait_for(lambda: len(service.get("/api/devices?online=true")["devices"]) == 2, 30, 0.2)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)

    # signing in: a wrong password first
    browser.get(service.url + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys(USER)
    browser.find_element(By.ID, "password").send_keys("wrong password")
    browser.find_element(By.ID, "sign-in").click()
    # a failed sign-in is answered late on purpose (throttling): wait for the page that says so
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "wrong user name or password"))
    browser.find_element(By.ID, "username").clear()
    browser.find_element(By.ID, "username").send_keys(USER)
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "whoami"), USER))
    assert _text(browser, "#stat-online") == "2"

    # a rollout from the form: a canary, then everyone
    browser.get(service.url + "/rollouts")
    layer = {"version": 3, "allowlist": [{"digest": busybox_images[OTHER], "comment": "from the browser"}]}
    browser.find_element(By.ID, "group").send_keys("plant")
    browser.find_element(By.ID, "waves").clear()
    browser.find_element(By.ID, "waves").send_keys("1,100%")
    browser.find_element(By.ID, "document").send_keys(json.dumps(layer))
    browser.find_element(By.ID, "create-rollout").click()
    wait.until(ec.url_contains("/rollouts/"))
    # the page updates itself until every device holds the version
    wait.until(ec.text_to_be_present_in_element((By.ID, "rollout-state"), "completed"))
    wait.until(ec.text_to_be_present_in_element((By.ID, "rollout-converged"), "100.0%"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#rollout-devices tr[data-device]")
    assert {r.get_attribute("data-device"): r.find_element(By.CSS_SELECTOR, ".state").text for r in rows} == {
        "gw-1": "applied",
        "gw-2": "applied",
    }
    assert browser.find_elements(By.CSS_SELECTOR, ".chart polyline")  # convergence over time is drawn

    # the fleet page: a container nobody allows is blocked, and its alert shows up without a reload
    browser.get(service.url + "/")
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
    fleet.engine.run_untrusted("-d", "--name", "seen-in-the-browser", ALLOWED)
    wait.until(ec.text_to_be_present_in_element((By.ID, "alert-feed"), "seen-in-the-browser"))
    assert browser.find_elements(By.CSS_SELECTOR, "#alert-feed li.new")
    # ... and the counters refresh by themselves
    wait.until(lambda d: int(_text(d, "#stat-alerts")) >= 1)

    # a second rollout, created paused, then aborted from its page
    browser.get(service.url + "/rollouts")
    browser.find_element(By.ID, "group").send_keys("plant")
    browser.find_element(By.ID, "document").send_keys(json.dumps({"version": 4, "allowlist": []}))
    browser.find_element(By.CSS_SELECTOR, "#start option[value=paused]").click()
    browser.find_element(By.ID, "create-rollout").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "rollout-state"), "paused"))
    browser.find_element(By.ID, "action-abort").click()
    wait.until(ec.alert_is_present())
    browser.switch_to.alert.accept()  # "Abort: are you sure?"
    wait.until(ec.text_to_be_present_in_element((By.ID, "rollout-state"), "aborted"))
    assert f"aborted by {USER}" in _text(browser, "#rollout-reason")
    for device in ("gw-1", "gw-2"):  # nothing of version 4 reached the devices
        assert fleet.request(device, "GET", "policy", {"layer": "group:plant"})[1]["version"] == 3

    # what the operator did is in the audit log, under their name
    browser.get(service.url + "/audit")
    audit = _text(browser, "#audit-table")
    for action in ("login", "login.failed", "rollout.create", "rollout.abort"):
        assert action in audit
    assert USER in audit
