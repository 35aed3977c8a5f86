"""Fused q/k/v and gate/up projections (``fuse_linears``, ``is_fused``, ``Attention.fuse``, ``MLP.fuse``,
``CausalLM.fuse_projections``): same outputs, parameters become views of one tensor (no extra memory,
names and values unchanged), and the unfused path takes over once the views are replaced."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn

from longctx.bench.sweep import random_model, shape_config
from longctx.model.config import ModelConfig
from longctx.model.decoder import Attention, CausalLM, fuse_linears, is_fused
from longctx.model.rope import Rotary

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOL = dict(rtol=1e-5, atol=1e-6)


class RecordingContext:
    """Attention context that returns q (only the projections are under test) and records q, k, v."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Tensor, Tensor, Tensor]] = []

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary) -> Tensor:
        self.calls.append((layer, q.clone(), k.clone(), v.clone()))
        return q


def _config(**overrides) -> ModelConfig:  # noqa: ANN003
    cfg = shape_config("tiny", 256)
    return dataclasses.replace(cfg, vocab_size=300, **overrides)


def _model(seed: int = 0, **overrides) -> CausalLM:  # noqa: ANN003
    return random_model(_config(**overrides), "cpu", torch.float32, seed=seed)


CONFIGS = [dict(), dict(qkv_bias=True), dict(qkv_bias=True, mlp_bias=True, o_bias=True), dict(qk_norm=True)]


def _attn_fused(attn: Attention) -> bool:
    return is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)


def _x(cfg: ModelConfig, n: int = 7, seed: int = 1) -> Tensor:
    return torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))


def _ids(n: int = 11, seed: int = 2) -> Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _forward(model: CausalLM, ids: Tensor) -> tuple[Tensor, RecordingContext]:
    ctx = RecordingContext()
    return model(ids, ctx), ctx


def _param_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- fuse_linears / is_fused -------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_linears_makes_views_of_one_tensor(bias: bool) -> None:
    torch.manual_seed(0)
    lins = [nn.Linear(8, 5, bias=bias), nn.Linear(8, 3, bias=bias), nn.Linear(8, 4, bias=bias)]
    before_w = [lin.weight.detach().clone() for lin in lins]
    before_b = [lin.bias.detach().clone() for lin in lins] if bias else None
    x = torch.randn(6, 8)
    with torch.no_grad():
        expected = [lin(x) for lin in lins]
    weight, fused_bias = fuse_linears(lins)
    assert weight.shape == (12, 8)
    assert torch.equal(weight, torch.cat(before_w))
    offset = 0
    for i, lin in enumerate(lins):
        assert isinstance(lin.weight, nn.Parameter) and not lin.weight.requires_grad
        assert torch.equal(lin.weight, before_w[i])
        assert lin.weight.data_ptr() == weight.data_ptr() + offset * 8 * weight.element_size()
        offset += lin.weight.shape[0]
    if bias:
        assert fused_bias is not None and fused_bias.shape == (12,)
        assert torch.equal(fused_bias, torch.cat(before_b))
        offset = 0
        for i, lin in enumerate(lins):
            assert torch.equal(lin.bias, before_b[i])
            assert lin.bias.data_ptr() == fused_bias.data_ptr() + offset * fused_bias.element_size()
            offset += lin.bias.shape[0]
    else:
        assert fused_bias is None and all(lin.bias is None for lin in lins)
    with torch.no_grad():
        fused_out = torch.nn.functional.linear(x, weight, fused_bias).split([5, 3, 4], dim=-1)
        for lin, e, f in zip(lins, expected, fused_out, strict=True):
            assert torch.allclose(lin(x), e, **TOL)
            assert torch.allclose(f, e, **TOL)
    # a write through the fused tensor shows in the linears (views, not copies)
    weight[5, 0] = 123.0
    assert lins[1].weight[0, 0].item() == 123.0


def test_is_fused() -> None:
    lins = [nn.Linear(4, 2), nn.Linear(4, 3)]
    assert not is_fused(lins, None)
    fused = fuse_linears(lins)
    assert is_fused(lins, fused)
    assert not is_fused(lins[::-1], fused)  # views in the wrong order
    assert not is_fused(lins, (fused[0].clone(), fused[1]))
    assert not is_fused(lins, (fused[0], fused[1].clone()))  # a stale bias breaks it too
    lins[1].weight = nn.Parameter(lins[1].weight.detach().clone())  # replacing any one linear's weight
    assert not is_fused(lins, fused)


def test_replaced_second_weight_falls_back_to_unfused() -> None:
    """Replacing k_proj (not the first linear) must not be ignored by the fused path."""
    model = _model()
    attn: Attention = model.model.layers[0].self_attn
    attn.fuse()
    new_k = torch.randn_like(attn.k_proj.weight)
    attn.k_proj.weight = nn.Parameter(new_k)
    assert not is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)
    ctx = RecordingContext()
    x = _x(model.config)
    attn(x, ctx)
    k = ctx.calls[0][2]
    torch.testing.assert_close(k.reshape(x.shape[0], -1), torch.nn.functional.linear(x, new_k, attn.k_proj.bias))


# ---- modules --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", CONFIGS)
def test_attention_fuse_same_projections(overrides: dict) -> None:
    model = _model(**overrides)
    cfg = model.config
    ref = copy.deepcopy(model)
    attn: Attention = model.model.layers[1].self_attn
    attn_ref: Attention = ref.model.layers[1].self_attn
    attn.fuse()
    assert attn.qkv is not None and is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)
    x = _x(cfg)
    c1, c2 = RecordingContext(), RecordingContext()
    with torch.no_grad():
        out = attn(x, c1)
        out_ref = attn_ref(x, c2)
    assert out.shape == (x.shape[0], cfg.hidden_size)
    assert torch.allclose(out, out_ref, **TOL)
    (_, q, k, v), (_, q0, k0, v0) = c1.calls[0], c2.calls[0]
    assert q.shape == (7, cfg.num_heads, cfg.head_dim) and k.shape == v.shape == (7, cfg.num_kv_heads, cfg.head_dim)
    for a, b in ((q, q0), (k, k0), (v, v0)):
        assert torch.allclose(a, b, **TOL)
    # projections are views of the fused weight, in q, k, v order
    w, b = attn.qkv
    hidden, elt = cfg.hidden_size, w.element_size()
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert w.shape == (q_rows + 2 * kv_rows, hidden)
    assert attn.q_proj.weight.data_ptr() == w.data_ptr()
    assert attn.k_proj.weight.data_ptr() == w.data_ptr() + q_rows * hidden * elt
    assert attn.v_proj.weight.data_ptr() == w.data_ptr() + (q_rows + kv_rows) * hidden * elt
    if cfg.qkv_bias:
        assert b is not None and b.shape == (q_rows + 2 * kv_rows,)
        assert attn.q_proj.bias.data_ptr() == b.data_ptr()
        assert attn.k_proj.bias.data_ptr() == b.data_ptr() + q_rows * elt
        assert attn.v_proj.bias.data_ptr() == b.data_ptr() + (q_rows + kv_rows) * elt
        assert torch.equal(b, torch.cat([attn_ref.q_proj.bias, attn_ref.k_proj.bias, attn_ref.v_proj.bias]))
    else:
        assert b is None


@pytest.mark.parametrize("overrides", CONFIGS)
def test_mlp_fuse_same_output(overrides: dict) -> None:
    model = _model(**overrides)
    cfg = model.config
    ref = copy.deepcopy(model)
    mlp, mlp_ref = model.model.layers[0].mlp, ref.model.layers[0].mlp
    mlp.fuse()
    assert mlp.gate_up is not None and is_fused([mlp.gate_proj, mlp.up_proj], mlp.gate_up)
    w, b = mlp.gate_up
    i, elt = cfg.intermediate_size, w.element_size()
    assert w.shape == (2 * i, cfg.hidden_size)
    assert mlp.gate_proj.weight.data_ptr() == w.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == w.data_ptr() + i * cfg.hidden_size * elt
    if cfg.mlp_bias:
        assert b is not None and mlp.up_proj.bias.data_ptr() == b.data_ptr() + i * elt
    else:
        assert b is None
    x = _x(cfg, n=9)
    with torch.no_grad():
        out, out_ref = mlp(x), mlp_ref(x)
        # and by hand: down(silu(gate(x)) * up(x))
        g, u = x @ mlp_ref.gate_proj.weight.T, x @ mlp_ref.up_proj.weight.T
        if cfg.mlp_bias:
            g, u = g + mlp_ref.gate_proj.bias, u + mlp_ref.up_proj.bias
        by_hand = mlp_ref.down_proj(torch.nn.functional.silu(g) * u)
    assert out.shape == (9, cfg.hidden_size)
    assert torch.allclose(out, out_ref, **TOL)
    assert torch.allclose(out, by_hand, rtol=1e-4, atol=1e-5)


# ---- whole model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", CONFIGS)
def test_fuse_projections_model(overrides: dict) -> None:
    model = _model(**overrides)
    ref = copy.deepcopy(model)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    numel_before = _param_numel(model)
    model.fuse_projections()

    sd_after = model.state_dict()
    assert list(sd_after) == list(sd_before)
    for name, value in sd_before.items():
        assert torch.equal(sd_after[name], value), name
    assert _param_numel(model) == numel_before
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert _attn_fused(attn) and is_fused([mlp.gate_proj, mlp.up_proj], mlp.gate_up)
        # one storage behind q/k/v (and gate/up): nothing duplicated
        storage = attn.qkv[0].untyped_storage()
        assert storage.nbytes() == attn.qkv[0].numel() * attn.qkv[0].element_size()
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert lin.weight.untyped_storage().data_ptr() == storage.data_ptr()
        if model.config.qkv_bias:
            assert attn.v_proj.bias.untyped_storage().data_ptr() == attn.qkv[1].untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up[0].untyped_storage().data_ptr()

    ids = _ids()
    h, ctx = _forward(model, ids)
    h_ref, ctx_ref = _forward(ref, ids)
    assert len(ctx.calls) == len(ctx_ref.calls) == model.config.num_layers
    assert torch.allclose(h, h_ref, **TOL)
    with torch.no_grad():
        assert torch.allclose(model.compute_logits(h), ref.compute_logits(h_ref), rtol=1e-4, atol=1e-5)


def test_fuse_projections_twice_is_harmless() -> None:
    model = _model(qkv_bias=True)
    ref = copy.deepcopy(model)
    numel = _param_numel(model)
    model.fuse_projections()
    model.fuse_projections()
    assert _param_numel(model) == numel
    ids = _ids()
    assert torch.allclose(_forward(model, ids)[0], _forward(ref, ids)[0], **TOL)


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, mlp_bias=True)])
def test_load_state_dict_assign_falls_back_to_unfused(overrides: dict) -> None:
    model = _model(seed=0, **overrides)
    model.fuse_projections()
    other = _model(seed=5, **overrides)  # different weights: a stale fused tensor would give other outputs
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    for layer in model.model.layers:
        assert not _attn_fused(layer.self_attn)
        assert not is_fused([layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.gate_up)
    ids = _ids()
    h, _ = _forward(model, ids)
    h_other, _ = _forward(other, ids)
    assert torch.allclose(h, h_other, **TOL)
    h_old, _ = _forward(_model(seed=0, **overrides), ids)
    assert not torch.allclose(h, h_old, rtol=1e-3, atol=1e-3)
    # fusing again after the load works and still gives the loaded model's output
    model.fuse_projections()
    assert _attn_fused(model.model.layers[0].self_attn)
    assert torch.allclose(_forward(model, ids)[0], h_other, **TOL)


def test_load_state_dict_without_assign_stays_fused() -> None:
    """A plain load copies into the views: the fused tensor sees the new values."""
    model = _model(seed=0, qkv_bias=True)
    model.fuse_projections()
    other = _model(seed=5, qkv_bias=True)
    model.load_state_dict(other.state_dict())
    attn = model.model.layers[0].self_attn
    assert is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)
    ids = _ids()
    assert torch.allclose(_forward(model, ids)[0], _forward(other, ids)[0], **TOL)


def test_replacing_q_proj_weight_falls_back_to_unfused() -> None:
    model = _model(qkv_bias=True)
    ref = copy.deepcopy(model)
    model.fuse_projections()
    attn, attn_ref = model.model.layers[0].self_attn, ref.model.layers[0].self_attn
    new_w = torch.randn(attn.q_proj.weight.shape, generator=torch.Generator().manual_seed(9)) * 0.02
    attn.q_proj.weight = nn.Parameter(new_w.clone(), requires_grad=False)
    attn_ref.q_proj.weight = nn.Parameter(new_w.clone(), requires_grad=False)
    assert not is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)
    x = _x(model.config)
    c1, c2 = RecordingContext(), RecordingContext()
    with torch.no_grad():
        out, out_ref = attn(x, c1), attn_ref(x, c2)
        expected_q = (x @ new_w.T + attn_ref.q_proj.bias).view(7, model.config.num_heads, -1)
    assert torch.allclose(c1.calls[0][1], expected_q, **TOL)
    assert torch.allclose(out, out_ref, **TOL)
    # the other layers are still fused and the whole model agrees with the reference
    assert _attn_fused(model.model.layers[1].self_attn)
    ids = _ids()
    assert torch.allclose(_forward(model, ids)[0], _forward(ref, ids)[0], **TOL)


def test_replacing_gate_proj_weight_falls_back_to_unfused() -> None:
    model = _model()
    ref = copy.deepcopy(model)
    model.fuse_projections()
    mlp, mlp_ref = model.model.layers[1].mlp, ref.model.layers[1].mlp
    new_w = torch.randn(mlp.gate_proj.weight.shape, generator=torch.Generator().manual_seed(3))
    mlp.gate_proj.weight = nn.Parameter(new_w.clone())
    mlp_ref.gate_proj.weight = nn.Parameter(new_w.clone())
    assert not is_fused([mlp.gate_proj, mlp.up_proj], mlp.gate_up)
    x = _x(model.config)
    with torch.no_grad():
        assert torch.allclose(mlp(x), mlp_ref(x), **TOL)


def test_dtype_conversion_after_fusing_falls_back() -> None:
    model = _model(qkv_bias=True)
    ref = copy.deepcopy(model).to(torch.float64)
    model.fuse_projections()
    model.to(torch.float64)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.dtype == torch.float64
    assert not is_fused([attn.q_proj, attn.k_proj, attn.v_proj], attn.qkv)
    ids = _ids()
    h, h_ref = _forward(model, ids)[0], _forward(ref, ids)[0]
    assert h.dtype == torch.float64
    assert torch.allclose(h, h_ref, rtol=1e-10, atol=1e-12)


def test_fusing_twice_keeps_the_same_storage() -> None:
    """A second engine on the same model must not move the weights (graphs of the first read them)."""
    model = _model()
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    before = (attn.qkv[0].data_ptr(), mlp.gate_up[0].data_ptr())
    model.fuse_projections()
    assert (attn.qkv[0].data_ptr(), mlp.gate_up[0].data_ptr()) == before and _attn_fused(attn)
