"""Modules the examples share: the digits data set and the pieces of every report.

Each example's ``main.py`` puts ``examples/`` on the import path, so the examples import
these as ``from common import digits, report``.
"""
