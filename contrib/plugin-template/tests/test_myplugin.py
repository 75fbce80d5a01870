from __future__ import annotations

import scillm_myplugin

from scillm_core.testing import make_app


def test_template_registers_and_reports_health(tmp_path):
    app = make_app(plugins=[("myplugin", scillm_myplugin)], config={"myplugin": {"enabled": True}},
                   data_dir=tmp_path)
    assert app.runtime.hooks.health(app.runtime)["myplugin"]["fails"] == "open"
    assert app.runtime.config.section("myplugin").enabled is True
