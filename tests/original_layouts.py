"""The original's state_dict layouts of GVP-GNN and CDConv: parameter names and shapes written out by hand from the
original's constructors, never from esm_gearnet's modules, so a test can hold esm_gearnet's loader to them.

Read from DeepGraphLearning/ESM-GearNet @ bc90557: `gearnet/gvp.py` (GVPGNN), `gearnet/gvp_layer.py` (GVP,
GVPLayerNorm, Dropout/_VDropout, GVPConv, GVPConvLayer: gvp-pytorch's layers with a `dummy_param` in the vector
dropout) and `gearnet/cdconv.py` (WeightNet, CDConv, Linear, MLP, CDBlock, ContinuousDiscreteConvolutionalNetwork).
TorchDrug's readouts and `MessagePassingBase`, and torch-geometric's `MessagePassing`, own no parameter or buffer.

`original_gvpgnn_layout` and `original_cdconv_layout` follow the constructors' logic for any config; the literal
tables `TINY_GVPGNN` and `TINY_CDCONV` write one small config out key by key, and the layout functions must
reproduce them (a check of the functions themselves).
"""
from typing import Dict, Tuple

import torch

Shape = Tuple[int, ...]


# ---- gearnet/gvp_layer.py -----------------------------------------------------------------------------------------

def original_gvp_layout(in_dims, out_dims, vector_gate, prefix="") -> Dict[str, Shape]:
    """`GVP(in_dims, out_dims, h_dim=None, vector_gate=...)`: with vector input, wh: Linear(vi, h, bias=False),
    h = max(vi, vo); ws: Linear(h + si, so); with vector output too, wv: Linear(h, vo, bias=False) and, gated,
    wsv: Linear(so, vo). Without vector input, ws: Linear(si, so) alone (no wv, no wsv: output vectors are zeros)."""
    si, vi = in_dims
    so, vo = out_dims
    if not vi:
        return {f"{prefix}ws.weight": (so, si), f"{prefix}ws.bias": (so,)}
    h = max(vi, vo)
    layout = {f"{prefix}wh.weight": (h, vi), f"{prefix}ws.weight": (so, h + si), f"{prefix}ws.bias": (so,)}
    if vo:
        layout[f"{prefix}wv.weight"] = (vo, h)
        if vector_gate:
            layout.update({f"{prefix}wsv.weight": (vo, so), f"{prefix}wsv.bias": (vo,)})
    return layout


def original_layer_norm_layout(dims, prefix="") -> Dict[str, Shape]:
    """`GVPLayerNorm(dims)`: scalar_norm = nn.LayerNorm(dims[0]); the vector part has no parameter."""
    return {f"{prefix}scalar_norm.weight": (dims[0],), f"{prefix}scalar_norm.bias": (dims[0],)}


def original_gvp_conv_layer_layout(node_dims, edge_dims, vector_gate, prefix="") -> Dict[str, Shape]:
    """`GVPConvLayer(node_dims, edge_dims, n_message=3, n_feedforward=2)`: conv.message_func = GVP((2 si + se,
    2 vi + ve) -> node_dims), GVP(node_dims -> node_dims), GVP(node_dims -> node_dims); norm.{0,1}: GVPLayerNorm;
    dropout.{0,1}: Dropout(sdropout: nn.Dropout, vdropout: _VDropout with dummy_param = Parameter(empty(0)));
    ff_func: GVP(node_dims -> (4 si, 2 vi)), GVP((4 si, 2 vi) -> node_dims)."""
    (si, vi), (se, ve) = node_dims, edge_dims
    node_dims, hidden = (si, vi), (4 * si, 2 * vi)
    message = [((2 * si + se, 2 * vi + ve), node_dims), (node_dims, node_dims), (node_dims, node_dims)]
    layout = {}
    for k, (a, b) in enumerate(message):
        layout.update(original_gvp_layout(a, b, vector_gate, f"{prefix}conv.message_func.{k}."))
    for k in range(2):
        layout.update(original_layer_norm_layout(node_dims, f"{prefix}norm.{k}."))
    for k in range(2):
        layout[f"{prefix}dropout.{k}.vdropout.dummy_param"] = (0,)
    for k, (a, b) in enumerate([(node_dims, hidden), (hidden, node_dims)]):
        layout.update(original_gvp_layout(a, b, vector_gate, f"{prefix}ff_func.{k}."))
    return layout


# ---- gearnet/gvp.py -----------------------------------------------------------------------------------------------

def original_gvpgnn_layout(node_in_dim, node_h_dim, edge_in_dim, edge_h_dim, num_layers=3, vector_gate=True,
                           prefix="") -> Dict[str, Shape]:
    """`GVPGNN.__init__`: residue_embdding = Linear(node_in_dim[0], node_in_dim[0], bias=False) (the original's
    spelling); W_v = [GVPLayerNorm(node_in_dim), GVP(node_in_dim -> node_h_dim)]; W_e = [GVPLayerNorm(edge_in_dim),
    GVP(edge_in_dim -> edge_h_dim)]; layers.{i}: GVPConvLayer(node_h_dim, edge_h_dim); W_out =
    [GVPLayerNorm(node_h_dim), GVP(node_h_dim -> (node_h_dim[0], 0))]; the readout has no parameter."""
    width = node_in_dim[0]
    layout = {f"{prefix}residue_embdding.weight": (width, width)}
    layout.update(original_layer_norm_layout(node_in_dim, f"{prefix}W_v.0."))
    layout.update(original_gvp_layout(node_in_dim, node_h_dim, vector_gate, f"{prefix}W_v.1."))
    layout.update(original_layer_norm_layout(edge_in_dim, f"{prefix}W_e.0."))
    layout.update(original_gvp_layout(edge_in_dim, edge_h_dim, vector_gate, f"{prefix}W_e.1."))
    for i in range(num_layers):
        layout.update(original_gvp_conv_layer_layout(node_h_dim, edge_h_dim, vector_gate, f"{prefix}layers.{i}."))
    layout.update(original_layer_norm_layout(node_h_dim, f"{prefix}W_out.0."))
    layout.update(original_gvp_layout(node_h_dim, (node_h_dim[0], 0), vector_gate, f"{prefix}W_out.1."))
    return layout


# GVPGNN(node_in_dim=[3, 0], node_h_dim=[4, 2], edge_in_dim=[5, 1], edge_h_dim=[6, 1], num_layers=1,
# vector_gate=True), key by key.
TINY_GVPGNN_CONFIG = dict(node_in_dim=[3, 0], node_h_dim=[4, 2], edge_in_dim=[5, 1], edge_h_dim=[6, 1], num_layers=1,
                          vector_gate=True)
TINY_GVPGNN = {
    "residue_embdding.weight": (3, 3),
    "W_v.0.scalar_norm.weight": (3,), "W_v.0.scalar_norm.bias": (3,),
    "W_v.1.ws.weight": (4, 3), "W_v.1.ws.bias": (4,),  # no vector input: ws alone
    "W_e.0.scalar_norm.weight": (5,), "W_e.0.scalar_norm.bias": (5,),
    "W_e.1.wh.weight": (1, 1), "W_e.1.ws.weight": (6, 1 + 5), "W_e.1.ws.bias": (6,), "W_e.1.wv.weight": (1, 1),
    "W_e.1.wsv.weight": (1, 6), "W_e.1.wsv.bias": (1,),
    # message GVPs: (2*4 + 6, 2*2 + 1) = (14, 5) -> (4, 2), then (4, 2) -> (4, 2) twice
    "layers.0.conv.message_func.0.wh.weight": (5, 5), "layers.0.conv.message_func.0.ws.weight": (4, 5 + 14),
    "layers.0.conv.message_func.0.ws.bias": (4,), "layers.0.conv.message_func.0.wv.weight": (2, 5),
    "layers.0.conv.message_func.0.wsv.weight": (2, 4), "layers.0.conv.message_func.0.wsv.bias": (2,),
    "layers.0.conv.message_func.1.wh.weight": (2, 2), "layers.0.conv.message_func.1.ws.weight": (4, 2 + 4),
    "layers.0.conv.message_func.1.ws.bias": (4,), "layers.0.conv.message_func.1.wv.weight": (2, 2),
    "layers.0.conv.message_func.1.wsv.weight": (2, 4), "layers.0.conv.message_func.1.wsv.bias": (2,),
    "layers.0.conv.message_func.2.wh.weight": (2, 2), "layers.0.conv.message_func.2.ws.weight": (4, 2 + 4),
    "layers.0.conv.message_func.2.ws.bias": (4,), "layers.0.conv.message_func.2.wv.weight": (2, 2),
    "layers.0.conv.message_func.2.wsv.weight": (2, 4), "layers.0.conv.message_func.2.wsv.bias": (2,),
    "layers.0.norm.0.scalar_norm.weight": (4,), "layers.0.norm.0.scalar_norm.bias": (4,),
    "layers.0.norm.1.scalar_norm.weight": (4,), "layers.0.norm.1.scalar_norm.bias": (4,),
    "layers.0.dropout.0.vdropout.dummy_param": (0,), "layers.0.dropout.1.vdropout.dummy_param": (0,),
    # feed-forward: (4, 2) -> (16, 4) -> (4, 2)
    "layers.0.ff_func.0.wh.weight": (4, 2), "layers.0.ff_func.0.ws.weight": (16, 4 + 4),
    "layers.0.ff_func.0.ws.bias": (16,), "layers.0.ff_func.0.wv.weight": (4, 4),
    "layers.0.ff_func.0.wsv.weight": (4, 16), "layers.0.ff_func.0.wsv.bias": (4,),
    "layers.0.ff_func.1.wh.weight": (4, 4), "layers.0.ff_func.1.ws.weight": (4, 4 + 16),
    "layers.0.ff_func.1.ws.bias": (4,), "layers.0.ff_func.1.wv.weight": (2, 4),
    "layers.0.ff_func.1.wsv.weight": (2, 4), "layers.0.ff_func.1.wsv.bias": (2,),
    "W_out.0.scalar_norm.weight": (4,), "W_out.0.scalar_norm.bias": (4,),
    "W_out.1.wh.weight": (2, 2), "W_out.1.ws.weight": (4, 2 + 4), "W_out.1.ws.bias": (4,),  # no vector output
}


# ---- gearnet/cdconv.py --------------------------------------------------------------------------------------------

def _batch_norm(size, prefix) -> Dict[str, Shape]:
    return {f"{prefix}weight": (size,), f"{prefix}bias": (size,), f"{prefix}running_mean": (size,),
            f"{prefix}running_var": (size,), f"{prefix}num_batches_tracked": ()}


def _linear(in_dim, out_dim, bias, prefix) -> Dict[str, Shape]:
    return {f"{prefix}weight": (out_dim, in_dim), **({f"{prefix}bias": (out_dim,)} if bias else {})}


def original_cdblock_layout(seq_cutoff, kernel_dims, input_dim, output_dim, base_width=16.0, batch_norm=True,
                            bias=False, prefix="") -> Dict[str, Shape]:
    """`CDBlock.__init__`: identity = Linear(input_dim -> output_dim) when the widths differ, else an empty
    nn.Sequential; input = MLP(input_dim, None, width); conv = CDConv(width -> width); output = Linear(width ->
    output_dim); width = int(output_dim * base_width / 64).
    `Linear` (cdconv.py's own): module = [BatchNorm1d(in)?, LeakyReLU, Dropout, nn.Linear(in, out, bias)].
    `MLP` with mid_channels None: module = [BatchNorm1d(in)?, LeakyReLU, Dropout, nn.Linear(in, out, bias),
    BatchNorm1d(out)?, LeakyReLU, Dropout].
    `CDConv`: WeightNet (Ws.{i}: [seq_cutoff, 7 or kernel_dims[i-1], kernel_dims[i]], bs.{i}: [seq_cutoff,
    kernel_dims[i]], ParameterLists) and W: [kernel_dims[-1] * width, width]."""
    width = int(output_dim * (base_width / 64.0))
    first = 0 if not batch_norm else 1  # the nn.Linear sits after [BN?, LeakyReLU, Dropout]
    layout = {}
    if input_dim != output_dim:
        if batch_norm:
            layout.update(_batch_norm(input_dim, f"{prefix}identity.module.0."))
        layout.update(_linear(input_dim, output_dim, bias, f"{prefix}identity.module.{first + 2}."))
    if batch_norm:
        layout.update(_batch_norm(input_dim, f"{prefix}input.module.0."))
    layout.update(_linear(input_dim, width, bias, f"{prefix}input.module.{first + 2}."))
    if batch_norm:
        layout.update(_batch_norm(width, f"{prefix}input.module.{first + 3}."))
    layout[f"{prefix}conv.W"] = (kernel_dims[-1] * width, width)
    previous = 3 + 3 + 1
    for i, channels in enumerate(kernel_dims):
        layout[f"{prefix}conv.WeightNet.Ws.{i}"] = (seq_cutoff, previous, channels)
        layout[f"{prefix}conv.WeightNet.bs.{i}"] = (seq_cutoff, channels)
        previous = channels
    if batch_norm:
        layout.update(_batch_norm(width, f"{prefix}output.module.0."))
    layout.update(_linear(width, output_dim, bias, f"{prefix}output.module.{first + 2}."))
    return layout


def original_cdconv_layout(input_dim, embedding_dim, hidden_dims, seq_cutoff, kernel_dims, base_width=16.0,
                           batch_norm=True, bias=False, prefix="") -> Dict[str, Shape]:
    """`ContinuousDiscreteConvolutionalNetwork.__init__`: embedding = Linear(input_dim, embedding_dim, bias=False);
    dims = [embedding_dim] + hidden_dims; for stage i, layers gets CDBlock(dims[i] -> dims[i+1]) then
    CDBlock(dims[i+1] -> dims[i+1]); the readout has no parameter. (`cutoffs` sizes nothing.)"""
    dims = [embedding_dim] + list(hidden_dims)
    layout = {f"{prefix}embedding.weight": (embedding_dim, input_dim)}
    blocks = [pair for i in range(len(hidden_dims)) for pair in ((dims[i], dims[i + 1]), (dims[i + 1], dims[i + 1]))]
    for k, (a, b) in enumerate(blocks):
        layout.update(original_cdblock_layout(seq_cutoff, kernel_dims, a, b, base_width, batch_norm, bias,
                                              f"{prefix}layers.{k}."))
    return layout


# CDConv(input_dim=3, embedding_dim=2, hidden_dims=[8], cutoffs=[6.0], seq_cutoff=5, kernel_dims=[4, 3],
# base_width=32.0), key by key: one stage, block 0 widens 2 -> 8 (bottleneck width 8 * 32 / 64 = 4), block 1 keeps 8.
TINY_CDCONV_CONFIG = dict(input_dim=3, embedding_dim=2, hidden_dims=[8], cutoffs=[6.0], seq_cutoff=5,
                          kernel_dims=[4, 3], base_width=32.0)
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
TINY_CDCONV = {
    "embedding.weight": (2, 3),
    **{f"layers.0.identity.module.0.{n}": () if n == "num_batches_tracked" else (2,) for n in _BN},
    "layers.0.identity.module.3.weight": (8, 2),
    **{f"layers.0.input.module.0.{n}": () if n == "num_batches_tracked" else (2,) for n in _BN},
    "layers.0.input.module.3.weight": (4, 2),
    **{f"layers.0.input.module.4.{n}": () if n == "num_batches_tracked" else (4,) for n in _BN},
    "layers.0.conv.W": (3 * 4, 4),
    "layers.0.conv.WeightNet.Ws.0": (5, 7, 4), "layers.0.conv.WeightNet.bs.0": (5, 4),
    "layers.0.conv.WeightNet.Ws.1": (5, 4, 3), "layers.0.conv.WeightNet.bs.1": (5, 3),
    **{f"layers.0.output.module.0.{n}": () if n == "num_batches_tracked" else (4,) for n in _BN},
    "layers.0.output.module.3.weight": (8, 4),
    # block 1: 8 -> 8, no identity map
    **{f"layers.1.input.module.0.{n}": () if n == "num_batches_tracked" else (8,) for n in _BN},
    "layers.1.input.module.3.weight": (4, 8),
    **{f"layers.1.input.module.4.{n}": () if n == "num_batches_tracked" else (4,) for n in _BN},
    "layers.1.conv.W": (3 * 4, 4),
    "layers.1.conv.WeightNet.Ws.0": (5, 7, 4), "layers.1.conv.WeightNet.bs.0": (5, 4),
    "layers.1.conv.WeightNet.Ws.1": (5, 4, 3), "layers.1.conv.WeightNet.bs.1": (5, 3),
    **{f"layers.1.output.module.0.{n}": () if n == "num_batches_tracked" else (4,) for n in _BN},
    "layers.1.output.module.3.weight": (8, 4),
}


# ---- states in those layouts --------------------------------------------------------------------------------------

def random_state(layout: Dict[str, Shape], seed: int = 0, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    """A state_dict with the layout's names and shapes and random, non-trivial values: weights ~ N(0, 1/fan_in),
    biases and batch-norm shifts ~ N(0, 0.1^2), norm scales and running variances around 1, running means small,
    `num_batches_tracked` a long scalar, `dummy_param` empty (as the original saved them)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(3)
        elif name.endswith("dummy_param"):
            state[name] = torch.empty(shape, dtype=dtype)
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):  # norm scales
            state[name] = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        elif len(shape) == 1 or ".bs." in name:  # biases, running means, WeightNet biases [offsets, out]
            state[name] = torch.randn(shape, generator=generator, dtype=dtype) * 0.1
        else:  # Linear [out, in], WeightNet Ws [offsets, in, out]: fan-in shape[1]; CDConv W [K*D, out]: shape[0]
            fan_in = shape[0] if name.endswith("conv.W") else shape[1]
            state[name] = torch.randn(shape, generator=generator, dtype=dtype) / fan_in ** 0.5
    return state


def shapes_of(state: Dict[str, torch.Tensor]) -> Dict[str, Shape]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}
