"""Recorded outputs of short runs that every change must reproduce (tests/test_golden.py; re-record: record.py)."""
