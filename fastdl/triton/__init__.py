"""Triton kernels, one file per op (forward and backward kernels + launchers).

Imported lazily by fastdl.ops, so `import fastdl` works without triton. On CPU
tensors they run only under TRITON_INTERPRET=1, which must be set before import.
"""
