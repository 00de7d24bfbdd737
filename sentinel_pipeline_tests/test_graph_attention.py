"""Graph attention layer: equal to torch_geometric's GATConv with identical weights, dense == edge list,
deterministic, exportable."""

from __future__ import annotations

import pytest
import torch

from sentinel_pipeline.training.layers.graph_attention import GraphAttention, dense_adjacency

pyg_nn = pytest.importorskip("torch_geometric.nn", reason="torch_geometric is the test-only reference")


def random_graph(n: int, n_edges: int, gen: torch.Generator, isolated: int = 0) -> torch.Tensor:
    """Duplicate-free directed edges without self-loops among the first ``n - isolated`` nodes."""
    m = n - isolated
    pairs = torch.randperm(m * m, generator=gen)
    src, dst = pairs // m, pairs % m
    keep = src != dst
    src, dst = src[keep][:n_edges], dst[keep][:n_edges]
    return torch.stack([src, dst]).long()


def copy_into_pyg(ours: GraphAttention, edge_dim: int | None = None) -> torch.nn.Module:
    ref = pyg_nn.GATConv(ours.in_dim, ours.out_dim, heads=ours.heads, concat=ours.concat,
                         negative_slope=ours.negative_slope, dropout=0.0, add_self_loops=True,
                         edge_dim=edge_dim, bias=True)
    with torch.no_grad():
        ref.lin.weight.copy_(ours.lin.weight)
        ref.att_src.copy_(ours.att_src)
        ref.att_dst.copy_(ours.att_dst)
        ref.bias.copy_(ours.bias)
        if edge_dim is not None:
            ref.lin_edge.weight.copy_(ours.lin_edge.weight)
            ref.att_edge.copy_(ours.att_edge)
    return ref


@pytest.mark.parametrize("concat", [True, False])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pyg_gatconv(concat: bool, heads: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, d, c = 40, 7, 5
    ours = GraphAttention(d, c, heads, concat=concat, negative_slope=0.15, edge_weight_mode="none")
    with torch.no_grad():
        ours.bias.normal_()  # a non-zero bias, so that it is checked too
    ref = copy_into_pyg(ours)
    x = torch.randn(n, d, generator=gen)
    edge_index = random_graph(n, 150, gen, isolated=6)  # nodes 34..39 have no edges at all
    out, expected = ours(x, edge_index), ref(x, edge_index)
    assert out.shape == expected.shape == (n, heads * c if concat else c)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # isolated nodes only see themselves: out = W x (mean/concat of heads) + bias
    torch.testing.assert_close(out[-6:], ours._finish(ours.lin(x[-6:]).view(-1, heads, c)), atol=1e-5, rtol=0)


def test_equals_pyg_with_linear_edge_weights() -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    n = 30
    ours = GraphAttention(6, 4, 2, edge_weight_mode="linear")
    ref = copy_into_pyg(ours, edge_dim=1)
    x = torch.randn(n, 6, generator=gen)
    edge_index = random_graph(n, 90, gen, isolated=3)
    w = torch.rand(edge_index.shape[1], generator=gen) + 0.1
    torch.testing.assert_close(ours(x, edge_index, w), ref(x, edge_index, w.view(-1, 1)), atol=1e-5, rtol=0)


def test_gradients_equal_pyg() -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    ours = GraphAttention(5, 3, 2, edge_weight_mode="none")
    ref = copy_into_pyg(ours)
    x1 = torch.randn(12, 5, generator=gen, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    edge_index = random_graph(12, 30, gen, isolated=2)
    probe = torch.randn(12, 6, generator=gen)
    (ours(x1, edge_index) * probe).sum().backward()
    (ref(x2, edge_index) * probe).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=0)
    for a, b in [(ours.lin.weight, ref.lin.weight), (ours.att_src, ref.att_src),
                 (ours.att_dst, ref.att_dst), (ours.bias, ref.bias)]:
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


def test_given_self_loops_count_once_like_pyg() -> None:
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    ours = GraphAttention(4, 3, 2, edge_weight_mode="none")
    ref = copy_into_pyg(ours)
    x = torch.randn(10, 4, generator=gen)
    edge_index = torch.cat([random_graph(10, 20, gen), torch.tensor([[2, 5], [2, 5]])], dim=1)
    torch.testing.assert_close(ours(x, edge_index), ref(x, edge_index), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["none", "log"])
def test_dense_equals_edge_list(mode: str) -> None:
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    n = 50
    layer = GraphAttention(8, 4, 4, edge_weight_mode=mode)
    with torch.no_grad():
        if layer.edge_beta is not None:
            layer.edge_beta.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    x = torch.randn(n, 8, generator=gen, requires_grad=True)
    edge_index = random_graph(n, 300, gen, isolated=5)
    w = torch.rand(edge_index.shape[1], generator=gen) + 0.05
    adj, wm = dense_adjacency(edge_index, n, w)
    out_e = layer(x, edge_index, w)
    out_d = layer.forward_dense(x, adj, wm)
    torch.testing.assert_close(out_e, out_d, atol=1e-5, rtol=0)
    g_e = torch.autograd.grad(out_e.square().sum(), x)[0]
    g_d = torch.autograd.grad(out_d.square().sum(), x)[0]
    torch.testing.assert_close(g_e, g_d, atol=1e-4, rtol=0)


def test_log_edge_weights_scale_attention() -> None:
    """beta = 1: the attention ratio of two neighbours scales with their weight ratio; a constant
    rescaling of all weights changes nothing; beta = 0 ignores the weights."""
    torch.manual_seed(0)
    layer = GraphAttention(3, 2, 2, edge_weight_mode="log")
    x = torch.randn(3, 3)
    edge_index = torch.tensor([[1, 2], [0, 0]])  # 1 -> 0, 2 -> 0
    with torch.no_grad():
        ratios = []
        for w in ([1.0, 1.0], [3.0, 1.0]):
            _, _, _, alpha = layer.attention(x, edge_index, torch.tensor(w))
            ratios.append(alpha[0] / alpha[1])  # per head: attention of 1 -> 0 over 2 -> 0
        torch.testing.assert_close(ratios[1], 3.0 * ratios[0], rtol=1e-5, atol=0)
        ei = random_graph(12, 30, torch.Generator().manual_seed(1))
        xx = torch.randn(12, 3)
        w = torch.rand(ei.shape[1]) + 0.1
        out = layer(xx, ei, w)
        torch.testing.assert_close(out, layer(xx, ei, 7.0 * w), atol=1e-5, rtol=0)
        assert not torch.allclose(out, layer(xx, ei), atol=1e-3)  # the weights do matter
        layer.edge_beta.zero_()
        torch.testing.assert_close(layer(xx, ei, w), layer(xx, ei), atol=1e-6, rtol=0)


def test_deterministic_and_export() -> None:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    layer = GraphAttention(6, 4, 2).eval()
    x = torch.randn(25, 6, generator=gen)
    edge_index = random_graph(25, 80, gen)
    w = torch.rand(edge_index.shape[1], generator=gen) + 0.1
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        a, b = layer(x, edge_index, w), layer(x, edge_index, w)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(a, b)
    exported = torch.export.export(layer, (x, edge_index, w))
    torch.testing.assert_close(exported.module()(x, edge_index, w), a, atol=1e-6, rtol=0)


def test_bad_inputs_are_named() -> None:
    layer = GraphAttention(3, 2, 1)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="outside"):
        layer(x, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="> 0"):
        layer(x, torch.tensor([[0, 1], [1, 2]]), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="edge_weight_mode"):
        GraphAttention(3, 2, 1, edge_weight_mode="sqrt")


@pytest.mark.parametrize("mode", ["log", "none"])
def test_onnx_export_matches_torch_on_other_graphs(mode: str) -> None:
    """torch.onnx (opset 18, dynamic node and edge counts) + onnxruntime reproduce the layer on graphs of
    other sizes than the traced one, with duplicate targets and a given self-loop."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev dependency (export check)")
    torch.manual_seed(4)
    layer = GraphAttention(6, 4, 2, edge_weight_mode=mode).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 6, generator=gen)
    ei = random_graph(10, 25, gen)
    w = torch.rand(ei.shape[1], generator=gen) + 0.1
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (x, ei, w), f, dynamo=False, opset_version=18,
                          input_names=["x", "edge_index", "edge_weight"],
                          dynamic_axes={"x": {0: "n"}, "edge_index": {1: "E"}, "edge_weight": {0: "E"}})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(f.getvalue(), options)
    names = {i.name for i in sess.get_inputs()}
    for n, n_edges in ((10, 25), (37, 120), (5, 3)):
        x2 = torch.randn(n, 6, generator=gen)
        ei2 = torch.cat([random_graph(n, n_edges, gen), torch.tensor([[1], [1]])], dim=1)  # + a self-loop
        w2 = torch.rand(ei2.shape[1], generator=gen) + 0.1
        feed = {k: v.numpy() for k, v in (("x", x2), ("edge_index", ei2), ("edge_weight", w2)) if k in names}
        got = torch.from_numpy(sess.run(None, feed)[0])
        with torch.no_grad():
            torch.testing.assert_close(got, layer(x2, ei2, w2), atol=1e-5, rtol=0)
