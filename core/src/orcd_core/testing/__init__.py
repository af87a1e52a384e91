"""Reusable test kits for orcd-worker and its plugins (imported by tests only; needs pytest)."""
