"""Fused Triton kernels of mmt-fast, each with its PyTorch reference.

This package imports only torch and triton; models reach the ops through
``mmt_fast.layers``.
"""
