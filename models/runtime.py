"""Where the embedding network's forward pass runs: PyTorch, or ONNX Runtime on the CPU.

``bench/embed.py`` measures every runtime variant of the network in the serving path (images/s,
cosine to PyTorch's embeddings, and with ``--auc`` the verification AUC on the real sets); the
default, ``auto``, follows its figures in BENCHMARKS.md: ONNX Runtime on the CPU when it is
installed, PyTorch on a GPU or without it. The PyTorch module stays the source of the weights: the
ONNX graph is exported from it in memory when the model loads (a few seconds), so every checkpoint,
shipped or trained here, runs the same way and no second weights file has to be kept in step.
"""

from __future__ import annotations

import io
import logging

import torch

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")


class OnnxRuntimeNetwork(torch.nn.Module):
    """An ONNX Runtime session standing in for the network: (N, 1, S, S) float32 in, (N, D) out."""

    def __init__(self, network: torch.nn.Module, size: int, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        graph = io.BytesIO()
        # The exporter's C++ log writes the whole graph to stdout when an export fails (torch leaves
        # that log switched on), which would corrupt a command's JSON output: send it to stderr.
        torch._C._jit_set_onnx_log_output_stream("stderr")
        with torch.no_grad():
            torch.onnx.export(
                network.eval(),
                (torch.zeros(2, 1, size, size),),
                graph,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                dynamo=False,  # the TorchScript exporter: a plain conv net, no onnxscript needed
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # warnings from graph optimisation are not the user's business
        self.session = onnxruntime.InferenceSession(
            graph.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["y"], {"x": array})[0])


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def inference_network(
    network: torch.nn.Module, size: int, device: torch.device, runtime: str = "auto"
) -> torch.nn.Module:
    """The module ``Embedder`` calls for embeddings: ``network`` itself, or an ONNX Runtime session
    exported from it. ``onnxruntime`` asked for but not installed is an error that says so; ``auto``
    falls back to PyTorch quietly (logged)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" or device.type != "cpu":
        if runtime == "onnxruntime":
            raise ValueError("runtime 'onnxruntime' runs on the CPU only; use 'torch' (or auto) on a GPU")
        return network
    if not onnxruntime_available():
        if runtime == "onnxruntime":
            raise ValueError("runtime 'onnxruntime' asked for, but onnx / onnxruntime are not installed")
        log.info("onnxruntime not installed: embeddings run in PyTorch")
        return network
    try:
        return OnnxRuntimeNetwork(network, size)
    except Exception as exc:  # an architecture the exporter cannot express (e.g. an uneven pooling)
        if runtime == "onnxruntime":
            raise ValueError(f"this network cannot run in ONNX Runtime: {exc}") from exc
        log.warning("ONNX export failed (%s): embeddings run in PyTorch", str(exc).splitlines()[0][:200])
        return network
