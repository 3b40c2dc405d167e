"""amc.tuners on Ray: two local workers give the same history as the in-process executor."""
from __future__ import annotations

from test_tuners import _search, _strip, digits  # noqa: F401 - the shared trained-model fixture (pytest finds it here)

from amc.tuners import RandomSearch


def test_ray_executor_gives_the_local_history(digits):
    import ray  # noqa: F401 - a test extra (amc[ray]): a missing install fails here, it is not skipped

    assert ray.__version__

    tuner = lambda: RandomSearch(samples=6, seed=2, batch=2)  # noqa: E731
    local = _search(tuner(), digits, executor="local")
    remote = _search(tuner(), digits, executor="ray", workers=2)
    assert _strip(remote.history) == _strip(local.history)
    assert remote.policy == local.policy
