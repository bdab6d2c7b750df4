"""Evaluation: task files, generators, metrics, runner, reports."""
