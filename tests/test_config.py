from pathlib import Path

import pytest

from core.config import ConfigError, load_params, parse_overrides

REPO = Path(__file__).resolve().parent.parent


def test_profiles_load_and_differ():
    smoke = load_params("smoke", root=REPO)
    production = load_params("production", root=REPO)
    assert smoke.profile == "smoke" and production.profile == "production"
    assert production.corpus.episodes > smoke.corpus.episodes
    assert smoke.path("artifacts") == REPO / "artifacts"


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match="segment.vad_treshold"):
        load_params("smoke", parse_overrides(["segment.vad_treshold=0.4"]), root=REPO)


def test_unknown_profile_and_bad_value():
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        load_params("fast", root=REPO)
    with pytest.raises(ConfigError, match="segment.backend"):
        load_params("smoke", parse_overrides(["segment.backend=whisper"]), root=REPO)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["corpus.episodes"])


def test_override_types_parse_as_yaml():
    params = load_params("smoke", parse_overrides(["corpus.episodes=2", "download.rate_limit=2M"]), root=REPO)
    assert params.corpus.episodes == 2 and params.download.rate_limit == "2M"
