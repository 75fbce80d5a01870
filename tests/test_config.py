"""Config: strict TOML sections, .env under the real environment, clear errors naming the key."""

from __future__ import annotations

import pytest

from scillm_core.config import ConfigError, Env, load_config
from scillm_core.testing import make_app


def test_dotenv_never_overrides_the_environment(tmp_path):
    (tmp_path / ".env").write_text("DEEPSEEK_API_KEY=from-dotenv\nGLM_API_KEY=glm-from-dotenv\n")
    env = Env({"DEEPSEEK_API_KEY": "from-env"}, dotenv=tmp_path / ".env")
    assert env["DEEPSEEK_API_KEY"] == "from-env"
    assert env["GLM_API_KEY"] == "glm-from-dotenv"


def test_toml_file_is_read_and_structured(tmp_path):
    (tmp_path / "scillm.toml").write_text(
        '[aliases]\nfast = "deepseek/deepseek-chat"\n[groups.smart]\nmodels = ["glm/glm-5.1", "fast"]\n')
    config = load_config(env={"SCILLM_DATA_DIR": str(tmp_path / "d")}, cwd=tmp_path)
    app = make_app(config=config.tables, entry_points=True)
    assert app.runtime.config.aliases == {"fast": "deepseek/deepseek-chat"}
    assert app.runtime.config.groups["smart"].models == ("glm/glm-5.1", "fast")


@pytest.mark.parametrize(("tables", "expected"), [
    ({"bogus": {}}, "unknown table [bogus]"),
    ({"server": {"prot": 1}}, "unknown key 'prot'"),
    ({"server": {"port": "4001"}}, "expected integer, got string at server.port"),
    ({"groups": {"g": {"models": "a"}}}, "expected array, got string at groups.g.models"),
    ({"groups": {"g": {}}}, "required field is missing at groups.g.models"),
])
def test_wrong_key_or_type_stops_startup_naming_it(tables, expected):
    with pytest.raises(ConfigError) as caught:
        make_app(config=tables)
    assert expected in str(caught.value)


@pytest.mark.parametrize(("tables", "expected"), [
    ({"providers": {"deepsek": {"base_url": "https://api.deepseek.com/v1"}}},
     "unknown provider table [providers.deepsek]: no provider is named 'deepsek'. Did you mean: deepseek?"),
    ({"providers": {"mine": {"kind": "vllm", "base_url": "http://127.0.0.1:8000/v1"}}},
     "unknown provider kind 'vllm' at providers.mine.kind (known kinds: openai-compatible)"),
    ({"providers": {"deepseek": {"key_env": "MY_KEY"}}},
     "key_env at providers.deepseek.key_env is only for a provider of your own"),
    ({"providers": {"openai": {"kind": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"}}},
     "under the name of the built-in provider 'openai'"),
    ({"providers": {"gemini": {"kind": "openai-compatible", "base_url": "http://127.0.0.1:8000/v1"}}},
     "provider 'gemini' registered twice"),
    ({"providers": {"mine": {"kind": "openai-compatible"}}}, "base_url is required"),
    ({"providers": {"mine": {"kind": "openai-compatible", "base_url": "localhost:8000"}}},
     "base_url must start with http:// or https://"),
    ({"providers": {"mine": {"kind": "openai-compatible", "base_url": "http://h/v1", "prefix": ""}}},
     'with prefix = "" give models'),
    ({"providers": {"mine": {"kind": "openai-compatible", "base_url": "http://h/v1", "max_concurrency": 0}}},
     "at providers.mine.max_concurrency"),
    ({"providers": {"mine": {"kind": "openai-compatible", "base_url": "http://h/v1", "api_key": "sk-x"}}},
     "unknown key 'api_key'"),
    ({"providers": {"deepseek": {"max_concurrency": 2}}, "resilience": {"limits": {"deepseek": {}}}},
     "limits of provider 'deepseek' are set twice"),
])
def test_a_wrong_provider_table_stops_startup_naming_it(tables, expected):
    with pytest.raises(ConfigError) as caught:
        make_app(config=tables)
    assert expected in str(caught.value)


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "scillm.toml"
    path.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})


def test_data_dir_from_env(tmp_path):
    assert load_config(env={"SCILLM_DATA_DIR": str(tmp_path)}, cwd=tmp_path).data_dir == tmp_path


def test_absent_tables_get_their_defaults_once():
    runtime = make_app(config={"server": {"heartbeat_s": 3}}).runtime
    config = runtime.config
    assert config.server.heartbeat_s == 3
    files = config.sections["files"]  # a plugin's table that the file does not have
    assert files.enabled is True and config.sections["files"] is files
    assert config.sections["aliases"] == {}
