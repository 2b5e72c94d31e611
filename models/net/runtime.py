"""Where the embedding network's forward pass runs on the CPU: ONNX Runtime, oneDNN fusion or
PyTorch eager.

Two benchmarks decide the default, ``auto``. ``bench/embed.py`` times each form of the network alone
(images/s at batch 1 and 32, cosine to PyTorch's embeddings, AUC on the real sets with ``--auc``):
there oneDNN fusion (traced, frozen, ``torch.jit.optimize_for_inference``) led ONNX Runtime, 1.32x
against 1.10x eager at batch 32. ``bench/service.py --runtime ...`` times them where they serve,
behind real HTTP with decoding threads and the micro-batcher: there ONNX Runtime led clearly, at
concurrency 1 p50 23-27 ms against 45 ms (oneDNN) and 38 ms (eager), at concurrency 32 54-55 img/s
against 38-44 and 35, on the 2-core sandbox. What users meet is the service, so ``auto`` is ONNX
Runtime, then oneDNN fusion, then PyTorch, whichever can be made first. Every form keeps the
embeddings within cosine 0.9999999 and the AUC within 1e-7. ``torch.compile`` measured fastest alone
(1.56x) but needs a C++ compiler where the service runs and a minute to compile; it is not offered.
On a GPU the network runs as it is.

The PyTorch module stays the source of the weights: the fused or exported form is made from it when
the model loads (about a second), so every checkpoint runs the same way and no second weights file
is kept in step. A form that cannot be made, or whose output differs from PyTorch's, is skipped
under ``auto`` (logged) and is an error when asked for by name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onednn", "onnxruntime")

#: Lowest cosine between a fused / exported network's output and PyTorch's on a check batch.
MIN_COSINE = 0.9999


def bf16_autocast(device: torch.device, choice: str = "auto") -> bool:
    """Whether to train in bf16 autocast: always on CUDA; on a CPU only where the processor does bf16
    in hardware (AMX or AVX512-BF16: about 2x the steps/s on a 2-core machine), else fp32."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"amp must be auto, on or off, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    return bool(
        cpu is not None
        and (
            getattr(cpu, "_is_amx_tile_supported", lambda: False)()
            or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
    )


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence the exporter while it runs (once, at model load). When an export fails, torch's C++
    log prints the whole graph, thousands of lines, to stdout (that log is left switched on), which
    would bury the one-line reason we log and corrupt a command's JSON output; its deprecation
    warnings are noise too. File descriptors 1 and 2 go to /dev/null for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class OnnxRuntimeNetwork(torch.nn.Module):
    """An ONNX Runtime session standing in for the network: (N, 1, S, S) float32 in, (N, D) out."""

    def __init__(self, network: torch.nn.Module, size: int, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        graph = io.BytesIO()
        with torch.no_grad(), _exporter_quiet():
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
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The output layer reads the map's size to build its pooling bins; the trace is made for one
        # input size, so that size being a constant in it is what we want.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
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
            raise ValueError("onnx / onnxruntime are not installed") from exc
        return _checked(OnnxRuntimeNetwork(network, size), network, size)
    return _checked(onednn_network(network, size), network, size)


#: What ``auto`` tries on the CPU, in order (see the module docstring for the figures).
AUTO_ORDER = ("onnxruntime", "onednn")


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
    for chosen in AUTO_ORDER if runtime == "auto" else (runtime,):
        try:
            return _build(chosen, network, size), chosen
        except Exception as exc:  # e.g. not installed, or a network the tracer / exporter cannot express
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if runtime != "auto":
                raise ValueError(f"this network cannot run in runtime {runtime!r}: {reason}") from exc
            log.warning("runtime %s unavailable (%s)", chosen, reason)
    log.warning("embeddings run in PyTorch eager")
    return network, "torch"
