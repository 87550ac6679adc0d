"""Shared fixtures. Redis servers are private: started by the tests on free ports in temp dirs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from hypothesis import settings

from kvplug.testing import RedisClusterServers, RedisServer

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the shared private server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url + "?down_backoff_max=0.5"
    client.flushdb()
    client.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private server this test may kill and restart."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers(3) as cluster:
        yield cluster
