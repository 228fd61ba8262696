"""The examples run (tiny sizes) and show what they claim: fused, eager-equal."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_switch_transformer_example(capsys):
    out = _load("switch_transformer").main(["--d-model", "32", "--d-ff", "64", "--batch", "2", "--seq", "8",
                                            "--iters", "1", "--no-inductor", "--inner", "aot_eager"])
    assert out["report"].num_fused == 1 and out["error"] < 1e-5
    assert "torch.compile (moe_fuser)" in capsys.readouterr().out


def test_hf_mixtral_example():
    pytest.importorskip("transformers")
    out = _load("hf_mixtral").main(["--layers", "2", "--hidden", "32", "--tokens", "8", "--no-timing",
                                    "--inner", "aot_eager"])
    assert out["report"].num_fused == 2
    assert out["error"] < 1e-4 and out["grad_error"] < 1e-4
