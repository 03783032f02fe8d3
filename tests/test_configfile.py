"""#31 items 3, 4, 33: every YAML reader is bounded. A "billion laughs" file (420 bytes that
expand to 387 million values) fails fast in each of them (timed: it kept `train` busy past
120 s); so do a recursive alias, nesting too deep for the parser, a file past the size cap, and
a config that is not a regular file. No model, in process."""
import os
import threading
import time

import pytest

from shoptune.configfile import ConfigError, MAX_YAML_NODES, parse_override, read_yaml
from tests.conftest import BOMB

BOMB_MSG = (f"its aliases (*name) expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); "
            "refused")


def within(seconds, fn):
    """``fn()``'s result or exception, failing if it runs longer than ``seconds``."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    return out.get("error", out.get("value")), time.monotonic() - start


def readers(tmp_path):
    """Every YAML reader of the project, as a function of a path."""
    from shoptune.data.synth import SynthSpec
    from shoptune.eval.suite import load_suite_config
    from shoptune.experiment.spec import load_spec
    from shoptune.tasks import load_card
    from shoptune.train.config import load_config
    from shoptune.train.mixture import MixtureConfig
    from shoptune.train.plan import read_accelerate
    return {"train config": load_config, "mixture": MixtureConfig.from_yaml, "experiment": load_spec,
            "synthesis spec": SynthSpec.from_yaml, "suite": load_suite_config, "task card": load_card,
            "accelerate config": read_accelerate}


def test_an_alias_bomb_fails_fast_in_every_yaml_reader(tmp_path):
    assert len(BOMB) < 450
    p = tmp_path / "bomb.yaml"
    p.write_text(BOMB)
    for what, read in readers(tmp_path).items():
        err, took = within(30, lambda: read(p))
        assert isinstance(err, ValueError) and f"{p}: {BOMB_MSG}" in str(err), (what, err)
        assert took < 10, (what, took)
    err, _ = within(30, lambda: parse_override(f"lora.target_modules={BOMB.replace(chr(10), ', ').join('{}')}"))
    assert isinstance(err, ConfigError) and str(err).endswith(f": {BOMB_MSG}"), err


def test_aliases_within_the_budget_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("base: &b {r: 8, alpha: 16}\nlora: *b\nother: {<<: *b, r: 4}\n")
    data, lines = read_yaml(p)
    assert data == {"base": {"r": 8, "alpha": 16}, "lora": {"r": 8, "alpha": 16},
                    "other": {"r": 4, "alpha": 16}}
    assert lines[("lora",)] == 2


@pytest.mark.parametrize("text, msg", [
    ("a: &a [1, *a]\n", "an alias refers to a node that contains it (a recursive structure)"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply to read"),
])
def test_recursive_or_too_deep_yaml_is_one_line(tmp_path, text, msg):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    err, _ = within(30, lambda: read_yaml(p))
    assert isinstance(err, ConfigError) and str(err) == f"{p}: {msg}"


def test_a_config_is_a_regular_file_of_bounded_size(tmp_path, monkeypatch):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 120_000)  # 1.2 MB of comments
    for path, why in ((fifo, "a named pipe (FIFO), not a regular file; a config is read from a regular "
                             "file only"),
                      ("/dev/zero", "a character device, not a regular file; a config is read from a "
                                    "regular file only"),
                      (loop, "a symlink loop (too many levels of symbolic links)"),
                      (big, "larger than 1 MiB, the limit for a config (SHOPTUNE_MAX_CONFIG_BYTES raises it)")):
        err, _ = within(30, lambda: read_yaml(path))
        assert isinstance(err, ConfigError) and str(err) == f"{path}: {why}", err
    monkeypatch.setenv("SHOPTUNE_MAX_CONFIG_BYTES", "2MiB")
    err, _ = within(30, lambda: read_yaml(big))
    assert str(err) == f"{big}: empty config (a YAML mapping of settings is wanted)"
    monkeypatch.setenv("SHOPTUNE_MAX_CONFIG_BYTES", "lots")
    err, _ = within(30, lambda: read_yaml(big))
    assert str(err) == "SHOPTUNE_MAX_CONFIG_BYTES: 'lots' is not a size in bytes (e.g. 16000000 or 64MiB)"
