"""Suite-wide fixtures (this file applies to tests/, plugins/ and contrib/)."""

import pytest


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """scillm runs on asyncio. anyio would also run every async test on trio whenever trio is installed (Selenium,
    used by the dashboard's browser tests, brings it)."""
    return "asyncio"
