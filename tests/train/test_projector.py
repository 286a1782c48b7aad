"""SubspaceProjector keeps gradients in span V and leaves every other parameter alone."""

import pytest
import torch

from weightgeo.errors import WeightgeoError
from weightgeo.train.model import GPT, GPTConfig
from weightgeo.train.projector import BLOCK_MATRICES, SubspaceProjector, subspace_bases


def _tiny(seed=0):
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2), seed=seed)


def _grads(model, idx):
    model.zero_grad(set_to_none=True)
    model(idx).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_projected_gradients_in_span_and_others_untouched():
    g = torch.Generator().manual_seed(0)
    model = _tiny()
    idx = torch.randint(0, 13, (4, 9), generator=g)
    free = _grads(model, idx)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    bases = {}
    for n in names:
        d_in = dict(model.named_parameters())[n].shape[1]
        bases[n] = torch.linalg.qr(torch.randn(d_in, 5, generator=g))[0]
    proj = SubspaceProjector(model, bases)
    constrained = _grads(model, idx)
    for n, G in constrained.items():
        if n in bases:
            V = bases[n]
            assert torch.allclose(G, free[n] @ V @ V.T, atol=1e-6)
            # in span: the residual outside V vanishes, and the projection is idempotent
            assert (G - G @ V @ V.T).abs().max() < 1e-6
            assert G.abs().max() > 0
        else:
            assert torch.equal(G, free[n]), n
    proj.remove()
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, idx).values(), free.values()))


def test_projector_validates():
    model = _tiny()
    with pytest.raises(WeightgeoError, match="'nope.weight'.*no such parameter.*named_parameters"):
        SubspaceProjector(model, {"nope.weight": torch.eye(32)[:, :2]})
    with pytest.raises(WeightgeoError, match=r"shape \(32, 32\) and its basis V has shape \(16, 2\).*\[in=32, K\]"):
        SubspaceProjector(model, {"model.layers.0.self_attn.q_proj.weight": torch.eye(16)[:, :2]})
    with pytest.raises(WeightgeoError, match="not orthonormal.*check_orthonormal=False"):
        SubspaceProjector(model, {"model.layers.0.self_attn.q_proj.weight": 2 * torch.eye(32)[:, :2]})


def test_subspace_bases_top_right_singular_vectors():
    g = torch.Generator().manual_seed(1)
    W0 = {"a.weight": torch.randn(6, 8, generator=g)}
    U = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    V = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    S = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.01]))
    delta = U @ S @ V[:, :6].T
    out = subspace_bases({"a.weight": W0["a.weight"] + delta}, W0, k=2, include=None)["a.weight"]
    assert out.shape == (8, 2)
    assert torch.allclose(out.T @ out, torch.eye(2), atol=1e-5)
    # same subspace as V[:, :2] (sign-free check via projectors)
    assert torch.allclose(out @ out.T, V[:, :2] @ V[:, :2].T, atol=1e-5)


def test_default_matrix_set_is_every_2d_weight():
    model = _tiny()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    b = subspace_bases(dict(model.named_parameters()), init, k=4)
    two_d = {n for n, p in model.named_parameters() if p.ndim == 2}
    assert set(b) == two_d and {"lm_head.weight", "model.embed_tokens.weight", "model.embed_positions.weight"} <= set(b)
    assert all(v.shape[1] == 4 for v in b.values())
    blocks = subspace_bases(dict(model.named_parameters()), init, k=4, include=BLOCK_MATRICES)
    assert len(blocks) == 2 * 6 and all(BLOCK_MATRICES.search(n) for n in blocks)


def test_rank_deficient_and_zero_updates():
    W0 = {"a.weight": torch.zeros(5, 8), "b.weight": torch.ones(3, 4)}
    u, v = torch.randn(5, 1, generator=torch.Generator().manual_seed(0)), torch.eye(8)[:, :1]
    Wt = {"a.weight": u @ v.T, "b.weight": torch.ones(3, 4)}  # rank 1, and no change at all
    b = subspace_bases(Wt, W0, k=4)
    assert b["a.weight"].shape == (8, 1) and torch.allclose(b["a.weight"].abs().squeeze(), v.squeeze())
    assert b["b.weight"].shape == (4, 0)
    lin = torch.nn.Linear(4, 3, bias=False, device="meta").to_empty(device="cpu")  # no global-RNG init
    torch.nn.init.zeros_(lin.weight)
    with SubspaceProjector(lin, {"weight": b["b.weight"]}):  # nothing passed the bf16 gate: gradient frozen
        lin(torch.ones(2, 4)).sum().backward()
    assert (lin.weight.grad == 0).all()
