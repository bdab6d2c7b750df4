"""CUDA checks (marker ``gpu``): run by ``make test-gpu``; see conftest.py."""
