"""Where the embedding network's forward pass runs on the CPU: PyTorch eager, oneDNN fusion or ONNX
Runtime.

``bench/embed.py`` measures each runtime variant of the network in the serving path (images/s at
batch 1 and 32, cosine to PyTorch's embeddings, and with ``--auc`` the verification AUC on the real
sets). The default, ``auto``, follows its figures (BENCHMARKS.md): **oneDNN fusion** on the CPU, i.e.
the network traced, frozen and passed through ``torch.jit.optimize_for_inference`` (convolution,
batch norm and activation folded into oneDNN kernels): 1.3-1.6x PyTorch eager at batch 32 on the
2-core sandbox, embeddings within cosine 0.9999999, AUC unchanged to 1e-7, built in about a second,
no dependency beyond torch. ``torch.compile`` measured about as fast but needs a C++ compiler where
the service runs and a minute to compile; ONNX Runtime was slower (an optional extra). On a GPU the
network runs as it is.

The PyTorch module stays the source of the weights: the fused or exported form is made from it when
the model loads, so every checkpoint runs the same way and no second weights file is kept in step.
A form that cannot be made, or whose output differs from PyTorch's, falls back to PyTorch under
``auto`` (logged) and is an error when asked for by name.
"""

from __future__ import annotations

import io
import logging

import torch

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onednn", "onnxruntime")

#: Lowest cosine between a fused / exported network's output and PyTorch's on a check batch.
MIN_COSINE = 0.9999


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


def onednn_network(network: torch.nn.Module, size: int) -> torch.nn.Module:
    """The network traced at the model's input size, frozen (weights become constants) and optimised
    for inference: batch norm folded into the convolutions and conv + activation run as fused oneDNN
    kernels. Works for any batch size."""
    example = torch.zeros(2, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(network.eval(), example)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _checked(candidate: torch.nn.Module, network: torch.nn.Module, size: int) -> torch.nn.Module:
    """``candidate`` if it runs and matches ``network`` at batch 1 and 3, else ValueError."""
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        inputs = torch.rand(batch, 1, size, size, generator=generator) * 2 - 1
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = torch.nn.functional.normalize(network(inputs).float(), dim=1)
            got = torch.nn.functional.normalize(candidate(inputs).float(), dim=1)
        cosine = float((expected * got).sum(dim=1).min())
        if cosine < MIN_COSINE:
            raise ValueError(f"its embeddings differ from PyTorch's (cosine {cosine:.6f})")
    return candidate


def _build(runtime: str, network: torch.nn.Module, size: int) -> torch.nn.Module:
    if runtime == "onnxruntime":
        try:
            import onnx  # noqa: F401 - the exporter needs it
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ValueError("onnx / onnxruntime are not installed (pip install -e '.[bench]')") from exc
        return _checked(OnnxRuntimeNetwork(network, size), network, size)
    return _checked(onednn_network(network, size), network, size)


def inference_network(
    network: torch.nn.Module, size: int, device: torch.device, runtime: str = "auto"
) -> tuple[torch.nn.Module, str]:
    """The module ``Embedder`` calls for embeddings and the name of the runtime it is: ``network``
    itself ("torch"), or a form made from it (see the module docstring)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if device.type != "cpu":
        if runtime not in ("auto", "torch"):
            raise ValueError(f"runtime {runtime!r} runs on the CPU only; use 'torch' (or auto) on a GPU")
        return network, "torch"
    if runtime == "torch":
        return network, "torch"
    chosen = "onednn" if runtime == "auto" else runtime
    try:
        return _build(chosen, network, size), chosen
    except Exception as exc:  # e.g. an architecture the tracer or exporter cannot express
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if runtime != "auto":
            raise ValueError(f"this network cannot run in runtime {runtime!r}: {reason}") from exc
        log.warning("%s runtime unavailable (%s): embeddings run in PyTorch", chosen, reason)
        return network, "torch"
