"""Benchmarks of h2kd on the private stack: conversion overhead, submission, listing, fan-out, parallelism, faults.

Run with `make bench` (or bench/run, or .venv/bin/python -m bench --help). Figures are printed; bench/RESULTS.md
holds a run's figures and the machine they came from.
"""
