"""Config loading: defaults, shipped configs, overrides, and error messages that name file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.config import ConfigError, RunConfig, dump_config, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, RunConfig)


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.sampling.n >= 2 and cfg.async_.max_staleness >= 0


def test_dump_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["trainer.lr=3e-6"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_overrides_apply_with_types():
    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml",
        ["trainer.lr=1e-6", "rollout.local_workers=3", "async.max_staleness=0", "sampling.stop=[a, b]"],
    )
    assert cfg.trainer.lr == pytest.approx(1e-6)
    assert cfg.rollout.local_workers == 3
    assert cfg.async_.max_staleness == 0
    assert cfg.sampling.stop == ["a", "b"]


def test_scientific_notation_in_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  lr: 1e-5\n")
    assert load_config(path).trainer.lr == pytest.approx(1e-5)


def test_discriminated_data_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  source: {type: jsonl, path: data.jsonl}\n")
    cfg = load_config(path)
    assert cfg.data.source.type == "jsonl"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.lr=-1"], ["trainer.lr", "greater than 0"]),
        (["trainer.lrr=1"], ["trainer.lrr", "unknown key"]),
        (["sampling.n=abc"], ["sampling.n", "valid integer"]),
        (["sampling.n=1"], ["sampling.n", "greater than or equal to 2"]),
        (["data.source.type=sql"], ["data.source", "unknown type 'sql'"]),
        (["algorithm.loss=ppo2"], ["algorithm.loss", "grpo"]),
        (["trainer.micro_batch_size=100000"], ["micro_batch_size", "exceeds the batch"]),
    ],
)
def test_bad_values_name_file_key_and_reason(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    msg = str(info.value)
    assert "configs/quickstart.yaml" in msg
    for part in expected:
        assert part in msg


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml[\s\S]*trainer.learning_rate: unknown key"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [("trainer: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")],
)
def test_malformed_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope/missing.yaml")


@pytest.mark.parametrize("text", ["trainer.lr", "=3", "a..b=1"])
def test_malformed_overrides(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["run_name.x=1"])


def test_every_field_is_documented():
    """STYLE.md: every field has a one-line doc (shown in docs and --dry-run users' lookups)."""
    from pydantic import BaseModel

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig, "")


def test_configuration_docs_are_current():
    """docs/configuration.md is generated from rl/config/; regenerate with scripts/gen_config_docs.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "configuration.md").read_text() == module.render(), "run scripts/gen_config_docs.py"


def test_lora_format_needs_adapters_to_train():
    with pytest.raises(ConfigError, match="weights.format 'lora' ships adapters only: it needs trainer.lora"):
        load_config(None, ["weights.format=lora"])
    cfg = load_config(None, ["weights.format=lora", "trainer.lora.r=8", "trainer.lora.modules_to_save=[norm]"])
    assert cfg.trainer.lora.r == 8 and cfg.trainer.lora.modules_to_save == ["norm"]
