"""Triton kernels, one module per family. Imported lazily by the backends (never at package import), so a
missing or broken triton never breaks ``import stabkernels``. Set ``TRITON_INTERPRET=1`` before these
modules are imported to run the kernels on CPU tensors in Triton's interpreter.

Interpreter facts the kernels respect (docs/gpu-without-a-gpu.md, section 1): bf16 is upcast to fp32 right
after ``tl.load``; no libdevice; single-config launches.
"""
