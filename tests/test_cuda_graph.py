"""CUDA-graph replay of denoising steps: same results as plain calls, recapture on new shapes."""
import contextlib

import pytest
import torch

from helpers import ON_GPU
from hummingbird.cuda_graph import CUDAGraphCall
from hummingbird.testing import tiny_random_pipeline

gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")


def test_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphCall(torch.sin)(torch.randn(3))


def test_pipeline_on_cpu_ignores_cuda_graph():
    pipe = tiny_random_pipeline("lcm")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_frames=3, num_inference_steps=2, seed=0, output_type="pt")
    plain = pipe("a cat", **kwargs).frames
    pipe.enable_cuda_graph()
    torch.testing.assert_close(pipe("a cat", **kwargs).frames, plain, atol=0, rtol=0)


def test_pipeline_with_cuda_graph_is_freed_when_deleted():
    """The graphed step closed over the pipeline that holds it: a cycle, so `del pipe` freed nothing
    until the garbage collector ran (the pipeline benchmark's next model was measured beside it)."""
    import gc
    import weakref

    pipe = tiny_random_pipeline("lcm")
    pipe.enable_cuda_graph()
    unet = weakref.ref(pipe.unet)
    gc.disable()
    try:
        del pipe
        assert unet() is None
    finally:
        gc.enable()


def test_new_weights_key_drops_every_graph():
    graphed = CUDAGraphCall(torch.sin)
    graphed.set_weights_key("v1")
    graphed._graphs.update(a="graph a", b="graph b")  # stand-ins: capturing needs a GPU
    graphed.set_weights_key("v1")
    assert set(graphed._graphs) == {"a", "b"}
    graphed.set_weights_key("v2")
    assert graphed._graphs == {}


def test_weights_key_sees_every_tensor_the_unet_reads():
    pipe = tiny_random_pipeline("lcm")
    key = pipe._cuda_graph_weights_key()
    assert pipe._cuda_graph_weights_key() == key
    last = list(pipe.unet.parameters())[-1]
    last.data = last.data.clone()  # as a LoRA merge that swaps .data does
    assert pipe._cuda_graph_weights_key() != key
    key = pipe._cuda_graph_weights_key()
    pipe.unet.out[2].register_buffer("adapter_scale", torch.ones(1))  # an adapter added later
    assert pipe._cuda_graph_weights_key() != key
    key = pipe._cuda_graph_weights_key()
    pipe.unet.weights_version += 1  # a layout switch whose new tensors may reuse the old addresses
    assert pipe._cuda_graph_weights_key() != key
    key = pipe._cuda_graph_weights_key()
    with torch.no_grad():
        last.mul_(2)  # in place (load_state_dict): fused projections' copies must be refreshed
    assert pipe._cuda_graph_weights_key() != key


def test_weights_key_of_weights_made_in_inference_mode():
    with torch.inference_mode():
        pipe = tiny_random_pipeline("lcm")
    key = pipe._cuda_graph_weights_key()  # raised: inference tensors keep no version counter
    last = list(pipe.unet.parameters())[-1]
    last.data = last.data.clone()
    assert pipe._cuda_graph_weights_key() != key


def test_weights_key_sees_adapter_state():
    """A peft LoRA layer's scale and on/off switch are Python values a capture bakes in: changing them
    must recapture, not replay the old ones."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    pipe = tiny_random_pipeline("lcm")
    key = pipe._cuda_graph_weights_key()
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["to_q"]), pipe.unet)
    assert pipe._cuda_graph_weights_key() != key
    layer = next(m for m in pipe.unet.modules() if isinstance(m, LoraLayer))
    for change in (lambda: layer.set_scale("default", 0.5), lambda: layer.enable_adapters(False)):
        key = pipe._cuda_graph_weights_key()
        assert pipe._cuda_graph_weights_key() == key
        change()
        assert pipe._cuda_graph_weights_key() != key


def test_each_argument_position_gets_its_own_static_input(monkeypatch):
    """A first call f(x, x) gave both positions one static buffer: a later call of the same signature
    with two different tensors copied both into it, and the replay computed on the second alone."""
    from hummingbird import cuda_graph

    monkeypatch.setattr(cuda_graph, "capture", lambda fn, warmup: (None, fn()))  # capturing needs a GPU
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    x = torch.randn(3)
    static, _, out = CUDAGraphCall(lambda a, b, c: a + b - 2 * c)._capture((x, x), {"c": x}, "cpu")
    assert len({t.data_ptr() for t in static}) == 3
    torch.testing.assert_close(out, torch.zeros(3))


def test_static_inputs_captured_under_inference_mode_take_later_calls(monkeypatch):
    """A graph first captured under torch.inference_mode had inference tensors as static inputs: the next
    call of its signature under no_grad (the pipeline's own mode, the same signature) failed to copy
    into them ("Inplace update to inference tensor outside InferenceMode")."""
    from hummingbird import cuda_graph

    monkeypatch.setattr(cuda_graph, "capture", lambda fn, warmup: (None, fn()))  # capturing needs a GPU
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    x = torch.randn(3)
    with torch.inference_mode():
        static, _, out = CUDAGraphCall(lambda a: a * 2)._capture((x,), {}, "cpu")
    with torch.no_grad():
        static[0].copy_(torch.ones(3))  # an inference tensor would refuse this
    assert not static[0].is_inference() and torch.equal(static[0], torch.ones(3))


def test_signature_holds_grad_mode_and_autocast():
    """A graph captured under one mode replayed silently under another (fp16 kernels under autocast)."""
    from hummingbird.cuda_graph import _signature

    args = (torch.randn(2), 3)
    plain = _signature(args, {})
    with torch.no_grad():
        assert _signature(args, {}) != plain
    assert _signature((args[0].half(), 3), {}) != plain  # an fp32 graph must not replay fp16 inputs
    square = torch.randn(2, 2)
    assert _signature((square, 3), {}) != _signature((square.t(), 3), {})  # the output takes the layout
    if ON_GPU:  # CUDA autocast is disabled (with a warning) on a machine without CUDA
        with torch.autocast("cuda", dtype=torch.float16):
            assert _signature(args, {}) != plain
    assert _signature(args, {}) == plain


@gpu_only
def test_replay_of_a_signature_first_called_with_one_tensor_twice():
    graphed = CUDAGraphCall(torch.sub, warmup=1)
    x = torch.randn(3, device="cuda")
    torch.testing.assert_close(graphed(x, x), torch.zeros_like(x))
    a, b = torch.full((3,), 5.0, device="cuda"), torch.full((3,), 2.0, device="cuda")
    torch.testing.assert_close(graphed(a, b), torch.full((3,), 3.0, device="cuda"))


@pytest.mark.parametrize("hook", ["_hf_hook", "_diffusers_hook"])
def test_cuda_graph_refuses_offload_hooks(hook):
    """accelerate's (enable_sequential_cpu_offload) and diffusers' own (enable_group_offload) hooks
    move the weights during each call."""
    pipe = tiny_random_pipeline("lcm")
    setattr(pipe.unet.out[2], hook, object())
    with pytest.raises(ValueError, match="offload hooks"):
        pipe.enable_cuda_graph()


@gpu_only
def test_replay_tracks_inputs_and_recaptures_per_shape():
    w = torch.randn(16, 16, device="cuda")
    calls = []

    def fn(x, scale):
        calls.append(x.shape)
        return torch.relu(x @ w) * scale

    graphed = CUDAGraphCall(fn, warmup=1)
    for shape in [(4, 16), (4, 16), (8, 16), (4, 16)]:
        x = torch.randn(shape, device="cuda")
        out = graphed(x, 2.0)
        torch.testing.assert_close(out, fn(x, 2.0))
    calls.clear()
    graphed(torch.randn(4, 16, device="cuda"), 2.0)
    assert calls == []  # replayed, not re-run in Python
    graphed(torch.randn(4, 16, device="cuda"), 3.0)  # a new non-tensor value is a new signature
    assert len(calls) == 2  # one warm-up + one capture


@gpu_only
@pytest.mark.parametrize("scheduler", ["lcm", "ddim"])
def test_pipeline_with_cuda_graph_matches_plain(scheduler):
    pipe = tiny_random_pipeline(scheduler).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=3, seed=0, output_type="pt")
    plain = pipe("a cat", **kwargs).frames
    pipe.enable_cuda_graph()
    graphed = pipe("a cat", **kwargs).frames
    again = pipe("a dog", **kwargs).frames  # replays the captured graphs with new inputs
    torch.testing.assert_close(graphed, plain, atol=2e-5, rtol=0)
    assert not torch.equal(again, graphed)


def _graphed_lcm_pipeline():
    """(a tiny LCM pipeline on the GPU with CUDA graphs on, the call's keyword arguments)."""
    pipe = tiny_random_pipeline("lcm").to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cuda_graph()
    return pipe, dict(height=32, width=32, num_frames=5, num_inference_steps=2, seed=0, output_type="pt")


@gpu_only
def test_channels_last_switch_recaptures():
    pipe, kwargs = _graphed_lcm_pipeline()
    graphed = pipe("a cat", **kwargs).frames
    old = list(pipe._graphed_unet._graphs.values())
    pipe.enable_channels_last()  # moves the conv weights: replaying the old graph would read freed memory
    again = pipe("a cat", **kwargs).frames
    new = list(pipe._graphed_unet._graphs.values())
    assert len(old) == len(new) == 1 and new[0] is not old[0]  # the old weights' graph dropped, one recaptured
    # other cuDNN algorithms (TF32 by default) for the NHWC convolutions: not bitwise
    torch.testing.assert_close(again, graphed, atol=1e-3, rtol=0)


@gpu_only
def test_swapped_weights_recapture():
    """A LoRA-style merge that replaces .data of a parameter other than the first: the graphs must read it."""
    pipe, kwargs = _graphed_lcm_pipeline()
    before = pipe("a cat", **kwargs).frames
    conv = pipe.unet.out[2]
    conv.weight.data = conv.weight.data * 2
    graphed = pipe("a cat", **kwargs).frames
    pipe.disable_cuda_graph()
    plain = pipe("a cat", **kwargs).frames
    assert not torch.equal(graphed, before)
    torch.testing.assert_close(graphed, plain, atol=2e-5, rtol=0)


@gpu_only
def test_offload_hooks_added_after_enabling_are_refused():
    pipe, kwargs = _graphed_lcm_pipeline()
    pipe.unet._hf_hook = object()  # as enable_model_cpu_offload() leaves on the U-Net
    with pytest.raises(ValueError, match="offload hooks"):
        pipe("a cat", **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_results_survive_the_next_replay():
    """A result is a copy, not the graph's static output that the next replay overwrites."""
    graphed = CUDAGraphCall(lambda x: x * 2, warmup=1)
    x1, x2 = torch.ones(4, device="cuda"), torch.full((4,), 3.0, device="cuda")
    a = graphed(x1)
    graphed(x2)
    torch.testing.assert_close(a, x1 * 2)
