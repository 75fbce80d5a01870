from __future__ import annotations

import pytest

from scillm_core import ConfigError
from scillm_core.testing import make_app


@pytest.mark.parametrize(("table", "where"), [
    ({"max_retry": 3}, "resilience.max_retry"),
    ({"limits": {"openai": {"max_concurrency": 0}}}, "resilience.limits.openai"),
    ({"breaker_threshold": "five"}, "resilience.breaker_threshold"),
])
def test_wrong_resilience_config_stops_startup_naming_the_key(table, where, tmp_path):
    with pytest.raises(ConfigError) as caught:
        make_app(config={"resilience": table}, data_dir=tmp_path)
    assert where in str(caught.value)


def test_doctor_flags_limits_for_unknown_providers(tmp_path):
    app = make_app(config={"resilience": {"limits": {"opneai": {"max_concurrency": 2}}}}, data_dir=tmp_path)
    runtime = app.runtime  # the outermost layer (request ids) keeps the runtime
    checks = [c for c in runtime.hooks.doctor(runtime) if c["check"] == "resilience limits"]
    assert checks and checks[0]["ok"] is False and "opneai" in checks[0]["detail"]
