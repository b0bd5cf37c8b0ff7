"""Thin entry scripts: parse config, start distributed, build from guard_fast, run, tear down."""
