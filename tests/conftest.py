"""Shared pytest setup: float64 is not enabled globally; tests run on the CPU."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
