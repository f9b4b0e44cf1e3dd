"""CUDA C++ kernels for what Triton's language cannot express, built with nvcc on first use
(:mod:`hbkernels.cuda.build`) and called through ctypes. Used by the GPU backend where the device
supports them (Hopper thread-block clusters); every other device keeps the Triton kernels.
"""
