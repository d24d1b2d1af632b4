"""Digest tasks: find what is due, and send one digest per recipient."""

from __future__ import annotations
