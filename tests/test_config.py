"""Config files, overrides and validation errors."""

import pathlib

import pytest

from lmjax.config import ConfigError, apply_overrides, base_config, config_from_json, load_config, validate

CONFIGS = sorted(pathlib.Path(__file__).parent.parent.glob("configs/*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_files_load_and_validate(path):
    cfg = load_config(path)
    validate(cfg)
    assert cfg.model.family in ("gpt2", "llama")
    docstring = path.read_text().split('"""')[1]
    assert "lmjax " in docstring and "expect" in docstring.lower(), "runnable command and expected result"


def test_overrides_convert_types():
    cfg = apply_overrides(base_config(), ["model.num_layers=2", "train.lr=0.5", "model.tie_embeddings=true",
                                          "data.train=text:*.txt", "train.samples=a,b"])
    assert cfg.model.num_layers == 2 and isinstance(cfg.model.num_layers, int)
    assert cfg.train.lr == 0.5 and cfg.model.tie_embeddings is True
    assert cfg.data.train == "text:*.txt" and cfg.train.samples == ("a", "b")


@pytest.mark.parametrize("override, message", [
    ("model.num_layerz=2", "unknown config key 'model.num_layerz'"),
    ("modle.num_layers=2", "unknown config group 'modle'"),
    ("model.num_layers=two", "expects int"),
    ("model.num_layers=2.5", "expects int"),
    ("model.tie_embeddings=maybe", "expects bool"),
    ("model.num_layers", "key.path=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        apply_overrides(base_config(), [override])


@pytest.mark.parametrize("override, message", [
    ("model.family=gpt3", "model.family"),
    ("model.num_kv_heads=3", "multiple of num_kv_heads"),
    ("model.d_model=250", "divisible by num_heads"),
    ("train.grad_accum=3", "multiple of train.grad_accum"),
    ("model.dtype=int8", "model.dtype"),
    ("mesh.rules.embed=fsdpp", "unknown mesh axis"),
    ("train.decay=step", "train.decay"),
])
def test_invalid_values_fail_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(base_config(), [override]))


def test_json_round_trip():
    cfg = apply_overrides(base_config(), ["model.num_layers=3", "train.samples=x"])
    back = config_from_json(cfg.to_json())
    assert back.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="not valid JSON"):
        config_from_json("{broken")
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_json('{"model": {"bogus": 1}}')


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return 3\n")
    with pytest.raises(ConfigError, match="not a ConfigDict"):
        load_config(bad)
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="boom"):
        load_config(bad)


def test_a_misspelt_knob_in_a_config_file_is_refused_at_any_depth(tmp_path):
    """A config file can add keys that `--config` overrides cannot: each one is caught, however deep."""
    for where, line in [("config group 'train.adversarial'", "c.train.adversarial.metod = 'pgd'"),
                        ("config group 'model'", "c.model.rope_scalling = 'llama3'"),
                        ("config", "c.trian = 1")]:
        path = tmp_path / "typo.py"
        path.write_text("from lmjax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                        f"    {line}\n    return c\n")
        with pytest.raises(ConfigError, match=f"unknown keys in {where}"):
            validate(load_config(path))
    cfg = base_config()
    cfg.mesh.rules["experts"] = "fsdp"  # logical axis names are the user's to choose
    validate(cfg)
