"""The examples run (tiny sizes) and show what they claim: fused, eager-equal."""

import pytest

from moe_models import load_example as _load


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


def test_grouped_mm_moe_example(capsys):
    out = _load("grouped_mm_moe").main(["--d-model", "32", "--d-ff", "48", "--batch", "2", "--seq", "8",
                                        "--iters", "1", "--no-inductor", "--inner", "aot_eager"])
    assert out["report"].num_fused == 1
    assert out["error"] < 2e-2 and out["grad_error"] < 2e-2
    assert "torch.compile (moe_fuser)" in capsys.readouterr().out
