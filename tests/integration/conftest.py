"""Fixtures shared by the integration tests."""

from tests.integration.audit_pg import pg_cluster, pg_url  # noqa: F401  (a throwaway PostgreSQL, once per session)
