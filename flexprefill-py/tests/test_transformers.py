"""The transformers integration on a tiny random Llama: prefill through FlexPrefill, decode and
padded batches through SDPA, logits equal to SDPA's where FlexPrefill runs dense."""

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: transformers tests skipped")
transformers = pytest.importorskip("transformers",
                                   reason="transformers not installed: integration tests skipped")

import flexprefill.transformers as fpt  # noqa: E402


def tiny_llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = impl
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = impl
    return model


def test_prefill_runs_flexprefill_and_matches_sdpa_when_dense():
    name = fpt.register("flexprefill-test", min_budget=4096, collect_reports=True)
    ids = torch.randint(0, 97, (1, 200))
    with torch.no_grad():
        want = tiny_llama("sdpa")(ids).logits
        fpt.reports.clear()
        got = tiny_llama(name)(ids).logits
    assert len(fpt.reports) == 2                     # one call per layer
    assert all(r.dense_fallback for r in fpt.reports)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sparse_prefill_reports_and_stays_close():
    name = fpt.register("flexprefill-sparse", block_size=16, min_budget=32,
                        collect_reports=True)
    ids = torch.randint(0, 97, (1, 256))
    with torch.no_grad():
        want = tiny_llama("sdpa")(ids).logits
        fpt.reports.clear()
        got = tiny_llama(name)(ids).logits
    assert len(fpt.reports) == 2 and all(r.dense_fallback is None for r in fpt.reports)
    assert torch.isfinite(got).all()
    # Next-token predictions barely move on a random model at gamma 0.9.
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def test_decode_and_padding_take_the_sdpa_path():
    name = fpt.register("flexprefill-gen", min_budget=4096, collect_reports=True)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        fpt.reports.clear()
        out = tiny_llama(name).generate(ids, max_new_tokens=5, do_sample=False)
        n_prefill = len(fpt.reports)
        ref = tiny_llama("sdpa").generate(ids, max_new_tokens=5, do_sample=False)
    assert n_prefill == 2                            # the prefill only; decode went to SDPA
    assert torch.equal(out, ref)
    # A padded batch has a mask that is not plain causal: SDPA runs, nothing is reported.
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :10] = 0
    with torch.no_grad():
        fpt.reports.clear()
        tiny_llama(name)(torch.cat([ids, ids]), attention_mask=mask)
    assert fpt.reports == []
