"""Host-model integrations: the only place that knows a host library's internals.

Nothing here patches anything at import time; integration modules are imported lazily by the
registry when a model of a matching class is patched.
"""
