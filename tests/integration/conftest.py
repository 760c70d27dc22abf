"""Fixtures shared by the integration tests."""

import pytest

from tests.integration.audit_pg import pg_cluster, pg_url  # noqa: F401  (a throwaway PostgreSQL, once per session)
from tests.integration.service_testing import model_dir_with


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gray_checkpoint):
    """A model dir with the small grayscale test checkpoint as ``gray`` (a module may define its own)."""
    return model_dir_with(tmp_path_factory.mktemp("models"), gray=gray_checkpoint)
