"""Triton kernels and their launchers, one file per op.

Installed as ``uvit_fast.kernels``. This package never imports ``uvit_fast``
(layering is one-way: ``uvit_fast`` imports ``kernels``).
"""
