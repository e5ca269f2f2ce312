"""The package and the Rust CLI agree bit for bit on the CPU backend (same file, same knobs):
one implementation behind both. Skips when no CLI binary is built (`cargo build -p
flexprefill-cli`, or `$FLEXPREFILL_CLI`)."""

import numpy as np
import pytest

import cli_io
import flexprefill
from reference import qkv

CLI = cli_io.find_cli()
pytestmark = pytest.mark.skipif(CLI is None, reason="no flexprefill CLI binary built: CLI "
                                "comparison skipped")


@pytest.mark.parametrize("code", ["F32", "F16"])
def test_cpu_output_is_the_cli_output_bit_for_bit(rng, tmp_path, code):
    dt = np.float32 if code == "F32" else np.float16
    # 2048 tokens: the CPU backend runs sparse here (selection, index, block-sparse kernel).
    q, k, v = qkv(rng, 1, 2048, 2048, 4, 2, 64, dtype=dt)
    _, o_cli = cli_io.run(CLI, tmp_path, {"q": (code, q), "k": (code, k), "v": (code, v)},
                          "cpu", ["--gamma", "0.9", "--min-budget", "512"])
    out, rep = flexprefill.flex_prefill_attention(q, k, v, gamma=0.9, min_budget=512,
                                                  return_report=True)
    assert rep.dense_fallback is None and rep.density < 1.0
    assert o_cli.shape == out.shape
    assert np.array_equal(o_cli.view(np.uint8), out.view(np.uint8))


def test_cli_comparison_can_fail(rng, tmp_path):
    """Different knobs give different bits: the comparison above is not vacuous."""
    q, k, v = qkv(rng, 1, 2048, 2048, 4, 2, 64)
    _, o_cli = cli_io.run(CLI, tmp_path, {"q": ("F32", q), "k": ("F32", k), "v": ("F32", v)},
                          "cpu", ["--gamma", "0.5", "--min-budget", "512"])
    out = flexprefill.flex_prefill_attention(q, k, v, gamma=0.9, min_budget=512)
    assert not np.array_equal(o_cli, out)
