"""The shopping guide's page, driven in headless Chromium (Debian's ``chromium`` and ``chromium-driver``):
browse and search the catalogue, fill the basket, and see the recommendations the API gives for it."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from fedml.serving.api import create_app
from fedml.serving.source import StaticSource
from tests.conftest import free_port
from tests.test_serving_api import clustered

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "headless Chromium not installed: apt-get install -y chromium chromium-driver (.ci/run does this)",
        allow_module_level=True,
    )
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLUSTER = 10  # clustered(): sku-000..009 one group, sku-010..019 the next, ...


@pytest.fixture(scope="module")
def recommender():
    return clustered(3, n_clusters=6, per_cluster=CLUSTER)


@pytest.fixture(scope="module")
def service(recommender) -> Iterator[str]:
    """The real app under uvicorn on a loopback port, in a thread."""
    import uvicorn

    app = create_app(StaticSource(recommender, name="shopping-guide", version="3", tags={"privacy.epsilon": "1.25",
                                                                                        "privacy.delta": "1e-05",
                                                                                        "privacy.unit": "user"}))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shown(browser, list_id: str) -> list[str]:
    """The item ids a list shows, read in one script (the page may re-render it at any time)."""
    return browser.execute_script(f"return [...document.querySelectorAll('#{list_id} li')].map(li => li.dataset.item)")


def click(browser, selector: str) -> None:
    """Click, retrying while the page replaces the element under us."""

    def clicked(driver) -> bool:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True

    WebDriverWait(browser, 10, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        clicked
    )


def click_add(browser, list_id: str, item: str) -> None:
    click(browser, f'#{list_id} li[data-item="{item}"] button')


def api_answer(service: str, basket: list[str], k: int = 10) -> dict:
    response = httpx.post(service + "/recommend", json={"items": basket, "k": k}, timeout=10)
    response.raise_for_status()
    return response.json()


def wait_for_recommendations(browser, service: str, basket: list[str]) -> list[str]:
    """Wait until the page shows the API's answer for ``basket``; returns the items shown."""
    expected = api_answer(service, basket)
    want = [r["item"] for r in expected["items"]]

    def settled(driver) -> bool:
        busy = driver.find_element(By.ID, "recommendations").get_attribute("aria-busy")
        return busy == "false" and shown(driver, "basket") == basket and shown(driver, "recommendations") == want

    try:
        WebDriverWait(browser, 15).until(settled)
    except Exception as exc:  # say what the page showed instead
        raise AssertionError(
            f"page shows basket {shown(browser, 'basket')} and recommendations {shown(browser, 'recommendations')}, "
            f"API says {want} for {basket}; status: {browser.find_element(By.ID, 'recommendations-status').text!r}"
        ) from exc
    reasons = browser.execute_script(
        "return [...document.querySelectorAll('#recommendations li .reason')].map(e => e.textContent)"
    )
    assert len(reasons) == len(expected["items"])
    for text, row in zip(reasons, expected["items"]):
        assert text.startswith(row["reason"]) and f"score {row['score']:.3f}" in text
    return want


def test_basket_drives_the_recommendations(browser, service, recommender):
    browser.get(service + "/")
    WebDriverWait(browser, 15).until(lambda d: len(shown(d, "catalogue")) == 20)
    assert shown(browser, "catalogue") == [f"sku-{i:03d}" for i in range(20)]
    assert "version 3" in browser.find_element(By.ID, "model-info").text
    assert "ε = 1.25" in browser.find_element(By.ID, "model-info").text

    # empty basket: the popular items, as the API ranks them
    empty = wait_for_recommendations(browser, service, [])
    assert empty == recommender.recommend([], k=10).items

    # search, then add two items of the sku-01x group
    browser.find_element(By.ID, "search").send_keys("sku-01")
    WebDriverWait(browser, 10).until(lambda d: shown(d, "catalogue") == [f"sku-{i:03d}" for i in range(10, 20)])
    click_add(browser, "catalogue", "sku-012")
    first = wait_for_recommendations(browser, service, ["sku-012"])
    click_add(browser, "catalogue", "sku-015")
    second = wait_for_recommendations(browser, service, ["sku-012", "sku-015"])
    assert set(second[:8]) <= {f"sku-{i:03d}" for i in range(10, 20)} - {"sku-012", "sku-015"}
    assert "sku-015" not in second and first != second

    # add a recommended item of another group straight from the recommendations list
    other = next(item for item in second if not item.startswith("sku-01"))
    click_add(browser, "recommendations", other)
    third = wait_for_recommendations(browser, service, ["sku-012", "sku-015", other])
    assert other not in third and third != second

    # remove the first item; then empty the basket: back to the popular items
    click(browser, '#basket li[data-item="sku-012"] button')
    wait_for_recommendations(browser, service, ["sku-015", other])
    click(browser, "#clear")
    assert wait_for_recommendations(browser, service, []) == empty


def test_catalogue_pages(browser, service):
    browser.get(service + "/")
    WebDriverWait(browser, 15).until(lambda d: len(shown(d, "catalogue")) == 20)
    assert browser.find_element(By.ID, "prev").get_attribute("disabled") is not None
    click(browser, "#next")
    WebDriverWait(browser, 10).until(lambda d: shown(d, "catalogue")[:1] == ["sku-020"])
    click(browser, "#next")
    WebDriverWait(browser, 10).until(lambda d: shown(d, "catalogue")[:1] == ["sku-040"])
    assert shown(browser, "catalogue") == [f"sku-{i:03d}" for i in range(40, 60)]
    assert browser.find_element(By.ID, "page-label").text == "41–60 of 60"
    assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None
    browser.find_element(By.ID, "search").send_keys("nothing-like-this")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "catalogue-status").text == "No item matches.")
