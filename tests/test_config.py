"""The Hydra config: presets compose, the env preset reads the environment, bad values name the key."""
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from actdata.config import Config, ConfigError, register, to_config, validate
from actdata.serving.main import CONF_DIR

register()


def load(*overrides) -> Config:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("preset,size,dim,dtype", [
    ("test", 1_000, None, "float32"),
    ("production", 1_000_000, 4096, "auto"),
    ("large-scale", 10_000_000, 4096, "auto"),
])
def test_presets_compose(preset, size, dim, dtype):
    cfg = load(f"+preset={preset}")
    validate(cfg)
    assert (cfg.buffer.size, cfg.buffer.activation_dim, cfg.buffer.dtype) == (size, dim, dtype)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000 and cfg.buffer.max_reads == 1


def test_test_preset_synthetic_is_1000_by_768():
    from actdata.serving.main import sample_shape

    cfg = load("+preset=test", "generator.source=synthetic")
    assert cfg.buffer.size == 1000 and sample_shape(cfg) == (768,)


def test_env_preset_reads_the_environment(monkeypatch):
    for k, v in {"BUFFER_SIZE": "4096", "ACTIVATION_DIM": "512", "MODEL_NAME": "/models/gpt2",
                 "DATASET_NAME": "/data/corpus.jsonl", "HOST": "0.0.0.0", "PORT": "9123"}.items():
        monkeypatch.setenv(k, v)
    cfg = load("+preset=env")
    validate(cfg)
    assert (cfg.buffer.size, cfg.buffer.activation_dim) == (4096, 512)
    assert (cfg.model.name, cfg.dataset.name) == ("/models/gpt2", "/data/corpus.jsonl")
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 9123)


def test_env_preset_defaults(monkeypatch):
    for k in ("BUFFER_SIZE", "ACTIVATION_DIM", "MODEL_NAME", "DATASET_NAME", "HOST", "PORT", "GENERATOR_SOURCE"):
        monkeypatch.delenv(k, raising=False)
    cfg = load("+preset=env")
    assert (cfg.buffer.size, cfg.model.name, cfg.dataset.name, cfg.server.port) == (2048, "embedded", "embedded", 8000)


@pytest.mark.parametrize("override,key", [
    ("buffer.size=-5", "buffer.size"),
    ("buffer.size=0", "buffer.size"),
    ("buffer.dtype=int8", "buffer.dtype"),
    ("buffer.min_fill=1.5", "buffer.min_fill"),
    ("buffer.max_reads=0", "buffer.max_reads"),
    ("buffer.max_groups=65", "buffer.max_groups"),
    ("buffer.max_groups=-1", "buffer.max_groups"),
    ("buffer.groups_expected=3", "buffer.groups_expected"),  # more than buffer.max_groups (0)
    ("buffer.group_idle_s=0", "buffer.group_idle_s"),
    ("buffer.group_lag=drop", "buffer.group_lag"),
    ("server.port=70000", "server.port"),
    ("server.host=example.com", "server.host"),
    ("server.workers=0", "server.workers"),
    ("generator.source=magic", "generator.source"),
    ("generator.sites=[nowhere]", "generator.sites"),
    ("generator.layers=[-1]", "generator.layers"),
    ("model.dtype=float64", "model.dtype"),
    ("log_level=LOUD", "log_level"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        validate(load("+preset=test", override))
    assert str(e.value).startswith(key + ":")


def _serve(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "actdata.serve", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def _allocated(prefix: str) -> list[str]:
    """Files of this test's own buffer prefix in /dev/shm (other tests may create buffers meanwhile)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def test_cli_bad_value_stops_before_allocating(tmp_path):
    prefix = f"actdata-badvalue-{os.getpid()}"
    r = _serve("+preset=test", "generator.source=synthetic", "buffer.size=-5", "server.log_file=null",
               f"buffer.prefix={prefix}", cwd=tmp_path)
    assert r.returncode == 2
    assert "buffer.size" in r.stderr and "Traceback" not in r.stderr
    assert _allocated(prefix) == []


def test_cli_buffer_larger_than_shm_is_a_clear_error(tmp_path):
    prefix = f"actdata-toolarge-{os.getpid()}"
    r = _serve("+preset=test", "generator.source=synthetic", "buffer.size=100000000", "buffer.activation_dim=4096",
               "server.log_file=null", f"buffer.prefix={prefix}", cwd=tmp_path)
    assert r.returncode == 2
    assert "buffer.size" in r.stderr and "GB free" in r.stderr and "Traceback" not in r.stderr
    assert _allocated(prefix) == []


def test_cli_type_error_names_the_key(tmp_path):
    r = _serve("+preset=test", "buffer.size=lots", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "actdata: bad config: buffer.size: 'lots' is not an integer"


def test_cli_unknown_key_is_one_line_with_the_nearest_key(tmp_path):
    r = _serve("+preset=test", "bufer.size=5", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "actdata: bad config: bufer.size: no such key (did you mean buffer.size?)"


@pytest.mark.parametrize("arg,err", [
    ("buffer.sizee=5", "buffer.sizee: no such key (did you mean buffer.size?)"),
    ("buffer.zzz=1", "buffer.zzz: no such key (buffer has size, activation_dim,"),
    ("zzz=1", "zzz: no such key (the top-level keys are buffer, cluster,"),
    ("buffer.size=1.5", "buffer.size: '1.5' is not an integer"),
    ("buffer.min_fill=half", "buffer.min_fill: 'half' is not a number"),
    ("generator.compile=maybe", "generator.compile: 'maybe' is not true or false"),
])
def test_overrides_are_checked_against_the_schema(arg, err):
    from actdata.config import check_overrides

    with pytest.raises(ConfigError) as e:
        check_overrides(["+preset=test", arg])
    assert str(e.value).startswith(err)


def test_overrides_that_pass_and_an_integer_in_float_notation():
    from actdata.config import check_overrides

    args = ["+preset=test", "generator.sites=[mlp_in,mlp_out]", "buffer.activation_dim=null", "buffer.min_fill=0.5",
            "generator.compile=true", "model.name=${oc.env:MODEL,x}", "buffer.max_reads=1,2", "+extra=1",
            "hydra.run.dir=.", "--cfg", "job"]
    assert check_overrides(args) == args  # Hydra's to check
    assert check_overrides(["buffer.size=1e6", "server.port=8001"]) == ["buffer.size=1000000", "server.port=8001"]
    assert load(*check_overrides(["+preset=test", "buffer.size=2.5e3"])).buffer.size == 2500


def test_cli_prints_composed_config_and_leaves_no_outputs(tmp_path):
    r = _serve("+preset=production", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "size: 1000000" in r.stdout and "activation_dim: 4096" in r.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()
