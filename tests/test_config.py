from __future__ import annotations

import pytest

from opengem.config import Config, ConfigError, KafkaConfig, load


def test_defaults():
    cfg = load(None)
    assert cfg == Config()
    assert cfg.kafka.events_topic == "opengem.events"
    assert cfg.kafka.dlq_topic == "opengem.events.dlq"
    assert cfg.sim.surfaces == cfg.surfaces


def test_toml_file_and_overrides(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('surfaces = ["feed", "reels"]\n[kafka]\npartitions = 8\n[sim]\nseed = 5\n')
    monkeypatch.delenv("OPENGEM_BOOTSTRAP", raising=False)
    cfg = load(f)
    assert cfg.surfaces == ("feed", "reels")
    assert cfg.kafka == KafkaConfig(partitions=8)
    assert cfg.sim.seed == 5 and cfg.sim.surfaces == ("feed", "reels")
    monkeypatch.setenv("OPENGEM_BOOTSTRAP", "k1:9092")
    assert load(f).kafka.bootstrap == "k1:9092"
    assert load(f, **{"kafka.bootstrap": "k2:9092"}).kafka.bootstrap == "k2:9092"


@pytest.mark.parametrize("text, match", [
    ("[kafka]\npartitons = 3\n", "partitons"),
    ("colour = 1\n", "colour"),
    ("[kafka]\npartitions = 'four'\n", "partitions"),
    ("[sim]\nno_such_knob = 1\n", "no_such_knob"),
])
def test_unknown_keys_and_wrong_types_are_errors(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(f)
