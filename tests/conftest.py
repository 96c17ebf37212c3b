"""Shared pytest fixtures and the hypothesis profiles. Run the suite with `bash tools/test.sh`.

The suite runs under the `deterministic` profile: hypothesis derives every example from the test's own source, so
one commit gives one result on every run and machine, and it neither reads nor writes an example database nor prints
reproduction blobs. `bash tools/fuzz.sh` selects the `fuzz` profile instead (HYPOTHESIS_PROFILE=fuzz): fresh random
examples on every run, FUZZ_EXAMPLES of them per test (default 2000). A failure it finds becomes an explicit
`@example` in the test, so the deterministic suite keeps it.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Timing is the one thing a derandomized run cannot fix, so no deadline and no too-slow health check in either.
settings.register_profile(
    "deterministic",
    derandomize=True,
    max_examples=40,
    database=None,
    print_blob=False,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")),
    database=None,
    print_blob=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine every op that waits for a
    busy core runs 20-50x slower (measured); restores the setting for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
