"""Evaluation harness for the methods library: tasks, runner (``kvplug eval run``) and report."""
