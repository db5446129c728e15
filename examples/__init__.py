"""Example models and scripts for ressurgeon (importable so the tests reuse the builders)."""
