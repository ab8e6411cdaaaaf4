"""Fixtures every test module shares, one instance each for the whole test run: the tiny offline assets and
the Ray session of the trainer runs (tests/trainer_fixtures.py). The Ray session stops right after the last
test that uses it, so that later tests (the demo starts Ray itself) find none running."""

import pytest

from trainer_fixtures import SHARED_RAY, ray_session, tiny_assets  # noqa: F401  (fixtures)

_LAST_RAY_USER = pytest.StashKey[bool]()


def pytest_collection_modifyitems(items):
    users = [item for item in items if "ray_session" in getattr(item, "fixturenames", ())]
    if users:
        users[-1].stash[_LAST_RAY_USER] = True


def pytest_runtest_teardown(item, nextitem):
    if item.stash.get(_LAST_RAY_USER, False):
        SHARED_RAY.close()
