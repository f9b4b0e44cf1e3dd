"""Replay a denoising step as one CUDA graph.

A sampling loop calls the U-Net with the same shapes at every step, and at 320x512 one call launches
a few thousand small kernels whose host-side cost (Python, the dispatcher, Triton's launcher) is of
the order of their GPU time on an H100/H200. Capturing the call once per input signature and
replaying it removes that cost; each call copies its tensors into the graph's static inputs.
"""
import torch


def _signature(args, kwargs):
    def key(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.stride(), a.dtype, a.device)
        return ("value", a)

    # grad mode and autocast change what the captured kernels compute: part of the signature
    modes = (torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return tuple(key(a) for a in args), tuple((k, key(v)) for k, v in sorted(kwargs.items())), modes


def _tensors(args, kwargs):
    return [a for a in (*args, *(kwargs[k] for k in sorted(kwargs))) if isinstance(a, torch.Tensor)]


def capture(fn, warmup: int = 2):
    """(graph, output) of ``fn()`` captured as a CUDA graph on the current device, after ``warmup``
    runs on a side stream (as torch.cuda.graphs requires): they compile Triton kernels and fill the
    allocator's caches outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class CUDAGraphCall:
    """``CUDAGraphCall(fn)(*args, **kwargs)`` returns ``fn(*args, **kwargs)`` (a tensor), run as a CUDA
    graph captured on the first call with each signature (tensor shapes, strides, dtypes, devices,
    the values of non-tensor arguments, grad mode and CUDA autocast). A graph also reads tensors that are not arguments (a
    model's weights) at the addresses they had at capture: :meth:`set_weights_key` tells it when those
    change.

    ``fn`` must do the same GPU work for every input of one signature: no host synchronisation, no
    data-dependent Python branches. The result is a copy, safe to keep across calls.
    """

    def __init__(self, fn, warmup: int = 2):
        self.fn = fn
        self.warmup = warmup
        self._graphs = {}
        self._weights_key = None

    def set_weights_key(self, key):
        """``key`` identifies the non-argument tensors ``fn`` reads (e.g. every parameter's address and
        dtype). When it differs from the last one, every graph captured so far is dropped, with its
        memory pool: replaying one would read moved or freed weights, and none is valid again."""
        if key != self._weights_key:
            self._graphs.clear()
            self._weights_key = key

    def __call__(self, *args, **kwargs):
        tensors = _tensors(args, kwargs)
        if not torch.cuda.is_available() or not all(t.is_cuda for t in tensors):
            raise ValueError("CUDAGraphCall needs CUDA and CUDA tensor arguments (CUDA graphs run on GPUs only)")
        key = _signature(args, kwargs)
        if key not in self._graphs:
            device = tensors[0].device if tensors else torch.device("cuda", torch.cuda.current_device())
            self._graphs[key] = self._capture(args, kwargs, device)
        static, graph, out = self._graphs[key]
        for dst, src in zip(static, tensors):
            dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, args, kwargs, device):
        # a static input per argument position, even where the first call passes one tensor twice:
        # later calls of the signature may pass two, and each must land in its own buffer. Normal tensors
        # even under inference_mode (which the signature does not hold): a later call of the signature
        # under no_grad copies into them, which an inference tensor refuses
        with torch.inference_mode(False):
            s_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            s_kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.cuda.device(device):
            graph, out = capture(lambda: self.fn(*s_args, **s_kwargs), self.warmup)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"CUDAGraphCall: fn must return a tensor, got {type(out).__name__}")
        return _tensors(s_args, s_kwargs), graph, out
