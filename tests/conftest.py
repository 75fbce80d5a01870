from __future__ import annotations

import pytest

from scillm_core.testing import DEV_KEY

AUTH = {"authorization": f"Bearer {DEV_KEY}"}


@pytest.fixture
def auth() -> dict[str, str]:
    return dict(AUTH)
