"""Real models, converted, against their torch.nn originals: training, idioms, export.

The models are torchvision's and timm's, built untrained at small input sizes, in float64 so
that the comparison shows the arithmetic, not the rounding. Each is trained beside its
``copy.deepcopy`` with plain SGD; after ``batchnorm.convert`` the losses, gradients and
buffers must match. The models use the idioms of real code: ``ReLU(inplace=True)`` and
in-place Hardswish on batch-norm outputs, ``out += identity``.
"""

import copy

import pytest
import torch
import vision_models
from tolerances import assert_close

import batchnorm

MODELS = {
    "resnet18": lambda tv: tv.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda tv: tv.models.mobilenet_v3_small(num_classes=10),
}


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](vision_models.torchvision()).double()


# 48x48 leaves 2x2 positions in resnet18's last stage: with 1x1 (32x32 input) its batch norms
# see 4 values per channel, and three SGD steps amplify float64 rounding to 1e-7 (torch.nn
# against itself in the other memory format drifts as far), which would hide nothing but noise.
SIZE = 48


def _batch(seed: int, shape=(4, 3, SIZE, SIZE), memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).contiguous(
        memory_format=memory_format)
    return x, torch.randint(0, 10, (shape[0],), generator=g)


def _train_side_by_side(ours, theirs, steps=3, memory_format=torch.contiguous_format):
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    for step in range(steps):
        x, target = _batch(step, memory_format=memory_format)
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            torch.manual_seed(step)  # the same dropout masks for both
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss)
        assert_close(losses[0], losses[1], msg=f"loss at step {step}")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, msg=f"gradient of {name} at step {step}")
        for optimizer in optimizers:
            optimizer.step()
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        if b.is_floating_point():
            assert_close(b, c, msg=f"buffer {name}")
        else:
            assert torch.equal(b, c), name


@pytest.mark.parametrize("name, memory_format", [
    ("resnet18", torch.contiguous_format), ("resnet18", torch.channels_last),
    ("mobilenet_v3_small", torch.contiguous_format)],
    ids=["resnet18-nchw", "resnet18-channels_last", "mobilenet_v3_small-nchw"])
def test_converted_model_trains_as_torch_nn(name, memory_format):
    theirs = _model(name).to(memory_format=memory_format)
    ours = batchnorm.convert(copy.deepcopy(theirs))
    assert not any(type(m).__module__ == "torch.nn.modules.batchnorm" for m in ours.modules())
    _train_side_by_side(ours, theirs, memory_format=memory_format)
    ours.eval()
    theirs.eval()
    x, _ = _batch(10, memory_format=memory_format)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), msg="eval output")


def _residual_relu(out, identity):
    out += identity  # torchvision's BasicBlock and Bottleneck
    return torch.relu_(out)


IDIOMS = {
    "relu_": lambda out, identity: torch.relu_(out),
    "add_then_relu_": _residual_relu,
    "hardswish_inplace": lambda out, identity: torch.nn.functional.hardswish(out, inplace=True),
    "silu_inplace": lambda out, identity: torch.nn.functional.silu(out, inplace=True),
}


@pytest.mark.parametrize("idiom", list(IDIOMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place_ops_on_outputs(idiom, training):
    # What torchvision's blocks do to a batch norm's output, on ours and on torch.nn's.
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    identity = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    results = []
    for bn in (batchnorm.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()):
        bn.train(training)
        inputs = x.clone().requires_grad_()
        out = IDIOMS[idiom](bn(inputs), identity)
        out.backward(torch.ones_like(out) * 0.5 + inputs.detach())
        results.append((out.detach(), inputs.grad, bn.weight.grad, bn.bias.grad))
    for a, b in zip(*results, strict=True):
        assert_close(a, b)


def test_torch_func_over_a_converted_model():
    theirs = _model("resnet18").eval()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x, target = _batch(0)
    grads = []
    for model in (ours, theirs):
        params = dict(model.named_parameters())

        def loss(p, model=model):
            out = torch.func.functional_call(model, p, (x,))
            return torch.nn.functional.cross_entropy(out, target)

        grads.append(torch.func.grad(loss)(params))
    for key in grads[1]:
        assert_close(grads[0][key], grads[1][key], msg=key)


def test_export_jit_trace_and_onnx_of_an_eval_model(tmp_path):
    theirs = _model("resnet18").eval()
    ours = batchnorm.convert(copy.deepcopy(theirs)).eval().float()
    theirs.float()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = theirs(x)
        traced = torch.jit.trace(ours, x)
        assert_close(traced(x * 2), theirs(x * 2), msg="jit.trace on a new input")
        exported = torch.export.export(ours, (x,))
        assert_close(exported.module()(x), expected, msg="torch.export")
    _assert_onnx_runs_like(ours, x, expected, tmp_path / "resnet18.onnx")


def _assert_onnx_runs_like(model, x, expected, path):
    """The dynamo exporter's ONNX model holds standard ops only, and onnxruntime runs it to
    torch's outputs."""
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    runtime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    graph = onnx.load(str(path)).graph
    # standard ONNX ops only (the exporter may fold BatchNormalization into Conv)
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), \
        {(node.domain, node.op_type) for node in graph.node}
    session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(out), expected, msg="onnxruntime")


def test_export_in_training_updates_the_running_statistics():
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                 torch.nn.ReLU(inplace=True)).double()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    x, _ = _batch(0, shape=(2, 3, 8, 8))
    program = torch.export.export(ours, (x,)).module()
    y = program(x)
    assert_close(y, theirs(x))
    state, expected = program.state_dict(), theirs.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert_close(state[key].double(), expected[key].double(), msg=key)


def _timm_model(name="efficientnet_b0"):
    """A timm model built from timm's ``BatchNormAct2d`` layers, with non-trivial running
    statistics, in float64 eval mode."""
    timm = vision_models.timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5, generator=g)
                layer.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _fused_layers(model):
    return [m for m in model.modules() if isinstance(m, batchnorm.BatchNormAct2d)]


def test_timm_fused_layers_convert_train_and_keep_their_activation():
    theirs = _timm_model()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    fused = _fused_layers(ours)
    assert len(fused) == 49 and {m.activation for m in fused} == {None}  # SiLU stays a module
    assert {type(m.act).__name__ for m in fused} == {"SiLU", "Identity"}
    x, _ = _batch(0, shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert_close(ours(x), theirs(x), msg="eval output")
    _train_side_by_side(ours.train(), theirs.train(), steps=2)


@pytest.mark.parametrize("conversion", ["fold", "freeze", "convert_sync_batchnorm"])
@pytest.mark.parametrize("source", ["timm", "converted"])
def test_conversions_of_fused_layers_keep_the_outputs(conversion, source):
    theirs = _timm_model()
    model = copy.deepcopy(theirs) if source == "timm" else batchnorm.convert(copy.deepcopy(theirs))
    convert = {"fold": batchnorm.fold, "freeze": batchnorm.freeze,
               "convert_sync_batchnorm": batchnorm.SyncBatchNorm.convert_sync_batchnorm}
    converted = convert[conversion](model)
    left = {type(m).__name__ for m in converted.modules() if "Norm" in type(m).__name__}
    assert left == {"fold": set(), "freeze": {"FrozenBatchNormAct2d"},
                    "convert_sync_batchnorm": {"SyncBatchNormAct"}}[conversion]
    x, _ = _batch(3, shape=(2, 3, 32, 32))
    with torch.no_grad():
        assert_close(converted(x), theirs(x), msg=conversion)


def test_recalibrate_a_converted_timm_model_as_the_original():
    theirs = _timm_model()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    batches = [_batch(seed, shape=(4, 3, 32, 32))[0] for seed in range(3)]
    for model in (ours, theirs):
        batchnorm.recalibrate(model, batches)
    for (name, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
        assert_close(b.double(), c.double(), msg=name)


def test_fold_keeps_a_fused_relu():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                batchnorm.BatchNormAct2d(4, activation="relu")).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    folded = batchnorm.fold(model)
    assert isinstance(folded[1], batchnorm.Epilogue) and folded[1].activation == "relu"
    with torch.no_grad():
        y = folded(x)
        assert (y >= 0).all()
        assert_close(y, model(x))


@pytest.mark.parametrize("name", list(MODELS))
def test_fx_symbolic_trace_of_a_converted_model_runs_as_the_original(name):
    """Our layers are call_module leaves of the graph, as torch.nn's are, so the traced
    module follows train()/eval() at run time."""
    theirs = _model(name)
    ours = batchnorm.convert(copy.deepcopy(theirs))
    traced = torch.fx.symbolic_trace(ours)
    leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {k for k, m in ours.named_modules() if isinstance(m, batchnorm.BatchNorm2d)} <= leaves
    x, _ = _batch(0)
    for mode in ("train", "eval"):
        getattr(theirs, mode)()
        getattr(traced, mode)()
        torch.manual_seed(0)  # the same dropout masks for both
        expected = theirs(x)
        torch.manual_seed(0)
        assert_close(traced(x), expected, msg=mode)
    for (key, value), reference in zip(ours.state_dict().items(), theirs.state_dict().values(),
                                       strict=True):
        assert_close(value.double(), reference.double(), msg=key)


def test_create_feature_extractor_of_a_converted_backbone():
    tv = vision_models.torchvision()
    from torchvision.models.feature_extraction import create_feature_extractor

    theirs = _model("resnet18").eval()
    ours = batchnorm.convert(copy.deepcopy(theirs))
    nodes = ["layer1.0.bn1", "layer4"]
    x, _ = _batch(1)
    got = create_feature_extractor(ours, return_nodes=nodes)(x)
    expected = create_feature_extractor(theirs, return_nodes=nodes)(x)
    assert tv is not None and set(got) == set(nodes)
    for node in nodes:
        assert_close(got[node], expected[node], msg=node)


def test_fold_of_densenet_folds_what_follows_a_conv_and_leaves_the_rest():
    """DenseNet's first norm of each dense layer and its transitions follow concatenations;
    the stem's norm0 and each layer's norm2 (after conv1) fold."""
    tv = vision_models.torchvision()
    torch.manual_seed(0)
    model = tv.models.densenet121(num_classes=10).double().eval()
    with torch.no_grad():  # non-trivial statistics, so that a wrong fold shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    with pytest.warns(UserWarning, match=r"folded 59 batch-norm layer\(s\) and left 62"):
        folded = batchnorm.fold(model)
    assert isinstance(folded.features.norm0, torch.nn.Identity)
    assert isinstance(folded.features.denseblock1.denselayer1.norm2, torch.nn.Identity)
    assert isinstance(folded.features.denseblock1.denselayer1.norm1, torch.nn.BatchNorm2d)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert_close(folded(x), model(x))
