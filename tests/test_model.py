"""The transformer: causality, document isolation inside packed rows, positions, FLOP count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsel.model.transformer import (
    ModelConfig,
    Transformer,
    matmul_flops_per_token,
    positions_from_segments,
)

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=32)


@pytest.fixture(scope="module", params=["gated", "gelu"])
def model_and_params(request):
    cfg = ModelConfig(**{**CFG.__dict__, "mlp": request.param,
                         "tie_embeddings": request.param == "gated"})
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), tokens, jnp.ones_like(tokens))
    return model, params


def _logits(model, params, tokens, segments):
    return np.asarray(model.apply(params, jnp.asarray([tokens]), jnp.asarray([segments]))[0])


def test_positions_restart_at_each_document():
    segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(segments)[0], [0, 1, 2, 0, 1, 0, 0, 1])


def test_future_token_changes_no_earlier_logit(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, 16)
    segments = np.ones(16, np.int32)
    base = _logits(model, params, tokens, segments)
    changed = tokens.copy()
    changed[10] = (changed[10] + 1) % 97
    after = _logits(model, params, changed, segments)
    np.testing.assert_allclose(after[:10], base[:10], atol=1e-6)
    assert np.abs(after[10:] - base[10:]).max() > 1e-4  # The change is seen from there on.


def test_other_document_changes_no_logit(model_and_params):
    """Changing document 1 of a packed row changes no logit of documents 2 and 3 in it, and a
    document's logits equal those of the same document alone in its own row."""
    model, params = model_and_params
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, 16)
    segments = np.asarray([1] * 5 + [2] * 6 + [3] * 3 + [0] * 2, np.int32)
    base = _logits(model, params, tokens, segments)
    changed = tokens.copy()
    changed[:5] = rng.integers(0, 97, 5)
    after = _logits(model, params, changed, segments)
    np.testing.assert_allclose(after[5:14], base[5:14], atol=1e-5)
    alone = _logits(model, params, tokens[5:11], np.ones(6, np.int32))
    np.testing.assert_allclose(base[5:11], alone, atol=1e-5)


def test_logit_positions_give_the_full_logits_there(model_and_params):
    """Logits and hidden states at chosen positions (repeats allowed) equal the full call's."""
    model, params = model_and_params
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 9 + [2] * 7, [1] * 14 + [0] * 2], jnp.int32)
    positions = jnp.asarray([[0, 8, 9, 15], [13, 13, 2, 0]], jnp.int32)
    logits, hidden = model.apply(params, tokens, segments, return_hidden=True)
    at_logits, at_hidden = model.apply(params, tokens, segments, return_hidden=True,
                                       logit_positions_BxK=positions)
    assert at_logits.shape == (2, 4, 97)
    rows = np.arange(2)[:, None]
    np.testing.assert_allclose(at_logits, np.asarray(logits)[rows, positions], atol=1e-5)
    np.testing.assert_allclose(at_hidden, np.asarray(hidden)[rows, positions], atol=1e-5)


def test_flops_per_token_counts_every_matmul():
    """Independent count from the parameter shapes: 2 FLOPs per weight per token, plus QK^T and
    AV (2 * L * d each per token per layer) and the LM head."""
    cfg = ModelConfig(vocab_size=100, d_model=16, num_layers=3, num_heads=2, mlp_dim=40,
                      max_seq_len=64, tie_embeddings=True)
    params = Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                   jnp.ones((1, 4), jnp.int32))
    # The blocks' matrices, stacked on a leading layers axis (their norm scales are [layers, d]).
    block_weights = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
                        if "blocks" in jax.tree_util.keystr(path) and x.ndim >= 3)
    expected = 2 * block_weights + 3 * 2 * 2 * 64 * 16 + 2 * 16 * 100
    assert matmul_flops_per_token(cfg, 64) == expected


@pytest.mark.parametrize("tie", [True, False])
def test_row_major_matmul_equals_xla_and_only_xla_needs_no_custom_vjp(tie):
    """`model.matmul`: the CPU row-major projections (`cpu_matmul`) give the logits and
    gradients of flax's own; forward-mode `jax.jvp` of the model works with `xla`."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 9 + [2] * 7], 2, axis=0), jnp.int32)
    models = {m: Transformer(ModelConfig(**{**CFG.__dict__, "matmul": m,
                                            "tie_embeddings": tie}))
              for m in ("xla", "row_major")}
    params = models["xla"].init(jax.random.key(1), tokens, segments)

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply(p, tokens, segments))[..., 0])

    logits = {m: model.apply(params, tokens, segments) for m, model in models.items()}
    np.testing.assert_allclose(logits["row_major"], logits["xla"], rtol=1e-5, atol=1e-5)
    grads = {m: jax.grad(loss, argnums=1)(model, params) for m, model in models.items()}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads["row_major"], grads["xla"])
    tangent = jax.tree.map(jnp.ones_like, params)
    _, dloss = jax.jvp(lambda p: loss(models["xla"], p), (params,), (tangent,))
    assert np.isfinite(float(dloss))


def test_remat_policies_give_the_same_loss_and_gradients():
    """`model.remat` changes what the backward pass recomputes, never the numbers."""
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16], jnp.int32)
    models = {r: Transformer(ModelConfig(**{**CFG.__dict__, "remat": r}))
              for r in ("none", "full", "dots_saveable")}
    params = models["none"].init(jax.random.key(2), tokens, segments)

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply(p, tokens, segments))[..., 0])

    results = {r: jax.value_and_grad(loss, argnums=1)(m, params) for r, m in models.items()}
    for r in ("full", "dots_saveable"):
        assert "remat" in str(jax.make_jaxpr(lambda p, m=models[r]: loss(m, p))(params))
        np.testing.assert_allclose(results[r][0], results["none"][0], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     results[r][1], results["none"][1])


def test_layer_scan_compiles_one_block_whatever_the_depth():
    """Under the scan the compiled program holds one block's matmuls for 2 or 8 layers; unrolled
    (`scan_unroll=0`) it holds one per layer. Params carry a leading `layers` axis."""
    tokens = jnp.zeros((1, 16), jnp.int32)

    def dots(layers, unroll):
        cfg = ModelConfig(**{**CFG.__dict__, "num_layers": layers, "scan_unroll": unroll})
        model = Transformer(cfg)
        params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens,
                                         jnp.ones_like(tokens)))
        kernel = params["params"]["blocks"]["mlp"]["up"]["kernel"]
        assert kernel.shape[0] == layers
        compiled = jax.jit(model.apply).lower(params, tokens, jnp.ones_like(tokens)).compile()
        return compiled.as_text().count(" dot(")

    assert dots(2, 1) == dots(8, 1)
    assert dots(8, 0) > dots(2, 0) > dots(2, 1)
