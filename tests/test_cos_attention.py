"""Cosine linear attention (E-COSATT, GROUNDING §1): torch forms, fused Numba and simulated-CUDA kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.recommenders import cos_kernels
from recloop.recommenders.cos_attention import CosineAttention, cos_attention, cos_attention_quadratic
from recloop.recommenders.cos_kernels import cos_attention_numba, pick_kernel
from recloop.recommenders.cos_kernels_grad import cos_attention_fused

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _inputs(B=3, H=2, L=13, D=5, seed=0, dtype=torch.float64, pad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3))
    m = torch.randn(H, generator=g, dtype=dtype)
    valid = torch.rand(B, L, generator=g) > (0.3 if pad else -1.0)
    valid[0, :4] = False  # left padding, as in recent-item sequences
    valid[1] = False  # an all-padding row
    return q, k, v, m, valid


def test_grounding_sanity_2x2():
    Q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    K = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    V = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    m = torch.tensor([0.5])
    want = np.array([[2.027493, 3.136366], [1.377931, 1.837241]])
    for f in (cos_attention, cos_attention_quadratic):
        np.testing.assert_allclose(f(Q, K, V, m, None, False)[0, 0].numpy(), want, atol=2e-6)
    np.testing.assert_allclose(cos_attention_numba(Q, K, V, m, None, False)[0, 0], want, atol=2e-6)
    # n = 1 and q = k: out = v (also with padding around the one valid position)
    q = torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    valid = torch.tensor([[False, True, False]])
    for causal in (False, True):
        out = cos_attention(q, q, v, m, valid, causal)
        np.testing.assert_allclose(out[0, 0, 1].numpy(), v[0, 0, 1].numpy(), rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_quadratic(causal):
    q, k, v, m, valid = _inputs()
    ref = cos_attention_quadratic(q, k, v, m, valid, causal)
    for chunk in (1, 3, 4, 5, 7, 13, 64):  # incl. chunks that do not divide L = 13
        out = cos_attention(q, k, v, m, valid, causal, chunk=chunk)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert ref[:, :, :][~valid[:, None, :].expand(-1, q.shape[1], -1)].abs().max() == 0  # padding -> 0
    # explicit double loop for one causal row (guards the reference itself)
    if causal:
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        b, h, t = 2, 1, 10
        p = torch.sigmoid(m[h])
        c = torch.cumsum(valid[b].double(), 0)
        want = sum(float(qn[b, h, t] @ kn[b, h, s]) * v[b, h, s] / c[s] ** p
                   for s in range(t + 1) if valid[b, s])
        torch.testing.assert_close(ref[b, h, t], want * valid[b, t])


def test_causal_mask_and_padding_isolation():
    torch.manual_seed(1)
    layer = CosineAttention(dim=8, heads=2, dropout=0.0, causal=True).double().eval()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    valid = torch.ones(2, 9, dtype=torch.bool)
    base = layer(x, valid)
    for t in range(8):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        out = layer(x2, valid)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-12)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-6  # the change is visible later on
    valid[:, :3] = False  # padding content never reaches valid positions, in either form
    for causal in (True, False):
        layer.causal = causal
        ref = layer(x, valid)
        x3 = x.clone()
        x3[:, :3] = 100 * torch.randn_like(x3[:, :3])
        torch.testing.assert_close(layer(x3, valid)[:, 3:], ref[:, 3:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_chunked_equal_quadratic(causal):
    q, k, v, m, valid = _inputs(L=11, seed=3)
    w = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(9))
    grads = []
    for f in (lambda *a: cos_attention(*a, chunk=4), cos_attention_quadratic):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, m)]
        (f(*leaves, valid, causal) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert grads[0][3].abs().max() > 0  # m is learned


def _assert_kernel_close(out, ref):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("causal", [False, True])
def test_numba_kernel_equals_torch(causal):
    q, k, v, m, valid = _inputs(B=4, H=3, L=37, D=16, seed=5)
    ref = cos_attention_quadratic(q, k, v, m, valid, causal).numpy()
    out = cos_attention_numba(*(t.float().numpy() for t in (q, k, v, m)), valid.numpy(), causal)
    assert out.dtype == np.float32 and out.shape == ref.shape
    _assert_kernel_close(out, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_backward_equals_quadratic_gradients(causal):
    q, k, v, m, valid = _inputs(B=3, H=2, L=17, D=6, seed=7)
    q[2, 0, 5] = 0.0  # a zero row: the clamped-norm branch
    w = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(8))
    res = []
    for f in (cos_attention_fused, cos_attention_quadratic):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, m)]
        out = f(*leaves, valid, causal)
        (out * w).sum().backward()
        res.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*res):
        _assert_kernel_close(a.numpy(), b.numpy())
    assert res[0][4].abs().max() > 0


def test_layer_kernels_train_and_infer():
    torch.manual_seed(2)
    layer = CosineAttention(dim=12, heads=3, dropout=0.0, causal=True)
    x = torch.randn(3, 10, 12)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[0, :6] = False
    with torch.no_grad():
        ref = layer(x, valid, kernel="torch")
        for kernel in ("numba", "auto", "numpy"):
            out = layer(x, valid, kernel=kernel)
            _assert_kernel_close(out[valid].numpy(), ref[valid].numpy())
    grads = []
    for kernel in ("torch", "numba"):  # training: the fused backward gives the torch gradients
        layer.zero_grad()
        (layer(x, valid, kernel=kernel)[valid] ** 2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        _assert_kernel_close(a.numpy(), b.numpy())
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x, valid, kernel="cuda")


def test_pick_kernel(monkeypatch):
    assert pick_kernel("numpy") == "numba" and pick_kernel("numba") == "numba"
    assert pick_kernel("torch") == "torch" and pick_kernel("cuda") == "cuda"
    monkeypatch.setattr(cos_kernels, "cuda_usable", lambda: True)
    assert pick_kernel("auto") == "cuda" and pick_kernel("cupy") == "cuda"
    monkeypatch.setattr(cos_kernels, "cuda_usable", lambda: False)
    assert pick_kernel("auto") == "numba"
    with pytest.raises(ValueError, match="unknown"):
        pick_kernel("tpu")


_SIM_SCRIPT = textwrap.dedent("""
    import json, numpy as np, torch
    from recloop.recommenders.cos_attention import CosineAttention, cos_attention_quadratic
    from recloop.recommenders.cos_kernels import cos_attention_cuda, cuda_usable, pick_kernel
    g = torch.Generator().manual_seed(4)
    B, H, L, D = 2, 2, 7, 4
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    m = torch.randn(H, generator=g, dtype=torch.float64)
    valid = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    res = {"auto": pick_kernel("auto"), "usable": cuda_usable()}
    for causal in (False, True):
        ref = cos_attention_quadratic(q, k, v, m, valid, causal).numpy()
        out = cos_attention_cuda(*(t.float().numpy() for t in (q, k, v, m)), valid.numpy(), causal)
        res[str(causal)] = [out.tolist(), ref.tolist()]
    torch.manual_seed(0)
    layer = CosineAttention(8, 2, 0.0, causal=True).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        res["layer"] = [layer(x, None, kernel="cuda").tolist(), layer(x, None).tolist()]
    print(json.dumps(res))
""")


def test_simulated_cuda_kernel_equals_torch():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SIM_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["auto"] == "numba" and res["usable"] is False  # the simulator is never picked by auto
    for key in ("False", "True", "layer"):
        out, ref = res[key]
        _assert_kernel_close(np.array(out, np.float32), ref)


_PTX_SCRIPT = textwrap.dedent("""
    import types
    from numba.cuda.cudadrv import nvvm
    if not nvvm.is_available():
        print("NO_NVVM")
        raise SystemExit(0)
    import numba.cuda.dispatcher as D
    D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))  # no GPU here
    from numba import boolean, cuda, float32, uint8, void
    from recloop.recommenders.cos_kernels_cuda import cos_attention_kernel
    a4 = float32[:, :, :, ::1]
    sig = void(a4, a4, a4, float32[::1], uint8[:, ::1], boolean, a4)
    ptx, _ = cuda.compile_ptx(cos_attention_kernel.py_func, sig, cc=(9, 0))
    print("PTX", len(ptx), ptx.count(".f64"))
""")


def test_cuda_kernel_compiles_for_a_real_gpu():
    """The simulator runs Python, so it misses what the CUDA target cannot compile: compile to PTX."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "NO_NVVM" in proc.stdout:
        pytest.skip("no NVVM (CUDA toolkit) to compile PTX with")
    _, n, f64 = proc.stdout.split()[-3:]
    assert int(n) > 1000 and int(f64) == 0  # float32 throughout
