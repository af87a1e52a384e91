"""orcd-core: the contracts and machinery shared by the orcd-worker application and its plugins.

Importing this package (or any plugin) never imports CuPy nor touches a GPU.
"""

__version__ = "0.1.0"
