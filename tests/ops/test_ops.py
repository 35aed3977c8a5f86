"""CPU tests of the fused decoder ops (``longctx.ops``): the torch twins against hand-written definitions,
and the dispatchers (which run the twins on CPU) against the twins."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from longctx.model.rope import rotate
from longctx.ops import dispatch
from longctx.ops.gated_act import ACTIVATIONS, gated_act, gated_act_ref
from longctx.ops.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from longctx.ops.rope_kv_write import rope_kv_write, rope_kv_write_ref

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1, 8), (5, 64), (3, 7, 32), (2, 3, 4, 16)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- RMSNorm ------------------------------------------------------------------------------------------------
def _rms_norm_def(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """The definition written out: normalise in fp32, then Llama (weight * h in dtype) or Gemma ((1 + w) in fp32)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt((h * h).mean(dim=-1, keepdim=True) + eps)
    if gemma:
        return (h * (1 + weight.float())).to(dtype)
    return weight * h.to(dtype)


def _norm_inputs(shape: tuple[int, ...], dtype: torch.dtype, gemma: bool, seed: int = 0):
    g = _gen(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + (0.0 if gemma else 1.0)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_ref_matches_definition(dtype: torch.dtype, shape: tuple[int, ...], gemma: bool) -> None:
    x, w = _norm_inputs(shape, dtype, gemma)
    out = rms_norm_ref(x, w, 1e-6, gemma)
    expected = _rms_norm_def(x, w, 1e-6, gemma)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, expected)
    # and it really normalises: against an fp64 computation, within the dtype's rounding
    xd = x.double()
    hd = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6)
    yd = hd * (1 + w.double()) if gemma else hd * w.double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(out.double(), yd, rtol=tol, atol=tol)


def test_rms_norm_llama_and_gemma_differ_in_weight_convention() -> None:
    x = torch.tensor([[3.0, 4.0]])
    w = torch.tensor([2.0, 0.5])
    rms = (12.5 + 1e-6) ** 0.5
    llama = rms_norm_ref(x, w, 1e-6, gemma=False)
    gemma = rms_norm_ref(x, w, 1e-6, gemma=True)
    assert torch.allclose(llama, torch.tensor([[2 * 3 / rms, 0.5 * 4 / rms]]), rtol=1e-6)
    assert torch.allclose(gemma, torch.tensor([[3 * 3 / rms, 1.5 * 4 / rms]]), rtol=1e-6)
    # eps matters for a zero row: no NaN
    assert torch.equal(rms_norm_ref(torch.zeros(1, 4), torch.ones(4), 1e-6), torch.zeros(1, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm_ref_is_norm_of_sum(dtype: torch.dtype, shape: tuple[int, ...], gemma: bool) -> None:
    x, w = _norm_inputs(shape, dtype, gemma, seed=1)
    d = torch.randn(shape, generator=_gen(2)).to(dtype)
    out, res = add_rms_norm_ref(x, d, w, 1e-5, gemma)
    s = x + d
    assert res.dtype == dtype and torch.equal(res, s)
    assert torch.equal(out, _rms_norm_def(s, w, 1e-5, gemma))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_dispatchers_on_cpu_equal_refs(dtype: torch.dtype, shape: tuple[int, ...], gemma: bool) -> None:
    x, w = _norm_inputs(shape, dtype, gemma, seed=3)
    d = torch.randn(shape, generator=_gen(4)).to(dtype)
    assert torch.equal(rms_norm(x, w, 1e-6, gemma), rms_norm_ref(x, w, 1e-6, gemma))
    out, res = add_rms_norm(x, d, w, 1e-6, gemma)
    rout, rres = add_rms_norm_ref(x, d, w, 1e-6, gemma)
    assert torch.equal(out, rout) and torch.equal(res, rres)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_strided_inputs(dtype: torch.dtype, gemma: bool) -> None:
    g = _gen(5)
    base = (torch.randn(6, 40, generator=g) * 2).to(dtype)
    x = base[:, 4:-4]  # strided rows, [6, 32]
    xt = torch.randn(32, 6, generator=g).to(dtype).t()  # transposed: column stride != 1
    d = torch.randn(6, 48, generator=g).to(dtype)[:, 8:40]
    w = (torch.randn(32, generator=g) * 0.5 + 1).to(dtype)
    # torch's CPU kernels may round differently (last ulp) on strided and contiguous inputs: the strided
    # result must equal the definition on the same strided tensor, and the contiguous one within an ulp or two
    tol = _ulp_tol(dtype)
    for inp in (x, xt):
        assert not inp.is_contiguous()
        expected = _rms_norm_def(inp, w, 1e-6, gemma)
        out = rms_norm(inp, w, 1e-6, gemma)
        assert out.shape == inp.shape
        assert torch.equal(out, expected)
        assert torch.equal(rms_norm_ref(inp, w, 1e-6, gemma), expected)
        assert torch.allclose(out, _rms_norm_def(inp.contiguous(), w, 1e-6, gemma), **tol)
    out, res = add_rms_norm(x, d, w, 1e-6, gemma)
    s = x.contiguous() + d.contiguous()
    assert torch.equal(res, s)
    assert torch.allclose(out, _rms_norm_def(s, w, 1e-6, gemma), **tol)
    assert torch.equal(out, _rms_norm_def(x + d, w, 1e-6, gemma))
    # strided weight (every other element of a longer vector)
    w2 = torch.randn(64, generator=g).to(dtype)[::2]
    assert torch.allclose(rms_norm(x, w2, 1e-6, gemma),
                          _rms_norm_def(x.contiguous(), w2.contiguous(), 1e-6, gemma), **tol)


def _ulp_tol(dtype: torch.dtype) -> dict[str, float]:
    # torch's vectorised and scalar CPU kernels (AVX2, AVX-512, SSE) round transcendental ops differently:
    # GELU via erf differs by ~4e-5 between a strided and a contiguous input on some x86 CPUs.
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}


# ---- gated activation ---------------------------------------------------------------------------------------
def _act_def(g: torch.Tensor, u: torch.Tensor, act: str) -> torch.Tensor:
    return {"silu": lambda: F.silu(g) * u, "gelu": lambda: F.gelu(g) * u,
            "gelu_pytorch_tanh": lambda: F.gelu(g, approximate="tanh") * u}[act]()


def test_activations_listed() -> None:
    assert set(ACTIVATIONS) == {"silu", "gelu", "gelu_pytorch_tanh"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_gated_act_matches_definition(dtype: torch.dtype, act: str) -> None:
    g = _gen(6)
    gate = (torch.randn(7, 33, generator=g) * 4).to(dtype)
    up = torch.randn(7, 33, generator=g).to(dtype)
    expected = _act_def(gate, up, act)
    assert torch.equal(gated_act_ref(gate, up, act), expected)
    assert torch.equal(gated_act(gate, up, act), expected)
    # a value check independent of F: silu(x) = x * sigmoid(x), gelu(x) = x * Phi(x)
    gd, ud = gate.double(), up.double()
    if act == "silu":
        ref = gd * torch.sigmoid(gd) * ud
    elif act == "gelu":
        ref = 0.5 * gd * (1 + torch.erf(gd / 2**0.5)) * ud
    else:
        ref = 0.5 * gd * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gd + 0.044715 * gd**3))) * ud
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(expected.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_gated_act_on_chunked_views(dtype: torch.dtype, act: str) -> None:
    n, inter = 5, 24
    gu = (torch.randn(n, 2 * inter, generator=_gen(7)) * 3).to(dtype)
    gate, up = gu.chunk(2, dim=-1)
    assert gate.stride(0) == 2 * inter and not gate.is_contiguous()
    expected = _act_def(gate, up, act)
    dense = _act_def(gate.contiguous(), up.contiguous(), act)
    for fn in (gated_act, gated_act_ref):
        out = fn(gate, up, act)
        assert out.shape == (n, inter) and out.dtype == dtype
        assert torch.equal(out, expected)
        # torch's CPU kernels may round the strided case differently in the last ulp
        assert torch.allclose(out, dense, **_ulp_tol(dtype))
    # and the inputs were not modified
    assert torch.equal(gu, (torch.randn(n, 2 * inter, generator=_gen(7)) * 3).to(dtype))


def test_gated_act_empty_rows() -> None:
    gate, up = torch.empty(0, 16), torch.empty(0, 16)
    assert gated_act(gate, up, "silu").shape == (0, 16)


@pytest.mark.parametrize("fn", [gated_act, gated_act_ref])
@pytest.mark.parametrize("bad", ["relu", "SiLU", "gelu_new", ""])
def test_gated_act_unsupported_activation(fn, bad: str) -> None:  # noqa: ANN001
    x = torch.randn(2, 4)
    with pytest.raises(ValueError) as info:
        fn(x, x, bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for name in ACTIVATIONS:
        assert name in msg


# ---- RoPE + KV write ----------------------------------------------------------------------------------------
def _rope_case(dtype: torch.dtype, bsz: int, hq: int, hkv: int, d: int, seed: int, strided: bool):
    g = _gen(seed)
    num_blocks, bs = 9, 4
    if strided:  # q/k/v as views of one fused projection output
        qkv = torch.randn(bsz, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q, k, v = (t.view(bsz, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    else:
        q = torch.randn(bsz, hq, d, generator=g).to(dtype)
        k = torch.randn(bsz, hkv, d, generator=g).to(dtype)
        v = torch.randn(bsz, hkv, d, generator=g).to(dtype)
    positions = torch.randint(0, 5000, (bsz,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = positions[:, None].float() * inv[None]
    cos = torch.cat([ang.cos()] * 2, -1).to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(dtype)
    k_pool = torch.randn(num_blocks, bs, d, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, bs, d, generator=g).to(dtype)
    pos_pool = torch.randint(-9, 0, (num_blocks, bs), generator=g)  # negative: never a written position
    slots = torch.randperm(num_blocks * bs, generator=g)[: bsz * hkv]
    return q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots, positions


@pytest.mark.parametrize("fn", [rope_kv_write_ref, rope_kv_write])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bsz", "hq", "hkv", "d", "strided"),
                         [(1, 4, 2, 8, False), (3, 4, 4, 16, True), (5, 6, 2, 10, True), (2, 8, 1, 4, False)])
def test_rope_kv_write(fn, dtype: torch.dtype, bsz: int, hq: int, hkv: int, d: int, strided: bool) -> None:  # noqa: ANN001
    q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots, positions = _rope_case(dtype, bsz, hq, hkv, d, bsz, strided)
    k_before, v_before, p_before = k_pool.clone(), v_pool.clone(), pos_pool.clone()
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()
    q_rot = fn(q, k, v, cos, sin, k_pool, v_pool, pos_pool, slots, positions)

    assert q_rot.shape == (bsz, hq, d) and q_rot.dtype == dtype
    assert torch.equal(q_rot, rotate(q_in, cos[:, None], sin[:, None]))
    k_rot = rotate(k_in, cos[:, None], sin[:, None])
    flat_k, flat_v, flat_p = k_pool.view(-1, d), v_pool.view(-1, d), pos_pool.view(-1)
    for b in range(bsz):
        for h in range(hkv):
            s = int(slots[b * hkv + h])
            assert torch.equal(flat_k[s], k_rot[b, h])
            assert torch.equal(flat_v[s], v_in[b, h])
            assert int(flat_p[s]) == int(positions[b])
    untouched = torch.ones(k_pool.shape[0] * k_pool.shape[1], dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(flat_k[untouched], k_before.view(-1, d)[untouched])
    assert torch.equal(flat_v[untouched], v_before.view(-1, d)[untouched])
    assert torch.equal(flat_p[untouched], p_before.view(-1)[untouched])
    # inputs unchanged
    assert torch.equal(q, q_in) and torch.equal(k, k_in) and torch.equal(v, v_in)


def test_rope_kv_write_rotation_values() -> None:
    """Position 0 (cos 1, sin 0) is the identity; a quarter turn maps (x1, x2) to (-x2, x1)."""
    d = 4
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    k = torch.tensor([[[5.0, 6.0, 7.0, 8.0]]])
    v = torch.tensor([[[9.0, 9.5, 9.25, 9.125]]])
    k_pool, v_pool = torch.zeros(2, 2, d), torch.zeros(2, 2, d)
    pos_pool = torch.zeros(2, 2, dtype=torch.int64)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)
    out = rope_kv_write(q, k, v, cos, sin, k_pool, v_pool, pos_pool, torch.tensor([3]), torch.tensor([11]))
    assert torch.equal(out, q)
    assert torch.equal(k_pool[1, 1], k[0, 0]) and torch.equal(v_pool[1, 1], v[0, 0]) and int(pos_pool[1, 1]) == 11
    cos, sin = torch.zeros(1, d), torch.ones(1, d)
    out = rope_kv_write(q, k, v, cos, sin, k_pool, v_pool, pos_pool, torch.tensor([0]), torch.tensor([12]))
    assert torch.equal(out, torch.tensor([[[-3.0, -4.0, 1.0, 2.0]]]))
    assert torch.equal(k_pool[0, 0], torch.tensor([-7.0, -8.0, 5.0, 6.0]))
    assert int(pos_pool[0, 0]) == 12 and int(pos_pool[1, 1]) == 11


# ---- dispatch -----------------------------------------------------------------------------------------------
def test_use_triton_false_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGCTX_KERNELS", raising=False)
    assert dispatch.use_triton(torch.zeros(3)) is False
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    assert dispatch.use_triton(torch.zeros(3)) is False  # CPU tensors never launch kernels


def test_use_triton_forced_off_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda = types.SimpleNamespace(is_cuda=True, requires_grad=False)
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.delenv("LONGCTX_KERNELS", raising=False)
    assert not dispatch.kernels_forced_off()
    assert dispatch.use_triton(fake_cuda) is True  # the control: a CUDA tensor with Triton would launch
    for value in ("torch", "TORCH", "Torch"):
        monkeypatch.setenv("LONGCTX_KERNELS", value)
        assert dispatch.kernels_forced_off()
        assert dispatch.use_triton(fake_cuda) is False
    monkeypatch.setenv("LONGCTX_KERNELS", "triton")
    assert dispatch.use_triton(fake_cuda) is True
    monkeypatch.setattr(dispatch, "has_triton", lambda: False)
    assert dispatch.use_triton(fake_cuda) is False
    monkeypatch.setenv("LONGCTX_KERNELS", "torch")
    assert dispatch.use_triton(torch.zeros(1)) is False


def test_use_triton_steps_aside_under_autograd_and_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels have no backward and take one dtype: a tensor that needs gradients, or autocast, takes the twin."""
    monkeypatch.setattr(dispatch, "has_triton", lambda: True)
    monkeypatch.delenv("LONGCTX_KERNELS", raising=False)
    plain, tracked = (types.SimpleNamespace(is_cuda=True, requires_grad=flag) for flag in (False, True))
    assert dispatch.use_triton(plain) is True and dispatch.use_triton(tracked) is False
    assert dispatch.use_triton(plain, plain, tracked) is False  # any input that needs gradients
    with torch.no_grad():
        assert dispatch.use_triton(tracked) is True  # no graph is recorded: the kernel is fine
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: device_type == "cuda")
    assert dispatch.use_triton(plain) is False
