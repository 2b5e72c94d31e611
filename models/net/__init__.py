"""The network: the ResNet family (backbones), the margin heads, the checkpoint format, the CPU
runtimes (ONNX Runtime, oneDNN) and the Embedder that serves embeddings."""
