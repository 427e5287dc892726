"""The local stack runner: ``python -m services.stack keys|up|down|status|probe``.

Tests use the Python API::

    stack = Stack.on_free_ports(root, tmp_path / "run", {"SIM_TIME_SCALE": "0.05"})
    keys = stack.start(timeout_s=120)     # returns once every service is SERVING
    ...  stack.router_address, keys.key_for("tenant-a"), keys.internal_token
    stack.stop()
"""

from services.stack.keys import StackKeys, ensure_keys
from services.stack.runner import Stack, StackError
from services.stack.table import SERVICES, ServiceDef

__all__ = ["SERVICES", "ServiceDef", "Stack", "StackError", "StackKeys", "ensure_keys"]
