"""Device backends: `reference` (NumPy, orcd_core.backends.reference) and `cuda` (CuPy,
orcd_core.backends.cuda). Pick one through `orcd_core.devices.create_device`; importing this package
imports neither NumPy-heavy nor CuPy code."""
