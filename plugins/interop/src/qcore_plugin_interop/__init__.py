"""qcore-plugin-interop: qcore checkpoints in the formats other engines read
(compressed-tensors, GPTQ, AWQ), and checkpoints of those formats read by qcore."""
