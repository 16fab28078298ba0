"""The Users page in a real Chromium (marked `browser`): an admin adds and disables a user, no restart;
others do not see it."""

from __future__ import annotations

import pytest

from tests.deploy.console.test_browser import browser, login  # noqa: F401

pytestmark = pytest.mark.browser


def _login(browser, base: str, user: str, password: str):  # noqa: F811
    page = browser.new_page(viewport={"width": 1920, "height": 1080})
    page.goto(base + "/login")
    page.fill("#user", user)
    page.fill("#password", password)
    page.click("#login-btn")
    return page


def test_admin_adds_and_disables_a_user_from_the_page(browser, console_factory):  # noqa: F811
    con = console_factory([])
    op = login(browser, con.base, "olga", wait_live=False)
    assert op.is_hidden("#nav-admin")
    assert op.goto(con.base + "/admin").status == 403
    admin = login(browser, con.base, "ada", wait_live=False)
    admin.click("#nav-admin")
    admin.wait_for_selector('#users tr[data-user="erik"]')
    admin.fill("#add-user [name=name]", "tom")
    admin.select_option("#add-user [name=role]", "engineer")
    admin.fill("#add-user [name=password]", "tom-pass-1")
    admin.click("#add-user button")
    admin.wait_for_selector('#users tr[data-user="tom"]')
    tom = _login(browser, con.base, "tom", "tom-pass-1")
    tom.wait_for_url(con.base + "/")
    tom.wait_for_selector("#nav-export:not([hidden])")  # an engineer
    admin.click('#users tr[data-user="tom"] button.toggle')
    admin.wait_for_selector('#users tr[data-user="tom"] td:has-text("disabled")')
    tom.wait_for_url(con.base + "/login", timeout=15_000)  # the open page goes to the login page
    again = _login(browser, con.base, "tom", "tom-pass-1")
    again.wait_for_url("**/login?failed=1")
