"""Fixtures every test module shares, one instance each for the whole test run: the tiny offline assets and
the Ray session of the trainer runs (tests/trainer_fixtures.py). The Ray session stops right after the last
test that uses it, so that later tests (the demo starts Ray itself) find none running."""

import signal

import pytest

from trainer_fixtures import SHARED_RAY, ray_session, tiny_assets  # noqa: F401  (fixtures)

# The Ctrl-C tests send SIGINT to processes they start, which inherit an ignored SIGINT across exec. bash ignores
# SIGINT in `cmd &` jobs when job control is off (a script, nohup), so a suite started that way would see its
# children ignore Ctrl-C. A handled signal is reset to the default at exec: the children then get it as from a
# terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_LAST_RAY_USER = pytest.StashKey[bool]()


def pytest_collection_modifyitems(items):
    users = [item for item in items if "ray_session" in getattr(item, "fixturenames", ())]
    if users:
        users[-1].stash[_LAST_RAY_USER] = True


def pytest_runtest_teardown(item, nextitem):
    if item.stash.get(_LAST_RAY_USER, False):
        SHARED_RAY.close()
