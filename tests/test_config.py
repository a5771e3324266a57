import pytest
import yaml

from pydantic import Field

from calray.config import RunConfig, config_from_dict, load_config, parse_override
from calray.errors import ConfigError


def write(tmp_path, tree, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return p


def test_defaults_and_roundtrip(tmp_path):
    p = write(tmp_path, {"name": "x", "optim": {"lr": 0.01}, "method": {"lambda": 2.5, "T": 3}})
    cfg = load_config(p)
    assert cfg.optim.lr == 0.01 and cfg.method.lambda_ == 2.5 and cfg.method.T == 3.0
    # the dumped form uses the YAML name `lambda` and reloads to the same config
    again = write(tmp_path, cfg.to_dict(), "again.yaml")
    assert load_config(again) == cfg


def test_unknown_key_names_file_and_dotted_path(tmp_path):
    p = write(tmp_path, {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "optim.lrr" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_nested_unknown_key_in_encoder(tmp_path):
    p = write(tmp_path, {"model": {"encoders": {"audio": {"nme": "mlp"}}}})
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio\.nme"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, {"data": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        load_config(p)


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)
    p = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_dotted_overrides(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 0.1}})
    cfg = load_config(p, ["optim.lr=0.01", "method.strategy=weak", "data.modalities=[audio]", "method.lambda=0"])
    assert cfg.optim.lr == 0.01 and cfg.method.strategy == "weak"
    assert cfg.data.modalities == ["audio"] and cfg.method.lambda_ == 0.0
    with pytest.raises(ConfigError, match=r"optim\.bogus"):
        load_config(p, ["optim.bogus=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("optim.lr")
    with pytest.raises(ConfigError, match=r"method\.strategy"):
        load_config(p, ["method.strategy=strongest"])


def test_noise_eps_without_kind_rejected():
    with pytest.raises(Exception, match="eps"):
        RunConfig.model_validate({"noise": {"eps": 5}})


@pytest.mark.parametrize("w", [1.0, -0.1, 1.5])
def test_warmup_proportion_outside_unit_interval_rejected(tmp_path, w):
    p = write(tmp_path, {"optim": {"scheduler": "linear_warmup", "warmup_proportion": w}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "optim.warmup_proportion" in msg and "\n" not in msg
    assert load_config(p, ["optim.warmup_proportion=0"]).optim.warmup_proportion == 0.0
    assert RunConfig().optim.warmup_proportion == 0.1


def test_absolute_paths_covers_paths_inside_dataset_params(tmp_path, monkeypatch):
    from calray.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    tree = {"data": {"dataset": "mvsa_single", "root": "data/MVSA", "cache_dir": None,
                     "params": {"tokenizer": "weights/bert", "val_file": "dev.jsonl"}},
            "model": {"encoders": {"image": {"weights": "w/r152.pth", "pretrained_path": None},
                                   "text": {"pretrained_path": "/abs/bert"}}},
            "runtime": {"output_dir": "runs"}}
    out = absolute_paths(tree)
    assert out["data"]["root"] == str(tmp_path / "data/MVSA")
    assert out["data"]["params"]["tokenizer"] == str(tmp_path / "weights/bert")  # relative to the cwd: a path
    assert out["data"]["params"]["val_file"] == "dev.jsonl"  # relative to data.root: left alone
    assert out["model"]["encoders"]["image"]["weights"] == str(tmp_path / "w/r152.pth")
    assert out["model"]["encoders"]["text"]["pretrained_path"] == "/abs/bert"
    assert out["runtime"]["output_dir"] == str(tmp_path / "runs") and out["data"]["cache_dir"] is None
    assert tree["data"]["root"] == "data/MVSA"  # a copy
    assert absolute_paths({}) == {}
    synthetic = {"data": {"dataset": "synthetic", "params": {"modalities": ["a", "b"]}}}
    assert absolute_paths(synthetic) == synthetic


def test_plugin_params_are_validated_by_the_selected_plugins_model_and_recorded_with_defaults(monkeypatch):
    """method.params is checked against the strategy's own Params model at load time (a typo or a
    bad value names method.params and the key); the resolved config records the defaults."""
    from calray.config import Strict
    from calray.method.base import Method
    from calray.registry import STRATEGIES

    class WithParams(Method):
        class Params(Strict):
            alpha: float = Field(0.5, gt=0.0)

    STRATEGIES.names()  # load the real entries first
    monkeypatch.setitem(STRATEGIES._entries, "with_params", WithParams)
    cfg = config_from_dict({"method": {"strategy": "with_params"}})
    assert cfg.method.params == {"alpha": 0.5}
    assert config_from_dict({"method": {"strategy": "with_params", "params": {"alpha": 2}}}).method.params == {"alpha": 2.0}
    for bad, needle in (({"alpha": -1}, "alpha: Input should be greater than 0"), ({"alhpa": 1}, "alhpa: unknown key")):
        with pytest.raises(ConfigError, match=f"method.params: .*{needle}"):
            config_from_dict({"method": {"strategy": "with_params", "params": bad}})
    plugin = WithParams(config_from_dict({"method": {"strategy": "with_params", "params": {"alpha": 3}}}), ["a"], None)
    assert plugin.params.alpha == 3.0
    with pytest.raises(ConfigError, match="strategy 'cal' takes no parameters, got alpha"):
        config_from_dict({"method": {"strategy": "cal", "params": {"alpha": 1}}})
    with pytest.raises(ConfigError, match="model.fusion_params: .*fusion 'concat' takes no parameters"):
        config_from_dict({"model": {"fusion_params": {"rank": 1}}})
