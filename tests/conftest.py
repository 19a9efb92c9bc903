"""Shared fixtures. Service fixtures skip on a laptop without the service and fail in CI."""

pytest_plugins = [
    "tests.fixtures.alone",
    "tests.fixtures.brokers",
    "tests.fixtures.database",
    "tests.fixtures.disks",
    "tests.fixtures.farm",
    "tests.fixtures.api",  # after farm: it builds on it
    "tests.fixtures.browser",
    "tests.fixtures.local_servers",
    "tests.fixtures.noop_jobs",
    "tests.fixtures.reliability",
    "tests.fixtures.seaweed",
]
